"""Device-side strong random weights, and a reference model (transformers) that shares thinktalk's tensors."""

import math

import pytest
import torch
from checkpoints import full_config_dict, tiny_config_dict

from thinktalk.config import parse_config
from thinktalk.models.omni import OmniModel
from thinktalk.random_weights import (
    _same_layout,
    random_model,
    randomize_,
    reference_to_thinktalk,
    tensor_seed,
    tied_reference,
)

SEED = 11
TOTAL_PARAMETERS = 35_259_818_545  # tests/test_structure.py
OWN_BYTES_LIMIT = 10_000_000  # the reference's own buffers at full size (7.7 MB: the audio encoder's sinusoids)


@pytest.fixture(scope="module")
def tied():
    config = tiny_config_dict()
    model = random_model(config, "cpu", torch.float32, SEED)
    reference, report = tied_reference(model, config)
    return model, reference, report


def test_tied_reference_thinker_logits_equal_thinktalk(tied):
    model, reference, _ = tied
    ids = torch.randint(0, 151_000, (1, 29), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        theirs = reference.thinker(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
        ours = model.thinker(model.thinker.embed(ids), positions)[0][0]
    assert theirs.std() > 1.0, "weights too weak for a meaningful comparison"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_tied_reference_talker_and_code2wav_equal_thinktalk(tied):
    model, reference, _ = tied
    gen = torch.Generator().manual_seed(2)
    embeds = torch.randn(1, 7, model.cfg.talker.text.hidden_size, generator=gen)
    positions = torch.arange(7).view(1, 1, -1).expand(3, 1, -1)
    codes = torch.randint(0, model.cfg.code2wav.codebook_size, (1, model.cfg.code2wav.num_quantizers, 80),
                          generator=gen)
    with torch.no_grad():
        ref_hidden = reference.talker.model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        hidden, logits = model.talker(embeds, positions)
        wave, ref_wave = model.code2wav.decode(codes), reference.code2wav(codes).squeeze(1)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, reference.talker.codec_head(ref_hidden), atol=1e-4, rtol=0)
    torch.testing.assert_close(wave, ref_wave, atol=1e-4, rtol=0)
    assert wave.std() > 0.05 and (wave.abs() >= 1).float().mean() < 0.01, "audible, mostly unclipped"


def test_every_reference_parameter_is_a_thinktalk_tensor(tied):
    model, reference, report = tied
    ours = {id(p) for p in model.parameters()}
    assert all(id(p) in ours for p in reference.parameters())
    assert len(report.shared) == sum(1 for _ in reference.parameters()) == sum(1 for _ in model.parameters())
    assert all(b.device.type == "cpu" for b in reference.buffers())


def test_full_size_on_meta_shares_everything():
    """The released structure: every reference parameter is shared, nothing is copied; its own memory is only
    its buffers."""
    config = full_config_dict()
    with torch.device("meta"):
        model = OmniModel(parse_config(config), audio_output=True).to(torch.bfloat16)
    reference, report = tied_reference(model, config)
    print(report.summary())
    ours = {id(p) for p in model.parameters()}
    assert all(id(p) in ours for p in reference.parameters())
    assert sum(p.numel() for p in reference.parameters()) == TOTAL_PARAMETERS
    assert report.shared_bytes == 2 * TOTAL_PARAMETERS
    assert 0 < report.own_bytes < OWN_BYTES_LIMIT, report.buffers


def test_mapping_rejects_a_model_of_another_shape():
    config = tiny_config_dict()
    other = tiny_config_dict()
    other["thinker_config"]["text_config"]["moe_intermediate_size"] = 16
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    with torch.device("meta"):
        model = OmniModel(parse_config(other), audio_output=True)
        reference = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**config))
    with pytest.raises(ValueError, match="has shape"):
        reference_to_thinktalk(model, reference)


def test_layout_probe_tells_layouts_apart():
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    with torch.device("meta"):
        reference = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**tiny_config_dict()))
    name = "thinker.model.language_model.layers.0.mlp.experts.gate_up_proj"
    shape = tuple(reference.get_parameter(name).shape)
    assert _same_layout(reference, name, "thinker.model.layers.0.mlp.experts.gate_up_proj", shape)
    # The same tensor read as thinktalk's down_proj layout (one block per expert, no gate/up halves): refused.
    assert not _same_layout(reference, name, "thinker.model.layers.0.mlp.experts.down_proj", shape)


def test_randomize_is_per_tensor_seeded_and_strong():
    config = tiny_config_dict()
    model = random_model(config, "cpu", torch.float32, SEED)
    name = "thinker.model.layers.1.mlp.experts.gate_up_proj"
    param = model.get_parameter(name)
    expected = torch.empty_like(param).normal_(0.0, 1 / math.sqrt(param.shape[-1]),
                                               generator=torch.Generator().manual_seed(tensor_seed(SEED, name)))
    assert torch.equal(param, expected)
    again = random_model(config, "cpu", torch.float32, SEED)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    randomize_(again, SEED + 1)
    assert not torch.equal(again.get_parameter(name), param)
    # Routing spreads over the experts: every expert of the first layer is someone's top-k on a random prompt.
    embeds = model.thinker.embed(torch.randint(0, 151_000, (64,), generator=torch.Generator().manual_seed(3)))
    router_logits = embeds @ model.get_parameter("thinker.model.layers.0.mlp.gate.weight").T
    chosen = router_logits.topk(model.cfg.thinker.text.moe.top_k, dim=-1).indices
    assert chosen.unique().numel() == model.cfg.thinker.text.moe.num_experts
    assert model.get_parameter("thinker.model.norm.weight").mean().item() == pytest.approx(1.0, abs=0.1)
