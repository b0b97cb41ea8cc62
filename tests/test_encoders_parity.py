"""Parity of thinktalk's audio and vision encoders with the reference (transformers `qwen3_omni_moe`).

A tiny random Qwen3-Omni (float32, strong random weights so outputs are far from constant) is saved with
`save_pretrained`; its `thinker.audio_tower.*` and `thinker.visual.*` tensors are loaded into thinktalk's modules
with a strict state-dict load, and both implementations run on the same inputs.
"""

import json
import math

import checkpoints
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as reference_modeling

from thinktalk.config import parse_config
from thinktalk.layers.encoder_attention import PackedSequences
from thinktalk.models.audio_encoder import AudioEncoder, audio_token_count
from thinktalk.models.vision_encoder import VisionEncoder

FULL_CONFIG = checkpoints.FULL_CONFIG
AUDIO_PREFIX, VISION_PREFIX = "thinker.audio_tower.", "thinker.visual."
TOLERANCE = 1e-4


def tiny_config_dict() -> dict:
    """The suite's tiny config without the talker, its thinker trimmed further (the encoders are under test)."""
    c = checkpoints.tiny_config_dict(talker=False)
    c["thinker_config"]["text_config"].update(num_experts=4, num_hidden_layers=1, vocab_size=512)
    return c


def strong_init_(model: torch.nn.Module, seed: int) -> None:
    """Matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1), biases N(0, 0.1), position tables N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("pos_embed.weight"):
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(1 + 0.1 * noise)


def under_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(reference model, thinktalk OmniConfig, saved tensors) of one tiny random checkpoint."""
    torch.manual_seed(0)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**tiny_config_dict())).eval()
    strong_init_(model, seed=0)
    directory = tmp_path_factory.mktemp("tiny_omni")
    model.save_pretrained(directory)
    config = parse_config(json.loads((directory / "config.json").read_text()))
    return model, config, load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def audio_pair(checkpoint):
    model, config, tensors = checkpoint
    encoder = AudioEncoder(config.thinker.audio).eval()
    encoder.load_state_dict(under_prefix(tensors, AUDIO_PREFIX), strict=True)
    return model.thinker.model.audio_tower, encoder


@pytest.fixture(scope="module")
def vision_pair(checkpoint):
    model, config, tensors = checkpoint
    encoder = VisionEncoder(config.thinker.vision).eval()
    encoder.load_state_dict(under_prefix(tensors, VISION_PREFIX), strict=True)
    return model.thinker.model.visual, encoder


