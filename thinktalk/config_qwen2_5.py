"""Typed, validated, immutable configs of a Qwen2.5-Omni checkpoint (`model_type: "qwen2_5_omni"`).

Layout of its `config.json`:

    {enable_audio_output,
     thinker_config:   {text_config, audio_config, vision_config, multimodal token ids, position_id_per_seconds},
     talker_config:    {a dense decoder's fields, embedding_size, tts_text_* / tts_codec_* ids},   # absent: thinker only
     token2wav_config: {dit_config, bigvgan_config}}                                               # absent: thinker only

The language models are dense Qwen2.5 decoders: `DecoderConfig` with biased q/k/v, no q/k norm, and TM-RoPE in its
contiguous layout (config.py, layers/rotary.py). Both rope spellings are accepted, as for Qwen3-Omni. Errors name the
file and the dotted field. The voices are not here: they live in the checkpoint's `spk_dict.pt` (models/qwen2_5/voices.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import (DEFAULT_THINKER_SAMPLING, DecoderConfig, SamplingConfig, _parse_decoder, parse_generation,
                     read_checkpoint_configs)
from .config_reader import ConfigError, FieldReader

__all__ = ["ConfigError", "Qwen25OmniConfig", "load_qwen2_5_config", "parse_qwen2_5_config"]

MODEL_TYPE = "qwen2_5_omni"
# Sections that only the other family's config.json has: a config holding one was mixed up.
OTHER_FAMILY_SECTIONS = {"code2wav_config": "Qwen3-Omni's vocoder section (qwen3_omni_moe)"}


# ----------------------------------------------------------------------------------------------------------------
# Encoders


@dataclass(frozen=True)
class Qwen25AudioConfig:
    """The Whisper-large-v3-style encoder: conv stem, chunked attention, 2x average pooling."""

    num_mel_bins: int
    d_model: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    output_dim: int
    n_window: int  # chunks of 2 * n_window mel frames (2 s) are encoded independently
    max_source_positions: int  # sinusoidal positions per chunk (after the stride-2 conv)
    activation: str = "gelu"


@dataclass(frozen=True)
class Qwen25VisionConfig:
    """The Qwen2.5-VL ViT: 14-px patches, RMSNorm, SwiGLU, window attention with a few full-attention blocks."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int  # pixels per attention-window side
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    rope_theta: float = 10000.0

    @property
    def window_tokens(self) -> int:
        """Merged tokens per attention-window side (112 px / 14 px / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


def audio_steps(frames: int) -> int:
    """Audio encoder steps after its stride-2 conv (the reference's `(n - 1) // 2 + 1`); 0 stays 0."""
    return (frames - 1) // 2 + 1 if frames > 0 else 0


def audio_token_count(frames: int) -> int:
    """Audio placeholder tokens for `frames` mel frames: the stride-2 conv, then pairs averaged (an odd last step is
    dropped); it does not depend on the encoder's chunking. Here so that processing and models, which must agree,
    share one definition without importing each other."""
    steps = audio_steps(frames)
    return (steps - 2) // 2 + 1 if steps >= 2 else 0


def _parse_audio(f: FieldReader) -> Qwen25AudioConfig:
    d_model, heads = f.int("d_model", minimum=1), f.int("encoder_attention_heads", minimum=1)
    if d_model % heads:
        raise f.fail("encoder_attention_heads", f"({heads}) must divide d_model ({d_model})")
    if d_model % 2 or d_model < 4:
        raise f.fail("d_model", f"must be even and >= 4 (sinusoidal positions), got {d_model}")
    n_window, positions = f.int("n_window", minimum=1), f.int("max_source_positions", minimum=1)
    if n_window > positions:  # a chunk of 2 * n_window frames gives n_window positions after the stride-2 conv
        raise f.fail("n_window", f"({n_window}) exceeds max_source_positions ({positions})")
    return Qwen25AudioConfig(
        num_mel_bins=f.int("num_mel_bins", minimum=1), d_model=d_model, num_layers=f.int("encoder_layers", minimum=1),
        num_heads=heads, ffn_dim=f.int("encoder_ffn_dim", minimum=1), output_dim=f.int("output_dim", minimum=1),
        n_window=n_window, max_source_positions=positions, activation=f.str("activation_function", "gelu"))


def _parse_vision(f: FieldReader) -> Qwen25VisionConfig:
    hidden, heads = f.int("hidden_size", minimum=1), f.int("num_heads", minimum=1)
    if hidden % heads or (hidden // heads) % 4:
        raise f.fail("num_heads", f"({heads}) must divide hidden_size ({hidden}) into heads of a multiple of 4 "
                                  "(2-D rotary positions)")
    depth, patch, merge = f.int("depth", minimum=1), f.int("patch_size", minimum=1), f.int("spatial_merge_size", 2, minimum=1)
    window = f.int("window_size", minimum=1)
    if window % (patch * merge):
        raise f.fail("window_size", f"({window}) must be a multiple of patch_size * spatial_merge_size ({patch * merge})")
    full = f.ints("fullatt_block_indexes", ())
    if any(not 0 <= i < depth for i in full):
        raise f.fail("fullatt_block_indexes", f"must lie in [0, depth={depth}), got {full}")
    if f.str("hidden_act", "silu") != "silu":
        raise f.fail("hidden_act", f"must be 'silu' (the ViT's SwiGLU), got {f.str('hidden_act')!r}")
    theta = f.sub("rope_parameters").float("rope_theta", 10000.0, positive=True) if f.has("rope_parameters") else 10000.0
    return Qwen25VisionConfig(
        depth=depth, hidden_size=hidden, intermediate_size=f.int("intermediate_size", minimum=1), num_heads=heads,
        in_channels=f.int("in_channels", f.int("in_chans", 3), minimum=1), patch_size=patch,
        temporal_patch_size=f.int("temporal_patch_size", minimum=1), spatial_merge_size=merge, window_size=window,
        out_hidden_size=f.int("out_hidden_size", minimum=1), fullatt_block_indexes=full, rope_theta=theta)


def _parse_dense(f: FieldReader) -> DecoderConfig:
    """A Qwen2.5 decoder: Qwen3's fields, biased q/k/v, no q/k norm, contiguous TM-RoPE, no sliding window."""
    if f.bool("use_sliding_window", False):
        raise f.fail("use_sliding_window", "is true, but Qwen2.5-Omni's released models attend fully and thinktalk "
                                           "does not implement sliding-window layers")
    cfg = _parse_decoder(f, mrope=True, sparse=False)
    return replace(cfg, qk_norm=False, qkv_bias=True, rope=replace(cfg.rope, mrope_interleaved=False))


# ----------------------------------------------------------------------------------------------------------------
# Thinker and talker


@dataclass(frozen=True)
class MropeLayout:
    """What TM-RoPE position ids are computed from (processing/qwen2_5_positions.py): the placeholder ids and the
    time scale. The thinker and the talker each carry their own copy, as the reference reads each from its config."""

    audio_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    position_id_per_seconds: int  # 25: one temporal id per 40 ms, one audio token
    seconds_per_chunk: int  # audio and video interleave in chunks of this many seconds
    spatial_merge_size: int


def _parse_layout(f: FieldReader, merge: int) -> MropeLayout:
    def either(new: str, old: str, default: int) -> int:  # the configs spell ids as *_token_id or *_token_index
        return f.int(new) if f.has(new) else f.int(old, default)

    return MropeLayout(
        audio_token_id=either("audio_token_id", "audio_token_index", 151646),
        audio_start_token_id=f.int("audio_start_token_id", 151647), audio_end_token_id=f.int("audio_end_token_id", 151648),
        image_token_id=either("image_token_id", "image_token_index", 151655),
        video_token_id=either("video_token_id", "video_token_index", 151656),
        vision_start_token_id=f.int("vision_start_token_id", 151652),
        vision_end_token_id=f.int("vision_end_token_id", 151653),
        position_id_per_seconds=f.int("position_id_per_seconds", 25, minimum=1),
        seconds_per_chunk=f.int("seconds_per_chunk", 2, minimum=1), spatial_merge_size=merge)


@dataclass(frozen=True)
class Qwen25ThinkerConfig:
    text: DecoderConfig
    audio: Qwen25AudioConfig
    vision: Qwen25VisionConfig
    layout: MropeLayout
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens (no lm_head tensor on disk)


def _parse_thinker(f: FieldReader) -> Qwen25ThinkerConfig:
    text = _parse_dense(f.sub("text_config"))
    audio, vision = _parse_audio(f.sub("audio_config")), _parse_vision(f.sub("vision_config"))
    for name, width in (("audio_config.output_dim", audio.output_dim),
                        ("vision_config.out_hidden_size", vision.out_hidden_size)):
        if width != text.hidden_size:
            raise f.fail(name, f"({width}) must equal text_config.hidden_size ({text.hidden_size})")
    return Qwen25ThinkerConfig(text=text, audio=audio, vision=vision,
                               layout=_parse_layout(f, vision.spatial_merge_size),
                               tie_word_embeddings=f.bool("tie_word_embeddings", False))


@dataclass(frozen=True)
class Qwen25TalkerConfig:
    """The dense talker: thinker-width inputs -> thinker_to_talker_proj -> decoder -> codec_head (one code a step)."""

    text: DecoderConfig  # vocab_size is the codec vocabulary
    embedding_size: int  # width of its inputs and of its codec embedding: the thinker's hidden size
    codec_bos_id: int  # tts_codec_start: the last prompt position
    codec_eos_id: int  # tts_codec_end
    codec_pad_id: int  # tts_codec_pad: the one before it; also ends generation, as the reference's eos list does
    codec_mask_id: int  # tts_codec_mask: what the prompt's thinker positions hold (they get no codec embedding)
    text_bos_id: int  # tts_text_start (the voices' own bos tokens replace it in the prompt)
    text_eos_id: int  # tts_text_end: fed once the reply's text has run out
    text_pad_id: int  # tts_text_pad: fed after that, for as long as the talker speaks
    layout: MropeLayout

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Codes that end the speech: the reference's talker_eos_token_id [pad, end]."""
        return (self.codec_pad_id, self.codec_eos_id)


def _parse_talker(f: FieldReader, thinker: Qwen25ThinkerConfig) -> Qwen25TalkerConfig:
    text = _parse_dense(f)
    embedding = f.int("embedding_size", minimum=1)
    if embedding != thinker.text.hidden_size:
        raise f.fail("embedding_size", f"({embedding}) must equal the thinker's hidden_size ({thinker.text.hidden_size})")
    codec = {name: f.int(f"tts_codec_{name}_token_id", default) for name, default in
             (("start", 8293), ("end", 8294), ("pad", 8292), ("mask", 8296))}
    for name, value in codec.items():
        if not 0 <= value < text.vocab_size:
            raise f.fail(f"tts_codec_{name}_token_id", f"({value}) must lie in the codec vocabulary [0, {text.vocab_size})")
    text_ids = {name: f.int(f"tts_text_{name}_token_id", default) for name, default in
                (("start", 151860), ("end", 151861), ("pad", 151859))}
    for name, value in text_ids.items():
        if not 0 <= value < thinker.text.vocab_size:
            raise f.fail(f"tts_text_{name}_token_id", f"({value}) must lie in the thinker's vocabulary "
                                                      f"[0, {thinker.text.vocab_size})")
    return Qwen25TalkerConfig(
        text=text, embedding_size=embedding, codec_bos_id=codec["start"], codec_eos_id=codec["end"],
        codec_pad_id=codec["pad"], codec_mask_id=codec["mask"], text_bos_id=text_ids["start"],
        text_eos_id=text_ids["end"], text_pad_id=text_ids["pad"],
        layout=_parse_layout(f, f.int("spatial_merge_size", thinker.vision.spatial_merge_size, minimum=1)))


# ----------------------------------------------------------------------------------------------------------------
# Token2Wav: DiT (codes -> mel) and BigVGAN (mel -> 24 kHz wave)


@dataclass(frozen=True)
class DiTConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    ff_mult: int
    emb_dim: int  # codec embedding width
    block_size: int  # mel frames per attention block
    look_ahead_layers: tuple[int, ...]  # layers that also see the next block
    look_backward_layers: tuple[int, ...]  # layers that also see the previous block
    repeats: int  # mel frames per codec token
    num_embeds: int  # codec ids 0 .. num_embeds (one more row than the ids: the table has num_embeds + 1)
    mel_dim: int
    enc_emb_dim: int  # width of a voice's `cond` vector
    enc_dim: int  # width of the ECAPA embedding of a voice's reference mel
    enc_channels: tuple[int, ...]
    enc_kernel_sizes: tuple[int, ...]
    enc_dilations: tuple[int, ...]
    enc_attention_channels: int
    enc_res2net_scale: int
    enc_se_channels: int
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768  # the longest mel the reference decodes


@dataclass(frozen=True)
class BigVGANConfig:
    mel_dim: int
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]

    @property
    def samples_per_frame(self) -> int:
        out = 1
        for rate in self.upsample_rates:
            out *= rate
        return out


@dataclass(frozen=True)
class Token2WavConfig:
    dit: DiTConfig
    bigvgan: BigVGANConfig
    # The flow-matching sampler's settings, the reference's Token2Wav defaults (not in any config file).
    num_steps: int = 10  # time points of the ODE grid: num_steps - 1 RK4 steps
    guidance_scale: float = 0.5  # classifier-free guidance: cond + (cond - uncond) * scale
    sway_coefficient: float = -1.0  # t -> t + s * (cos(pi t / 2) - 1 + t): finer steps near t = 0
    sample_rate: int = 24000


def _parse_dit(f: FieldReader) -> DiTConfig:
    channels = f.ints("enc_channels")
    kernels, dilations = f.ints("enc_kernel_sizes"), f.ints("enc_dilations")
    if len(channels) < 2 or not len(channels) == len(kernels) == len(dilations):
        raise f.fail("enc_channels", f"enc_channels, enc_kernel_sizes and enc_dilations must have one equal length "
                                     f">= 2, got {len(channels)}, {len(kernels)}, {len(dilations)}")
    scale = f.int("enc_res2net_scale", minimum=1)
    if any(c % scale for c in channels[:-1]):
        raise f.fail("enc_res2net_scale", f"({scale}) must divide the SE-Res2Net channels {channels[:-1]}")
    layers = f.int("num_hidden_layers", minimum=1)
    reach = {name: f.ints(name) for name in ("look_ahead_layers", "look_backward_layers")}
    for name, indexes in reach.items():
        if any(not 0 <= i < layers for i in indexes):
            raise f.fail(name, f"must lie in [0, num_hidden_layers={layers}), got {indexes}")
    theta = f.sub("rope_parameters").float("rope_theta", positive=True) if f.has("rope_parameters") else \
        f.float("rope_theta", 10000.0, positive=True)
    heads, head_dim = f.int("num_attention_heads", minimum=1), f.int("head_dim", minimum=2)
    if head_dim % 2:
        raise f.fail("head_dim", f"must be even for rotary embeddings, got {head_dim}")
    return DiTConfig(
        hidden_size=f.int("hidden_size", minimum=1), num_layers=layers, num_heads=heads, head_dim=head_dim,
        ff_mult=f.int("ff_mult", minimum=1), emb_dim=f.int("emb_dim", minimum=1), block_size=f.int("block_size", minimum=1),
        look_ahead_layers=reach["look_ahead_layers"], look_backward_layers=reach["look_backward_layers"],
        repeats=f.int("repeats", minimum=1), num_embeds=f.int("num_embeds", minimum=1), mel_dim=f.int("mel_dim", minimum=1),
        enc_emb_dim=f.int("enc_emb_dim", minimum=1), enc_dim=f.int("enc_dim", minimum=1), enc_channels=channels,
        enc_kernel_sizes=kernels, enc_dilations=dilations,
        enc_attention_channels=f.int("enc_attention_channels", minimum=1), enc_res2net_scale=scale,
        enc_se_channels=f.int("enc_se_channels", minimum=1), rope_theta=theta,
        max_position_embeddings=f.int("max_position_embeddings", 32768, minimum=1))


def _parse_bigvgan(f: FieldReader, mel_dim: int) -> BigVGANConfig:
    rates, kernels = f.ints("upsample_rates"), f.ints("upsample_kernel_sizes")
    if len(rates) != len(kernels) or not rates:
        raise f.fail("upsample_kernel_sizes", f"must have one kernel per upsample rate {rates}, got {kernels}")
    if any((k - s) % 2 or k < s for s, k in zip(rates, kernels)):
        raise f.fail("upsample_kernel_sizes", f"each kernel minus its rate must be even and >= 0 (so a stage gives "
                                              f"exactly rate samples per input), got {kernels} for rates {rates}")
    initial = f.int("upsample_initial_channel", minimum=1)
    if initial % 2 ** len(rates):
        raise f.fail("upsample_initial_channel", f"({initial}) must be divisible by 2**{len(rates)} (channels halve "
                                                 "at every stage)")
    res_kernels = f.ints("resblock_kernel_sizes")
    dilations = f.raw("resblock_dilation_sizes")
    if not isinstance(dilations, list) or len(dilations) != len(res_kernels) or not all(
            isinstance(d, list) and len(d) == 3 and all(isinstance(x, int) and x >= 1 for x in d) for d in dilations):
        raise f.fail("resblock_dilation_sizes", f"must hold three dilations per resblock kernel {res_kernels}, "
                                                f"got {dilations!r}")
    if any(k % 2 == 0 for k in res_kernels):
        raise f.fail("resblock_kernel_sizes", f"must be odd ('same' padding), got {res_kernels}")
    vocoder_mel = f.int("mel_dim", minimum=1)
    if vocoder_mel != mel_dim:
        raise f.fail("mel_dim", f"({vocoder_mel}) must equal dit_config.mel_dim ({mel_dim})")
    return BigVGANConfig(mel_dim=vocoder_mel, upsample_initial_channel=initial, resblock_kernel_sizes=res_kernels,
                         resblock_dilation_sizes=tuple(tuple(d) for d in dilations), upsample_rates=rates,
                         upsample_kernel_sizes=kernels)


def _parse_token2wav(f: FieldReader) -> Token2WavConfig:
    dit = _parse_dit(f.sub("dit_config"))
    return Token2WavConfig(dit=dit, bigvgan=_parse_bigvgan(f.sub("bigvgan_config"), dit.mel_dim))


# ----------------------------------------------------------------------------------------------------------------
# The whole checkpoint

# The reference's talker sampling (Qwen2_5OmniForConditionalGeneration.generate's defaults; no generation_config
# key holds them). thinktalk ends the speech at `Qwen25TalkerConfig.stop_ids`, as its eos list does.
DEFAULT_TALKER_SAMPLING = SamplingConfig(do_sample=True, temperature=0.9, top_k=40, top_p=0.8,
                                         repetition_penalty=1.05, max_new_tokens=4096)
# The system prompt the talker was trained with; the reference warns when speech is asked for under another one.
SPEECH_SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                        "perceiving auditory and visual inputs, as well as generating text and speech.")


