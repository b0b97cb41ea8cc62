"""`hidden_act: quick_gelu` (x * sigmoid(1.702 x)), as the vision config of transformers' own tiny Qwen3-Omni test
model has it: the config accepts it, the activation equals the reference's, and a vision encoder built with it
matches the reference's encoder. An activation thinktalk does not compute is a ConfigError naming the field."""

import json
import math

import pytest
import torch

import checkpoints
from thinktalk.config import ConfigError, parse_config
from thinktalk.layers.activation import activation_by_name
from thinktalk.models.vision_encoder import VisionEncoder

transformers = pytest.importorskip("transformers")
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

VISION_PREFIX = "thinker.visual."
TOLERANCE = 1e-4


def quick_gelu_config() -> dict:
    config = checkpoints.tiny_config_dict(talker=False)
    config["thinker_config"]["text_config"].update(num_experts=4, num_hidden_layers=1, vocab_size=512)
    config["thinker_config"]["vision_config"]["hidden_act"] = "quick_gelu"
    return config


def test_quick_gelu_is_the_reference_activation():
    x = torch.linspace(-12, 12, 4097, dtype=torch.float64)
    ours, theirs = activation_by_name("quick_gelu")(x), ACT2FN["quick_gelu"](x)
    assert torch.equal(ours, theirs)
    assert torch.allclose(ours, x / (1 + torch.exp(-1.702 * x)))
    assert not torch.allclose(ours, torch.nn.functional.gelu(x), atol=1e-3)  # a different function from GELU


def test_a_vision_encoder_with_quick_gelu_matches_the_reference(tmp_path):
    torch.manual_seed(0)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**quick_gelu_config())).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # strong weights, so that the activation shapes the output
        for name, p in model.thinker.model.visual.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(noise if name.endswith("pos_embed.weight") else noise / math.sqrt(p[0].numel())
                    if p.dim() >= 2 else 0.1 * noise if name.endswith("bias") else 1 + 0.1 * noise)
    model.save_pretrained(tmp_path)
    config = parse_config(json.loads((tmp_path / "config.json").read_text()))
    assert config.thinker.vision.hidden_act == "quick_gelu"
    encoder = VisionEncoder(config.thinker.vision).eval()
    tensors = load_file(tmp_path / "model.safetensors")
    encoder.load_state_dict({k[len(VISION_PREFIX):]: v for k, v in tensors.items() if k.startswith(VISION_PREFIX)},
                            strict=True)
    grid = torch.tensor([[1, 4, 6]])
    pixels = torch.randn(24, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.thinker.model.visual(pixels, grid_thw=grid).pooler_output
        ours = encoder(pixels, grid).embeds
    assert expected.std() > 0.1
    assert (ours - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("where", ["vision_config", "audio_config"])
def test_an_unknown_encoder_activation_is_a_config_error_naming_the_field(where):
    config = quick_gelu_config()
    key = "hidden_act" if where == "vision_config" else "activation_function"
    config["thinker_config"][where][key] = "swish_of_unknown_kind"
    with pytest.raises(ConfigError, match=f"{key}.*quick_gelu.*swish_of_unknown_kind"):
        parse_config(config)
