"""Typed, validated, immutable configs parsed once from a checkpoint's `config.json`.

This module is the one home of token ids, sample rates and sampling defaults. Everything else in thinktalk
reads them from the dataclasses below; nothing re-parses JSON.

Layout of a Qwen3-Omni `config.json` (model_type `qwen3_omni_moe`):

    {top-level special token ids, enable_audio_output,
     thinker_config: {text_config, audio_config, vision_config, multimodal token ids},
     talker_config:  {text_config, code_predictor_config, codec ids, speaker_id},   # absent in thinker-only models
     code2wav_config: {...}}                                                         # absent in thinker-only models

Both rope spellings are accepted: `rope_parameters` (transformers 5.x) and `rope_theta` + `rope_scaling` (4.x).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .config_encoders import AudioEncoderConfig, VisionEncoderConfig, parse_audio_config, parse_vision_config
from .config_reader import ConfigError, FieldReader
from .config_sampling import (DEFAULT_TALKER_SAMPLING, DEFAULT_THINKER_SAMPLING, SamplingConfig,
                              code_predictor_sampling, parse_sampling)

__all__ = ["AudioEncoderConfig", "ConfigError", "OmniConfig", "SamplingConfig", "VisionEncoderConfig",
           "code_predictor_sampling", "load_config", "parse_config"]

MODEL_TYPE = "qwen3_omni_moe"


# ----------------------------------------------------------------------------------------------------------------
# Language-model stacks (thinker text, talker text, code predictor, code2wav transformer)


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    # (T, H, W) frequency counts of TM-RoPE; None for plain 1-D rotary. Sum == head_dim // 2.
    mrope_section: tuple[int, int, int] | None = None
    # Qwen3-Omni assigns the frequencies to T/H/W interleaved, Qwen2.5-Omni in three contiguous runs (layers/rotary.py).
    mrope_interleaved: bool = True


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int  # 0 means no shared expert
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class DecoderConfig:
    """A pre-norm decoder stack with GQA attention, q/k RMSNorm and a dense or sparse MLP.

    Qwen3 (the defaults): q/k RMSNorm, biases on all four projections only when `attention_bias`. Qwen2 / Qwen2.5:
    `qk_norm=False`, `qkv_bias=True` (biased q/k/v, unbiased o)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (used by layers that are not sparse)
    rms_norm_eps: float
    rope: RopeConfig
    hidden_act: str = "silu"
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    moe: MoeConfig | None = None
    qk_norm: bool = True
    qkv_bias: bool = False

    def layer_is_sparse(self, layer_idx: int) -> bool:
        moe = self.moe
        return (
            moe is not None
            and moe.num_experts > 0
            and layer_idx not in moe.mlp_only_layers
            and (layer_idx + 1) % moe.decoder_sparse_step == 0
        )


def _parse_rope(f: FieldReader, head_dim: int, want_mrope: bool) -> RopeConfig:
    if f.has("rope_parameters"):  # transformers 5.x
        params = f.sub("rope_parameters")
        theta = params.float("rope_theta", positive=True)
    else:  # transformers 4.x: rope_theta beside an optional rope_scaling holding mrope_section
        theta = f.float("rope_theta", positive=True)
        params = f.sub("rope_scaling") if f.has("rope_scaling") else FieldReader({}, f.file, f.prefix + "rope_scaling.")
    rope_type = params.str("rope_type", params.str("type", "default"))
    if rope_type != "default":
        raise params.fail("rope_type", f"must be 'default' (the only kind Qwen3-Omni uses), got {rope_type!r}")
    section = None
    if want_mrope:
        section = params.ints("mrope_section")
        if len(section) != 3 or sum(section) != head_dim // 2:
            raise params.fail("mrope_section", f"must be 3 counts summing to head_dim/2={head_dim // 2}, got {section}")
        section = (section[0], section[1], section[2])
    return RopeConfig(theta=theta, mrope_section=section)