def assert_parity(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    assert ours.dtype == reference.dtype == torch.float32
    assert reference.std() > 0.1, "reference output is near-constant: the test would prove nothing"
    assert (ours - reference).abs().max().item() <= TOLERANCE


# --------------------------------------------------------------------------------------------------------------
# Names


def test_state_dict_names_match_checkpoint(checkpoint):
    _, config, tensors = checkpoint
    assert set(AudioEncoder(config.thinker.audio).state_dict()) == set(under_prefix(tensors, AUDIO_PREFIX))
    assert set(VisionEncoder(config.thinker.vision).state_dict()) == set(under_prefix(tensors, VISION_PREFIX))


def test_full_size_names_and_shapes_match_reference_on_meta():
    data = json.loads(FULL_CONFIG.read_text())
    config = parse_config(data, FULL_CONFIG)
    reference_config = Qwen3OmniMoeConfig(**data).thinker_config
    with torch.device("meta"):
        pairs = [
            (AudioEncoder(config.thinker.audio),
             reference_modeling.Qwen3OmniMoeAudioEncoder(reference_config.audio_config)),
            (VisionEncoder(config.thinker.vision),
             reference_modeling.Qwen3OmniMoeVisionEncoder(reference_config.vision_config)),
        ]
    for ours, reference in pairs:
        ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert ours_shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        assert all(v.is_meta for v in ours.state_dict().values())
    audio_params = sum(p.numel() for p in pairs[0][0].parameters())
    vision_params = sum(p.numel() for p in pairs[1][0].parameters())
    assert audio_params > 5e8 and vision_params > 5e8  # the real sizes, not the tiny ones


# --------------------------------------------------------------------------------------------------------------
# Audio


def test_audio_token_count_matches_reference():
    n_window = 50
    frames = list(range(1, 2001)) + [2399, 2400, 2401, 29_999, 30_000, 240_000, 240_001]
    expected = reference_modeling._get_feat_extract_output_lengths(torch.tensor(frames), n_window).tolist()
    assert [audio_token_count(n, n_window) for n in frames] == expected
    assert audio_token_count(100, n_window) == 13 and audio_token_count(240_000, n_window) == 31_200


@pytest.mark.parametrize("lengths", [
    [57],  # shorter than one chunk, alone: padded only to itself
    [100],  # exactly one chunk
    [250],  # not a multiple of 100 frames
    [1234],  # > 800 frames: two attention windows (104 + 57 tokens)
    [2450],  # three windows of 104 tokens and a last window of 7 tokens (50 frames)
    [950, 333],  # two audios of different lengths in one call
    [57, 1234],  # a short audio beside a long one: every chunk padded to 100 frames
    [40, 77, 3],  # only short audios
])
def test_audio_parity(audio_pair, lengths):
    reference, ours = audio_pair
    generator = torch.Generator().manual_seed(sum(lengths))
    features = [torch.randn(128, n, generator=generator) for n in lengths]
    with torch.no_grad():
        expected = reference(torch.cat(features, dim=1), feature_lens=torch.tensor(lengths)).last_hidden_state
        outputs = ours(features)
    assert [o.shape[0] for o in outputs] == [audio_token_count(n, 50) for n in lengths]
    assert_parity(torch.cat(outputs), expected)


def test_audio_batching_keeps_audios_apart(audio_pair):
    """Audios of 1 s or more give the same tokens alone or together: no attention across audios."""
    _, ours = audio_pair
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(128, n, generator=generator) for n in (901, 100, 1630)]
    with torch.no_grad():
        together = ours(features)
        alone = [ours([f])[0] for f in features]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_audio_forty_minutes(audio_pair):
    """240,000 frames (40 min): 31,200 tokens in 300 windows of 104 tokens (800 frames). Attention never spans
    more than a window, so each window's tokens equal those of its 800 frames encoded alone."""
    _, ours = audio_pair
    frames, window_frames = 240_000, 800
    features = torch.randn(128, frames, generator=torch.Generator().manual_seed(2))
    windows = PackedSequences.from_lengths(ours.attention_windows([audio_token_count(frames, 50)]), "cpu")
    assert windows.max_length == 104 and windows.num_tokens == 31_200 and windows.groups[0].shape == (300, 104)
    with torch.no_grad():
        (out,) = ours([features])
        assert out.shape == (31_200, 64) and out.isfinite().all()
        for j in (0, 137, 299):
            (piece,) = ours([features[:, j * window_frames:(j + 1) * window_frames]])
            torch.testing.assert_close(out[j * 104:(j + 1) * 104], piece, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Vision


@pytest.mark.parametrize("grids", [
    [[1, 4, 4]],  # smaller than the 8x8 position table: downsampled
    [[1, 6, 10]],  # not square
    [[1, 12, 16]],  # larger than the table: upsampled
    [[1, 2, 2], [1, 8, 6]],  # two images in one call
    [[2, 4, 6]],  # a video: two frames attend separately, positions repeat per frame
    [[1, 4, 4], [3, 2, 4]],  # an image and a video together
])
def test_vision_parity(vision_pair, grids):
    reference, ours = vision_pair
    grid_thw = torch.tensor(grids)
    num_patches = int(grid_thw.prod(-1).sum())
    pixels = torch.randn(num_patches, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(num_patches))
    with torch.no_grad():
        expected = reference(pixels, grid_thw=grid_thw)
        out = ours(pixels, grid_thw)
    assert out.embeds.shape == (num_patches // 4, 64)
    assert_parity(out.embeds, expected.pooler_output)
    assert len(out.deepstack) == len(expected.deepstack_features) == 2
    for feature, expected_feature in zip(out.deepstack, expected.deepstack_features):
        assert_parity(feature, expected_feature)


def test_vision_rejects_inconsistent_inputs(vision_pair):
    _, ours = vision_pair
    with pytest.raises(ValueError, match="pixel_patches"):
        ours(torch.zeros(15, 3 * 2 * 16 * 16), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(torch.zeros(12, 3 * 2 * 16 * 16), torch.tensor([[1, 3, 4]]))
