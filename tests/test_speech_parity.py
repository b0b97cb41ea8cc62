"""Parity of the speech side (talker, code predictor, code2wav) with the reference implementation (transformers).

A tiny random float32 checkpoint is written by the reference (`save_pretrained`, the released on-disk layout) and
loaded strictly into thinktalk's modules; both then run on the same inputs. Code2Wav streaming is checked against
thinktalk's own one-shot decode, which is itself checked against the reference.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from checkpoints import build_reference, full_config_dict, tiny_config_dict
from safetensors.torch import load_file
from torch import nn

from thinktalk.config import SamplingConfig, load_config, parse_config
from thinktalk.layers.kv_cache import LayerCaches
from thinktalk.layers.sampler import Sampler
from thinktalk.models.code2wav import Code2Wav, Code2WavStream
from thinktalk.models.talker import Talker

# The tiny config keeps the released upsampling, whose transposed convs need one input of lookahead per stage.
RELEASED_LOOKAHEAD_SAMPLES = 555


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint fixture and test-local weight mapping


def _fused(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The on-disk tensors under `prefix`, prefix stripped, per-expert tensors stacked as thinktalk holds them."""
    out, experts = {}, {}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if m is None:
            out[name] = tensor
        else:
            experts.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = tensor
    for base, parts in experts.items():
        ids = range(len(parts["down_proj"]))
        gate, up = parts["gate_proj"], parts["up_proj"]
        out[f"{base}.gate_up_proj"] = torch.stack([torch.cat((gate[e], up[e])) for e in ids])  # rows [gate; up]
        out[f"{base}.down_proj"] = torch.stack([parts["down_proj"][e] for e in ids])
    return out