def _parse_decoder(f: FieldReader, *, mrope: bool, experts_key: str = "num_experts", sparse: bool = True) -> DecoderConfig:
    hidden = f.int("hidden_size", minimum=1)
    heads = f.int("num_attention_heads", minimum=1)
    kv_heads = f.int("num_key_value_heads", heads, minimum=1)
    head_dim = f.int("head_dim", hidden // heads, minimum=2)
    if heads % kv_heads:
        raise f.fail("num_key_value_heads", f"({kv_heads}) must divide num_attention_heads ({heads})")
    if not f.has("head_dim") and hidden % heads:
        raise f.fail("num_attention_heads", f"({heads}) must divide hidden_size ({hidden})")
    if head_dim % 2:
        raise f.fail("head_dim", f"must be even for rotary embeddings, got {head_dim}")
    moe = None
    if sparse and f.int(experts_key, 0) > 0:
        top_k = f.int("num_experts_per_tok", minimum=1)
        num_experts = f.int(experts_key)
        if top_k > num_experts:
            raise f.fail("num_experts_per_tok", f"({top_k}) must not exceed {experts_key} ({num_experts})")
        moe = MoeConfig(
            num_experts=num_experts,
            top_k=top_k,
            expert_intermediate_size=f.int("moe_intermediate_size", minimum=1),
            norm_topk_prob=f.bool("norm_topk_prob"),
            shared_expert_intermediate_size=f.int("shared_expert_intermediate_size", 0, minimum=0),
            decoder_sparse_step=f.int("decoder_sparse_step", 1, minimum=1),
            mlp_only_layers=f.ints("mlp_only_layers", ()),
        )
    act = f.str("hidden_act", "silu")
    if act != "silu":
        raise f.fail("hidden_act", f"must be 'silu', got {act!r}")
    return DecoderConfig(
        vocab_size=f.int("vocab_size", minimum=1),
        hidden_size=hidden,
        num_layers=f.int("num_hidden_layers", minimum=1),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=f.int("intermediate_size", minimum=1),
        rms_norm_eps=f.float("rms_norm_eps", 1e-6, positive=True),
        rope=_parse_rope(f, head_dim, mrope),
        hidden_act=act,
        attention_bias=f.bool("attention_bias", False),
        max_position_embeddings=f.int("max_position_embeddings", 32768, minimum=1),
        moe=moe,
    )


# ----------------------------------------------------------------------------------------------------------------
# Thinker, talker, code2wav


@dataclass(frozen=True)
class ThinkerConfig:
    text: DecoderConfig
    audio: AudioEncoderConfig
    vision: VisionEncoderConfig
    audio_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    position_id_per_seconds: int
    seconds_per_chunk: int


def _parse_thinker(f: FieldReader) -> ThinkerConfig:
    text = _parse_decoder(f.sub("text_config"), mrope=True)
    audio = parse_audio_config(f.sub("audio_config"))
    vision = parse_vision_config(f.sub("vision_config"))
    for name, width in (("audio_config.output_dim", audio.output_dim), ("vision_config.out_hidden_size",
                                                                          vision.out_hidden_size)):
        if width != text.hidden_size:
            raise f.fail(name, f"({width}) must equal text_config.hidden_size ({text.hidden_size})")
    return ThinkerConfig(
        text=text,
        audio=audio,
        vision=vision,
        audio_token_id=f.int("audio_token_id"),
        audio_start_token_id=f.int("audio_start_token_id"),
        audio_end_token_id=f.int("audio_end_token_id", 151670),
        image_token_id=f.int("image_token_id"),
        video_token_id=f.int("video_token_id"),
        vision_start_token_id=f.int("vision_start_token_id", 151652),
        vision_end_token_id=f.int("vision_end_token_id", 151653),
        position_id_per_seconds=f.int("position_id_per_seconds", minimum=1),
        seconds_per_chunk=f.int("seconds_per_chunk", 2, minimum=1),
    )


@dataclass(frozen=True)
class TalkerConfig:
    text: DecoderConfig
    code_predictor: DecoderConfig
    num_code_groups: int
    thinker_hidden_size: int
    accept_hidden_layer: int
    codec_pad_id: int
    codec_bos_id: int
    codec_eos_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    speakers: tuple[tuple[str, int], ...]  # (lower-cased name, codec id), in config order
    position_id_per_seconds: int
    spatial_merge_size: int

    def speaker_id(self, name: str) -> int:
        table = dict(self.speakers)
        key = name.lower()
        if key not in table:
            raise ValueError(f"unknown voice {name!r}; available voices: {', '.join(table) or '(none)'}")
        return table[key]


def _parse_talker(f: FieldReader, thinker: ThinkerConfig) -> TalkerConfig:
    text_fields = f.sub("text_config")
    # transformers writes the talker's expert count as num_local_experts; older files may say num_experts.
    experts_key = "num_local_experts" if text_fields.has("num_local_experts") else "num_experts"
    text = _parse_decoder(text_fields, mrope=True, experts_key=experts_key)
    predictor = _parse_decoder(f.sub("code_predictor_config"), mrope=False, sparse=False)
    speakers = f.raw("speaker_id", {})
    if not isinstance(speakers, dict) or not all(isinstance(v, int) for v in speakers.values()):
        raise f.fail("speaker_id", f"must map voice names to codec ids, got {speakers!r}")
    groups = f.int("num_code_groups", minimum=2)
    if predictor.num_layers and f.sub("code_predictor_config").int("num_code_groups", groups) != groups:
        raise f.fail("code_predictor_config.num_code_groups", f"must equal num_code_groups ({groups})")
    accept = f.int("accept_hidden_layer", minimum=0)
    if accept > thinker.text.num_layers:
        raise f.fail("accept_hidden_layer", f"({accept}) exceeds the thinker's {thinker.text.num_layers} layers")
    thinker_hidden = f.int("thinker_hidden_size", minimum=1)
    if thinker_hidden != thinker.text.hidden_size:
        raise f.fail("thinker_hidden_size", f"({thinker_hidden}) must equal the thinker's hidden_size "
                                            f"({thinker.text.hidden_size})")
    return TalkerConfig(
        text=text,
        code_predictor=predictor,
        num_code_groups=groups,
        thinker_hidden_size=thinker_hidden,
        accept_hidden_layer=accept,
        codec_pad_id=f.int("codec_pad_id"),
        codec_bos_id=f.int("codec_bos_id"),
        codec_eos_id=f.int("codec_eos_token_id"),
        codec_nothink_id=f.int("codec_nothink_id"),
        codec_think_bos_id=f.int("codec_think_bos_id"),
        codec_think_eos_id=f.int("codec_think_eos_id"),
        speakers=tuple((k.lower(), v) for k, v in speakers.items()),
        position_id_per_seconds=f.int("position_id_per_seconds", thinker.position_id_per_seconds),
        spatial_merge_size=f.int("spatial_merge_size", thinker.vision.spatial_merge_size),
    )


@dataclass(frozen=True)
class Code2WavConfig:
    codebook_size: int
    num_quantizers: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int
    layer_scale_initial_scale: float
    upsample_rates: tuple[int, ...]  # decoder (vocoder) strides
    upsampling_ratios: tuple[int, ...]  # pre-decoder transposed-conv strides
    decoder_dim: int
    max_position_embeddings: int
    sample_rate: int = 24000

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * math.prod(self.upsampling_ratios)


def _parse_code2wav(f: FieldReader) -> Code2WavConfig:
    hidden, heads = f.int("hidden_size", minimum=1), f.int("num_attention_heads", minimum=1)
    if hidden % heads:
        raise f.fail("num_attention_heads", f"({heads}) must divide hidden_size ({hidden})")
    theta = f.sub("rope_parameters").float("rope_theta", positive=True) if f.has("rope_parameters") else \
        f.float("rope_theta", positive=True)
    return Code2WavConfig(
        codebook_size=f.int("codebook_size", minimum=1),
        num_quantizers=f.int("num_quantizers", minimum=1),
        hidden_size=hidden,
        num_layers=f.int("num_hidden_layers", minimum=1),
        num_heads=heads,
        num_kv_heads=f.int("num_key_value_heads", heads, minimum=1),
        intermediate_size=f.int("intermediate_size", minimum=1),
        rms_norm_eps=f.float("rms_norm_eps", 1e-5, positive=True),
        rope_theta=theta,
        sliding_window=f.int("sliding_window", minimum=1),
        layer_scale_initial_scale=f.float("layer_scale_initial_scale", 0.01),
        upsample_rates=f.ints("upsample_rates"),
        upsampling_ratios=f.ints("upsampling_ratios"),
        decoder_dim=f.int("decoder_dim", minimum=1),
        max_position_embeddings=f.int("max_position_embeddings", 8000, minimum=1),
    )


# ----------------------------------------------------------------------------------------------------------------
# The whole checkpoint


@dataclass(frozen=True)
class QuantizationSection:
    """`quantization_config` of a quantized checkpoint: its method, and the section as written, which the method's
    reader in thinktalk/quant/formats parses (the fields differ by method)."""

    method: str
    fields: dict = field(compare=False)


@dataclass(frozen=True)
class OmniConfig:
    thinker: ThinkerConfig
    talker: TalkerConfig | None  # None for thinker-only checkpoints (Thinking, Captioner)
    code2wav: Code2WavConfig | None
    im_start_token_id: int
    im_end_token_id: int
    system_token_id: int
    user_token_id: int
    assistant_token_id: int
    tts_pad_token_id: int
    tts_bos_token_id: int
    tts_eos_token_id: int
    thinker_sampling: SamplingConfig = DEFAULT_THINKER_SAMPLING
    talker_sampling: SamplingConfig = DEFAULT_TALKER_SAMPLING
    # Token ids that end the thinker's reply (im_end, plus any eos ids from generation_config.json).
    stop_token_ids: tuple[int, ...] = field(default=())
    quantization: QuantizationSection | None = None  # None: the checkpoint's weights are floats

    @property
    def has_audio_output(self) -> bool:
        return self.talker is not None and self.code2wav is not None


def parse_config(data: dict, file: Path | str = "config.json", generation: dict | None = None,
                 generation_file: Path | str = "generation_config.json") -> OmniConfig:
    f = FieldReader(data, file)
    model_type = f.str("model_type")
    if model_type != MODEL_TYPE:
        raise f.fail("model_type", f"must be {MODEL_TYPE!r} (a Qwen3-Omni checkpoint), got {model_type!r}")
    thinker = _parse_thinker(f.sub("thinker_config"))
    audio_out = f.bool("enable_audio_output", True) and f.has("talker_config") and f.has("code2wav_config")
    talker = _parse_talker(f.sub("talker_config"), thinker) if audio_out else None
    code2wav = _parse_code2wav(f.sub("code2wav_config")) if audio_out else None
    im_end = f.int("im_end_token_id", 151645)
    thinker_sampling, talker_sampling, stops = parse_generation(generation, generation_file, im_end,
                                                                DEFAULT_TALKER_SAMPLING)
    return OmniConfig(
        thinker=thinker,
        talker=talker,
        code2wav=code2wav,
        im_start_token_id=f.int("im_start_token_id", 151644),
        im_end_token_id=im_end,
        system_token_id=f.int("system_token_id", 8948),
        user_token_id=f.int("user_token_id", 872),
        assistant_token_id=f.int("assistant_token_id", 77091),
        tts_pad_token_id=f.int("tts_pad_token_id", 151671),
        tts_bos_token_id=f.int("tts_bos_token_id", 151672),
        tts_eos_token_id=f.int("tts_eos_token_id", 151673),
        thinker_sampling=thinker_sampling,
        talker_sampling=talker_sampling,
        stop_token_ids=stops,
        quantization=_parse_quantization(f),
    )


def parse_generation(generation: dict | None, generation_file: Path | str, im_end: int,
                     talker_default: SamplingConfig) -> tuple[SamplingConfig, SamplingConfig, tuple[int, ...]]:
    """`generation_config.json` (None: absent) -> (thinker sampling, talker sampling, the ids that end the thinker's
    reply: im_end, then the file's eos ids). Unset keys keep the reference's defaults (the talker's `talker_` keys
    over `talker_default`, which differs by family)."""
    if generation is None:
        return DEFAULT_THINKER_SAMPLING, talker_default, (im_end,)
    g = FieldReader(generation, generation_file)
    eos = g.raw("eos_token_id", [])
    eos = [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(e, int) for e in eos):
        raise g.fail("eos_token_id", f"must be an id or a list of ids, got {eos!r}")
    stops = [im_end] + [e for e in eos if e != im_end]
    return (parse_sampling(g, DEFAULT_THINKER_SAMPLING), parse_sampling(g, talker_default, prefix="talker_"),
            tuple(dict.fromkeys(stops)))


def _parse_quantization(f: FieldReader) -> QuantizationSection | None:
    if not f.has("quantization_config"):
        return None
    section = f.sub("quantization_config")
    return QuantizationSection(section.str("quant_method"), dict(section.data))


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: is not valid JSON ({error})") from None


def read_checkpoint_configs(checkpoint_dir: Path | str, family: str) -> tuple[dict, Path, dict | None, Path]:
    """(config.json, its path, generation_config.json or None, its path) of a checkpoint directory of `family`."""
    directory = Path(checkpoint_dir)
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise ConfigError(f"{directory}: is not a directory (expected a {family} checkpoint directory)")
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: missing (every checkpoint directory needs its config.json)")
    generation_file = directory / "generation_config.json"
    generation = _read_json(generation_file) if generation_file.is_file() else None
    return _read_json(config_file), config_file, generation, generation_file


def load_config(checkpoint_dir: Path | str) -> OmniConfig:
    """Parse `config.json` (and `generation_config.json` when present) of a checkpoint directory."""
    return parse_config(*read_checkpoint_configs(checkpoint_dir, "Qwen3-Omni"))
