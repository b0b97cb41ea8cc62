"""Tiny random Qwen2.5-Omni checkpoints written by the reference (transformers `qwen2_5_omni`), for parity tests.

The reference's config classes default to old 7B-like widths (REFERENCE.md), so every test builds from the explicit
tiny config below: token ids as released, widths tiny. Weights are re-drawn stronger than the reference's init
(N(0, 1/sqrt(fan_in)) matrices, norms near 1), so that logits are well separated and greedy decoding is meaningful;
Token2Wav gets its own gains so the ODE stays well conditioned and the wave mostly inside [-1, 1] (the vocoder
clamps there, and clamped samples would compare equal for free).

`save_pretrained` writes the released on-disk layout; the speaker file `spk_dict.pt` (which the reference reads in
`from_pretrained`, not in `save_pretrained`) is written next to it with random voices.
"""

from __future__ import annotations

import atexit
import copy
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from checkpoints import strengthen_
from torch import nn

from thinktalk.demo_qwen2_5 import randomize_token2wav_

VOICES = ("Chelsie", "Ethan")  # the released voices; the first is the reference's default
VOICE_BOS_TOKENS = {"Chelsie": 151870, "Ethan": 151871}  # text ids the talker is prompted with, one per voice
REFERENCE_MEL_FRAMES = 40  # frames of each voice's reference mel (the released ones are longer; any length works)

# Token2Wav gains of the tiny random model (see strengthen_token2wav_).


def _mrope(section: list[int]) -> dict:
    return {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section}


def tiny_config_dict(*, talker: bool = True) -> dict:
    """A Qwen2.5-Omni config at tiny widths: structure and special token ids as released."""
    text = dict(vocab_size=152064, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, rope_parameters=_mrope([2, 3, 3]),
                tie_word_embeddings=False, dtype="float32")
    audio = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 output_dim=64, n_window=100, max_source_positions=1500, dtype="float32")
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=64,
                  fullatt_block_indexes=[1, 3], hidden_act="silu", dtype="float32")
    config = dict(
        model_type="qwen2_5_omni", enable_audio_output=talker, dtype="float32",
        thinker_config=dict(text_config=text, audio_config=audio, vision_config=vision, audio_token_index=151646,
                            image_token_index=151655, video_token_index=151656, vision_start_token_id=151652,
                            vision_end_token_id=151653, position_id_per_seconds=25, seconds_per_chunk=2,
                            audio_start_token_id=151647, audio_end_token_id=151648, user_token_id=872,
                            tie_word_embeddings=False, dtype="float32"),
    )
    if talker:
        config["talker_config"] = dict(
            vocab_size=8448, embedding_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            rope_parameters=_mrope([2, 3, 3]), max_position_embeddings=32768, spatial_merge_size=2,
            position_id_per_seconds=25, seconds_per_chunk=2, dtype="float32")
        config["token2wav_config"] = dict(
            dit_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, head_dim=16, ff_mult=2,
                            emb_dim=16, block_size=24, look_ahead_layers=[1], look_backward_layers=[0, 2],
                            repeats=2, num_embeds=8193, mel_dim=80, enc_emb_dim=8, enc_dim=8,
                            enc_channels=[16, 16, 16, 16, 48], enc_kernel_sizes=[5, 3, 3, 3, 1],
                            enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=8, enc_res2net_scale=2,
                            enc_se_channels=8, dropout=0.0),
            bigvgan_config=dict(mel_dim=80, upsample_initial_channel=128, resblock_kernel_sizes=[3, 7, 11],
                                resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                                upsample_rates=[5, 3, 2, 2, 2, 2], upsample_kernel_sizes=[11, 7, 4, 4, 4, 4]))
    return copy.deepcopy(config)


def strengthen_token2wav_(token2wav: nn.Module, seed: int) -> None:
    """Token2Wav on top of strengthen_: every path matters, nothing diverges: the demo checkpoint's own recipe
    (matrices N(0, 1/fan_in), embeddings N(0, 1), SnakeBeta away from identity, the DiT's AdaLN-Zero gates drawn at
    ~0.3 instead of zero, each vocoder stage and the output conv scaled so the wave is O(0.3))."""
    randomize_token2wav_(token2wav, seed)