@dataclass(frozen=True)
class Qwen25OmniConfig:
    thinker: Qwen25ThinkerConfig
    talker: Qwen25TalkerConfig | None  # None: thinker only (enable_audio_output false, or no talker section)
    token2wav: Token2WavConfig | None
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    system_token_id: int = 8948
    user_token_id: int = 872
    assistant_token_id: int = 77091
    thinker_sampling: SamplingConfig = DEFAULT_THINKER_SAMPLING
    talker_sampling: SamplingConfig = DEFAULT_TALKER_SAMPLING
    stop_token_ids: tuple[int, ...] = field(default=())  # end the thinker's reply: im_end plus generation eos ids

    @property
    def has_audio_output(self) -> bool:
        return self.talker is not None and self.token2wav is not None


def parse_qwen2_5_config(data: dict, file: Path | str = "config.json", generation: dict | None = None,
                         generation_file: Path | str = "generation_config.json") -> Qwen25OmniConfig:
    f = FieldReader(data, file)
    model_type = f.str("model_type")
    if model_type != MODEL_TYPE:
        raise f.fail("model_type", f"must be {MODEL_TYPE!r} (a Qwen2.5-Omni checkpoint), got {model_type!r}")
    for section, what in OTHER_FAMILY_SECTIONS.items():
        if f.has(section):
            raise f.fail(section, f"is {what}; a {MODEL_TYPE} checkpoint has token2wav_config instead (mixed-up "
                                  "config.json?)")
    thinker = _parse_thinker(f.sub("thinker_config"))
    audio_out = f.bool("enable_audio_output", True) and f.has("talker_config") and f.has("token2wav_config")
    talker = _parse_talker(f.sub("talker_config"), thinker) if audio_out else None
    token2wav = _parse_token2wav(f.sub("token2wav_config")) if audio_out else None
    im_end = f.int("im_end_token_id", 151645)
    thinker_sampling, talker_sampling, stops = parse_generation(generation, generation_file, im_end,
                                                                DEFAULT_TALKER_SAMPLING)
    return Qwen25OmniConfig(
        thinker=thinker, talker=talker, token2wav=token2wav, im_start_token_id=f.int("im_start_token_id", 151644),
        im_end_token_id=im_end, system_token_id=f.int("system_token_id", 8948), user_token_id=f.int("user_token_id", 872),
        assistant_token_id=f.int("assistant_token_id", 77091), thinker_sampling=thinker_sampling,
        talker_sampling=talker_sampling, stop_token_ids=stops)