def _on_disk_layout(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Fused expert names/shapes -> the per-expert names/shapes a checkpoint stores."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base, (experts, rows, hidden) = name[: -len("gate_up_proj")], shape
            for e in range(experts):
                out[f"{base}{e}.gate_proj.weight"] = out[f"{base}{e}.up_proj.weight"] = (rows // 2, hidden)
        elif name.endswith("mlp.experts.down_proj"):
            base, (experts, hidden, inter) = name[: -len("down_proj")], shape
            for e in range(experts):
                out[f"{base}{e}.down_proj.weight"] = (hidden, inter)
        else:
            out[name] = shape
    return out


def _shapes(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> SimpleNamespace:
    reference = build_reference(tiny_config_dict(), seed=3)  # its code2wav is well conditioned (checkpoints.py)
    path: Path = tmp_path_factory.mktemp("speech")
    reference.save_pretrained(path)
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    config = load_config(path)
    talker, code2wav = Talker(config.talker).eval(), Code2Wav(config.code2wav).eval()
    talker.load_state_dict(_fused(tensors, "talker."), strict=True)
    code2wav.load_state_dict(_fused(tensors, "code2wav."), strict=True)
    disk = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(("talker.", "code2wav."))}
    return SimpleNamespace(reference=reference, config=config, talker=talker, code2wav=code2wav, disk=disk)


# ----------------------------------------------------------------------------------------------------------------
# Names and shapes


def test_tiny_checkpoint_names_and_shapes(speech):
    mine = _on_disk_layout({**_shapes(speech.talker, "talker."), **_shapes(speech.code2wav, "code2wav.")})
    assert mine == speech.disk


def test_full_size_names_and_shapes():
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeCode2Wav,
        Qwen3OmniMoeTalkerForConditionalGeneration,
    )

    full = full_config_dict()
    cfg, ref_cfg = parse_config(full), Qwen3OmniMoeConfig(**full)
    with torch.device("meta"):
        mine = {**_shapes(Talker(cfg.talker), "talker."), **_shapes(Code2Wav(cfg.code2wav), "code2wav.")}
        ref_talker = Qwen3OmniMoeTalkerForConditionalGeneration._from_config(ref_cfg.talker_config)
        ref_code2wav = Qwen3OmniMoeCode2Wav._from_config(ref_cfg.code2wav_config)
    theirs = {**_shapes(ref_talker, "talker."), **_shapes(ref_code2wav, "code2wav.")}
    mine, theirs = _on_disk_layout(mine), _on_disk_layout(theirs)
    assert sorted(set(mine) ^ set(theirs)) == []
    assert mine == theirs
    assert sum(math.prod(s) for k, s in mine.items() if k.startswith("talker.")) == 3_324_596_480
    with torch.device("meta"):
        code2wav = Code2Wav(cfg.code2wav)
    assert cfg.code2wav.samples_per_frame == 1920
    assert [code2wav.num_samples(n) for n in (0, 1, 2, 300)] == [0, 1920 - 555, 2 * 1920 - 555, 300 * 1920 - 555]


def test_every_talker_layer_is_sparse_like_the_reference():
    """The reference builds every talker layer as MoE + shared expert, even where mlp_only_layers and
    decoder_sparse_step ask for a dense MLP (the released config asks for none)."""
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeTalkerForConditionalGeneration

    c = tiny_config_dict()
    c["talker_config"]["text_config"].update(mlp_only_layers=[0], decoder_sparse_step=2)
    cfg, ref_cfg = parse_config(c), Qwen3OmniMoeConfig(**c)
    with torch.device("meta"):
        mine = _shapes(Talker(cfg.talker))
        theirs = _shapes(Qwen3OmniMoeTalkerForConditionalGeneration._from_config(ref_cfg.talker_config))
    assert mine == theirs
    assert "model.layers.0.mlp.experts.gate_up_proj" in mine and "model.layers.0.mlp.gate_proj.weight" not in mine


# ----------------------------------------------------------------------------------------------------------------
# Talker


def _talker_inputs(hidden: int, batch: int = 2, seq: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random embeddings and TM-RoPE positions whose T, H and W axes differ (as in audio/video spans)."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, seq, hidden, generator=gen)
    t = torch.arange(seq).expand(batch, seq) + torch.tensor([[0], [5]])[:batch]
    positions = torch.stack((t, t // 2 + 1, (3 * t) % 7))  # (3, batch, seq)
    return embeds, positions


def test_talker_forward_matches_reference(speech):
    ref = speech.reference.talker
    embeds, positions = _talker_inputs(speech.config.talker.text.hidden_size)
    with torch.no_grad():
        ref_hidden = ref.model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        ref_logits = ref.codec_head(ref_hidden)
        hidden, logits = speech.talker(embeds, positions)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert logits.std() > 0.5  # strong weights: a meaningful comparison


def test_talker_projections_match_reference(speech):
    ref = speech.reference.talker
    gen = torch.Generator().manual_seed(7)
    thinker_states = torch.randn(2, 5, speech.config.talker.thinker_hidden_size, generator=gen)
    with torch.no_grad():
        for mine, theirs in ((speech.talker.text_projection, ref.text_projection),
                             (speech.talker.hidden_projection, ref.hidden_projection)):
            torch.testing.assert_close(mine(thinker_states), theirs(thinker_states), atol=1e-5, rtol=1e-5)


def test_talker_cached_steps_match_reference(speech):
    """Prefill then single-token steps through the static cache equal the reference's full-sequence pass."""
    cfg = speech.config.talker
    embeds, positions = _talker_inputs(cfg.text.hidden_size, seed=1)
    batch, seq, _ = embeds.shape
    cache = LayerCaches(cfg.text, batch, seq + 3, torch.float32, torch.device("cpu"))
    keys = torch.arange(cache.max_len)
    pieces = []
    with torch.no_grad():
        ref_hidden = speech.reference.talker.model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        for start, end in ((0, seq - 2), (seq - 2, seq - 1), (seq - 1, seq)):
            slots = torch.arange(start, end).expand(batch, end - start)
            mask = (keys.view(1, 1, -1) <= slots.unsqueeze(-1)).unsqueeze(1)  # (batch, 1, n, max_len)
            hidden, _ = speech.talker(embeds[:, start:end], positions[:, :, start:end], mask, cache, slots)
            pieces.append(hidden)
    torch.testing.assert_close(torch.cat(pieces, dim=1), ref_hidden, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Code predictor


def _reference_frame(ref_talker, hidden: torch.Tensor, code0: torch.Tensor, groups: int):
    """The reference talker's per-step residual pass, as its prepare_inputs_for_generation runs it (greedy)."""
    code0_embed = ref_talker.get_input_embeddings()(code0.unsqueeze(1))  # (batch, 1, hidden)
    result = ref_talker.code_predictor.generate(
        inputs_embeds=torch.cat((hidden.unsqueeze(1), code0_embed), dim=1), max_new_tokens=groups - 1,
        do_sample=False, output_hidden_states=True, return_dict_in_generate=True)
    fed_back = [step[0] for step in result.hidden_states[1:]]  # each step's input embedding
    last = ref_talker.code_predictor.get_input_embeddings()[-1](result.sequences[:, -1:])
    next_embed = torch.cat([code0_embed, *fed_back, last], dim=1).sum(1)
    return result.sequences, next_embed


def test_code_predictor_greedy_matches_reference(speech):
    cfg, talker = speech.config.talker, speech.talker
    batch, frames = 2, 4
    ws = talker.code_predictor.workspace(batch)
    cache_ptrs = [t.data_ptr() for t in ws.cache.k + ws.cache.v]
    sampler = Sampler(SamplingConfig(), batch, cfg.code_predictor.vocab_size, torch.device("cpu"))
    embeds, positions = _talker_inputs(cfg.text.hidden_size, batch=batch, seq=frames, seed=2)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        hiddens, _ = talker(embeds, positions)
        for f in range(frames):  # one workspace reused across frames: stale keys must stay masked
            code0 = torch.randint(0, cfg.code_predictor.vocab_size, (batch,), generator=gen)
            ref_codes, ref_next = _reference_frame(speech.reference.talker, hiddens[:, f], code0, cfg.num_code_groups)
            codes, next_embed = talker.complete_frame(hiddens[:, f], code0, ws, sampler)
            assert codes.shape == (batch, cfg.num_code_groups)
            assert torch.equal(codes[:, 0], code0)
            assert torch.equal(codes[:, 1:], ref_codes), f"frame {f}"
            torch.testing.assert_close(next_embed, ref_next, atol=1e-4, rtol=1e-4)
    assert len(set(codes[0].tolist())) > 3  # codes vary: the heads and embeddings really differ per codebook
    assert [t.data_ptr() for t in ws.cache.k + ws.cache.v] == cache_ptrs


def test_code_predictor_sampling(speech):
    cfg, talker = speech.config.talker, speech.talker
    batch, vocab = 3, speech.config.talker.code_predictor.vocab_size
    ws = talker.code_predictor.workspace(batch)
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(batch, cfg.text.hidden_size, generator=gen)
    code0 = torch.randint(0, vocab, (batch,), generator=gen)

    def run(sampling: SamplingConfig, seed: int) -> torch.Tensor:
        sampler = Sampler(sampling, batch, vocab, torch.device("cpu"), seed=seed)
        with torch.no_grad():
            return talker.complete_frame(hidden, code0, ws, sampler)[0]

    greedy = run(SamplingConfig(), 0)
    assert torch.equal(run(SamplingConfig(do_sample=True, top_k=1), 0), greedy)
    reference_like = SamplingConfig(do_sample=True, top_k=50, top_p=0.8)
    first, again, other = run(reference_like, 1), run(reference_like, 1), run(reference_like, 2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert int(first.min()) >= 0 and int(first.max()) < vocab


# ----------------------------------------------------------------------------------------------------------------
# Code2Wav


def _codes(cfg, frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + frames)
    return torch.randint(0, cfg.codebook_size, (batch, cfg.num_quantizers, frames), generator=gen)


@pytest.mark.parametrize("frames", [1, 2, 71, 72, 73, 150])
def test_code2wav_decode_matches_reference(speech, frames):
    cfg = speech.config.code2wav
    codes = _codes(cfg, frames, batch=2 if frames == 2 else 1)
    with torch.no_grad():
        expected = speech.reference.code2wav(codes).squeeze(1)
        wav = speech.code2wav.decode(codes)
    assert wav.shape == (codes.shape[0], frames * cfg.samples_per_frame - RELEASED_LOOKAHEAD_SAMPLES)
    assert wav.shape[-1] == speech.code2wav.num_samples(frames)
    torch.testing.assert_close(wav, expected, atol=1e-4, rtol=0)
    if frames >= 71:  # a meaningful waveform: loud, and mostly not clipped
        assert wav.std() > 0.05 and (wav.abs() >= 1).float().mean() < 0.01


@pytest.fixture(scope="module")
def one_shot(speech):
    cache = {}

    def decode(frames: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if (frames, batch) not in cache:
            codes = _codes(speech.config.code2wav, frames, batch, seed=100)
            with torch.no_grad():
                cache[frames, batch] = codes, speech.code2wav.decode(codes)
        return cache[frames, batch]

    return decode


def _stream(model: Code2Wav, codes: torch.Tensor, chunks) -> tuple[torch.Tensor, list[int]]:
    stream, pieces, start = Code2WavStream(model), [], 0
    for size in chunks:
        pieces.append(stream.feed(codes[..., start:start + size]))
        start += size
    assert start >= codes.shape[-1]
    tail = stream.finish()
    return torch.cat(pieces + [tail], dim=-1), [p.shape[-1] for p in pieces] + [tail.shape[-1]]


@pytest.mark.parametrize("frames", [1, 2, 71, 72, 73, 400])
@pytest.mark.parametrize("chunk", [1, 3, 25])
def test_code2wav_stream_equals_one_shot(speech, one_shot, frames, chunk):
    codes, expected = one_shot(frames)
    got, sizes = _stream(speech.code2wav, codes, [chunk] * math.ceil(frames / chunk))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # every call emits all that is final: one-shot(frames so far) minus what came before; nothing held to the end
    spf = speech.config.code2wav.samples_per_frame
    assert sizes[0] == min(chunk, frames) * spf - RELEASED_LOOKAHEAD_SAMPLES and sizes[-1] == 0


def test_code2wav_stream_irregular_chunks_and_batch(speech, one_shot):
    codes, expected = one_shot(150, batch=2)
    got, sizes = _stream(speech.code2wav, codes, [0, 1, 7, 0, 64, 1, 2, 75])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert sizes[0] == 0 and sizes[3] == 0


def test_code2wav_stream_rejects_batch_change(speech, one_shot):
    codes, _ = one_shot(2, batch=2)
    stream = Code2WavStream(speech.code2wav)
    stream.feed(codes[..., :1])
    with pytest.raises(ValueError, match="batch"):
        stream.feed(codes[:1, :, 1:])
