"""The encoders' configs (the thinker's audio and vision towers), parsed from `thinker_config`'s `audio_config` and
`vision_config` sections of a Qwen3-Omni `config.json` (see config.py for the whole layout)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config_reader import FieldReader
from .layers.activation import ACTIVATIONS


@dataclass(frozen=True)
class AudioEncoderConfig:
    num_mel_bins: int
    d_model: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    downsample_hidden_size: int
    output_dim: int
    n_window: int  # half a chunk in mel frames: chunks are 2 * n_window frames (1 s)
    n_window_infer: int  # attention window in mel frames
    conv_chunksize: int
    max_source_positions: int
    activation: str = "gelu"


@dataclass(frozen=True)
class VisionEncoderConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str = "gelu_pytorch_tanh"


def _activation(f: FieldReader, name: str, default: str) -> str:
    """An encoder's activation, one of those layers/activation.py computes."""
    act = f.str(name, default)
    if act not in ACTIVATIONS:
        raise f.fail(name, f"must be one of {', '.join(sorted(ACTIVATIONS))}, got {act!r}")
    return act


def parse_audio_config(f: FieldReader) -> AudioEncoderConfig:
    d_model, heads = f.int("d_model", minimum=1), f.int("encoder_attention_heads", minimum=1)
    if d_model % heads:
        raise f.fail("encoder_attention_heads", f"({heads}) must divide d_model ({d_model})")
    return AudioEncoderConfig(
        num_mel_bins=f.int("num_mel_bins", minimum=1),
        d_model=d_model,
        num_layers=f.int("encoder_layers", minimum=1),
        num_heads=heads,
        ffn_dim=f.int("encoder_ffn_dim", minimum=1),
        downsample_hidden_size=f.int("downsample_hidden_size", minimum=1),
        output_dim=f.int("output_dim", minimum=1),
        n_window=f.int("n_window", minimum=1),
        n_window_infer=f.int("n_window_infer", minimum=1),
        conv_chunksize=f.int("conv_chunksize", 500, minimum=1),
        max_source_positions=f.int("max_source_positions", minimum=1),
        activation=_activation(f, "activation_function", "gelu"),
    )


def parse_vision_config(f: FieldReader) -> VisionEncoderConfig:
    hidden, heads = f.int("hidden_size", minimum=1), f.int("num_heads", minimum=1)
    if hidden % heads:
        raise f.fail("num_heads", f"({heads}) must divide hidden_size ({hidden})")
    depth = f.int("depth", minimum=1)
    deepstack = f.ints("deepstack_visual_indexes", ())
    if any(not 0 <= i < depth for i in deepstack):
        raise f.fail("deepstack_visual_indexes", f"must lie in [0, depth={depth}), got {deepstack}")
    positions = f.int("num_position_embeddings", minimum=1)
    if math.isqrt(positions) ** 2 != positions:
        raise f.fail("num_position_embeddings", f"must be a square number (a 2-D grid), got {positions}")
    return VisionEncoderConfig(
        depth=depth,
        hidden_size=hidden,
        intermediate_size=f.int("intermediate_size", minimum=1),
        num_heads=heads,
        in_channels=f.int("in_channels", 3, minimum=1),
        patch_size=f.int("patch_size", minimum=1),
        temporal_patch_size=f.int("temporal_patch_size", minimum=1),
        spatial_merge_size=f.int("spatial_merge_size", minimum=1),
        out_hidden_size=f.int("out_hidden_size", minimum=1),
        num_position_embeddings=positions,
        deepstack_visual_indexes=deepstack,
        hidden_act=_activation(f, "hidden_act", "gelu_pytorch_tanh"),
    )