def codes_in_range_(model, config: dict) -> None:
    """Zero the talker's codec_head rows of the ids Token2Wav has no embedding for (above dit num_embeds), except
    the two stop codes. The trained talker never emits them; a random one does, and the reference then indexes
    past the DiT's codec table (IndexError). A zero row's logit (0) never wins against the random rows' maximum."""
    talker, dit = config["talker_config"], config["token2wav_config"]["dit_config"]
    stops = {talker.get("tts_codec_pad_token_id", 8292), talker.get("tts_codec_end_token_id", 8294)}
    with torch.no_grad():
        for code in range(dit["num_embeds"] + 1, talker["vocab_size"]):
            if code not in stops:
                model.talker.codec_head.weight[code] = 0.0


def build_reference(config: dict, seed: int = 0):
    """A float32 reference Qwen2_5OmniForConditionalGeneration with strong random weights."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig(**copy.deepcopy(config))).float().eval()
    strengthen_(model, seed)
    if model.has_talker:
        strengthen_token2wav_(model.token2wav, seed + 1)
        codes_in_range_(model, config)
    return model


def random_voices(config: dict, seed: int) -> dict[str, dict]:
    """spk_dict.pt's layout: per voice its talker prompt token, `cond` (1, enc_emb_dim) and `ref_mel`
    (1, frames, mel_dim)."""
    dit = config["token2wav_config"]["dit_config"]
    gen = torch.Generator().manual_seed(seed)
    return {name: {"bos_token": VOICE_BOS_TOKENS[name],
                   "cond": torch.randn(1, dit["enc_emb_dim"], generator=gen),
                   "ref_mel": torch.randn(1, REFERENCE_MEL_FRAMES, dit["mel_dim"], generator=gen) - 4.0}
            for name in VOICES}


def save_reference(model, directory: Path, voices: dict | None) -> Path:
    """save_pretrained, plus the speaker file the released checkpoints ship beside the weights."""
    model.save_pretrained(directory)
    if voices is not None:
        torch.save(voices, directory / "spk_dict.pt")
        model.speaker_map = dict(voices)
    return directory


@dataclass
class TinyQwen25:
    path: Path
    reference: object  # transformers Qwen2_5OmniForConditionalGeneration, float32, eval, voices loaded
    config: dict
    voices: dict[str, dict]  # what spk_dict.pt holds


@functools.cache
def tiny_checkpoint() -> TinyQwen25:
    """One tiny random checkpoint per test session (about 4 s to build and save), removed at exit."""
    config = tiny_config_dict()
    reference = build_reference(config, seed=0)
    voices = random_voices(config, seed=3)
    directory = Path(tempfile.mkdtemp(prefix="tiny_qwen2_5_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    save_reference(reference, directory / "ckpt", voices)
    pass_talker_mask_(reference)
    return TinyQwen25(directory / "ckpt", reference, config, voices)


def load_thinktalk(path: Path, audio_output: bool = True):
    """thinktalk's Qwen2.5-Omni network from a checkpoint directory: config parsed, weights loaded strictly."""
    from thinktalk.config_qwen2_5 import load_qwen2_5_config
    from thinktalk.models.qwen2_5.omni import SPEECH_PREFIXES, Qwen25OmniModel
    from thinktalk.weights import load_weights

    cfg = load_qwen2_5_config(path)
    model = Qwen25OmniModel(cfg, audio_output).eval()
    load_weights(model, path, torch.device("cpu"), torch.float32, show_progress=False,
                 skip_prefixes=() if audio_output else SPEECH_PREFIXES)
    return model


def pass_talker_mask_(reference) -> None:
    """Reference defect (transformers 5.23): generate() drops an all-ones attention mask before the first forward,
    and the talker adds the codec pad/bos embeddings to its prompt and computes its TM-RoPE positions only when it
    is given a mask. So the reference's own generate() prompts the talker without them (unlike Qwen's release). This
    pre-hook hands the talker the all-ones mask it was meant to get (batch 1, no padding: it changes nothing else)."""

    def give_mask(module, args, kwargs):
        if kwargs.get("attention_mask") is None:
            cache = kwargs.get("past_key_values")
            past = 0 if cache is None else cache.get_seq_length()
            inputs = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
            kwargs["attention_mask"] = torch.ones(inputs.shape[0], past + inputs.shape[1], dtype=torch.long)
        return args, kwargs

    reference.talker.register_forward_pre_hook(give_mask, with_kwargs=True, prepend=True)