# The families a checkpoint's config.json may name, by model_type.
FAMILIES = {"qwen3_omni_moe": "Qwen3-Omni", MODEL_TYPE: "Qwen2.5-Omni"}
# Sections only a Qwen2.5-Omni config.json has: a qwen3_omni_moe config holding one was mixed up.
QWEN2_5_ONLY_SECTIONS = {"token2wav_config": "Qwen2.5-Omni's Token2Wav section (qwen2_5_omni)"}


def checkpoint_model_type(checkpoint_dir: Path | str) -> str:
    """config.json's model_type when it names a supported family (FAMILIES) and holds no section of the other
    family; else a ConfigError naming the field, the value and what is supported."""
    data, file, _, _ = read_checkpoint_configs(checkpoint_dir, " or ".join(FAMILIES.values()))
    f = FieldReader(data, file)
    model_type = f.str("model_type", "")
    if model_type not in FAMILIES:
        supported = ", ".join(f"{name!r} ({family})" for name, family in FAMILIES.items())
        raise f.fail("model_type", f"is {model_type!r}; thinktalk runs {supported}")
    if model_type != MODEL_TYPE:
        for section, what in QWEN2_5_ONLY_SECTIONS.items():
            if f.has(section):
                raise f.fail(section, f"is {what}, but model_type is {model_type!r} (mixed-up config.json?)")
    return model_type


def load_qwen2_5_config(checkpoint_dir: Path | str) -> Qwen25OmniConfig:
    """Parse `config.json` (and `generation_config.json` when present) of a Qwen2.5-Omni checkpoint directory."""
    return parse_qwen2_5_config(*read_checkpoint_configs(checkpoint_dir, "Qwen2.5-Omni"))
