"""The AuT audio encoder of the Thinker: log-mel frames in, one token every 80 ms out.

    mel (num_mel_bins, frames), for each audio
      -> chunks of 2*n_window frames (1 s), zero-padded to the longest chunk of the call
      -> [Conv2d 3x3 stride 2 -> GELU] x 3 over (mel, time)       (chunks, C, mel/8, time/8)
      -> conv_out: flatten (C, mel/8) per time step -> d_model      (chunks, time/8, d_model)
      -> + sinusoidal positions, restarting at 0 in every chunk
      -> keep the valid (non-padding) time steps, audios packed one after another     (tokens, d_model)
      -> [x + Attn(LN(x)) ; x + fc2(GELU(fc1(LN(x))))] x num_layers, attention within windows of
         n_window_infer frames (8 s), block-diagonal, never across audios
      -> ln_post -> proj1 -> GELU -> proj2                                               (tokens, output_dim)

Module names match the checkpoint keys under `thinker.audio_tower.`. The sinusoidal table is computed, not stored.

Padding to the longest chunk is what the reference does, and it is visible in the output: at a short chunk's
last valid step the second and third convolutions read the previous convolution's output at padded steps,
GELU(bias) rather than zero. So an audio shorter than one chunk, run with only other short audios, differs from
the same audio run beside one of 1 s or more (where every chunk is padded to the full 2*n_window). thinktalk
follows the reference exactly; batching audios of 1 s or more together changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioEncoderConfig
from ..shapes import CONV_KERNEL, CONV_PADDING, CONV_STRIDE, audio_token_count, downsampled_length
from ..layers.activation import activation_by_name
from ..layers.encoder_attention import PackedSequences, group_by_budget, packed_attention, stop_if_asked

SINUSOID_MAX_TIMESCALE = 10000.0  # longest wavelength of the sinusoidal positions (as in Whisper)
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which the checkpoint was trained with
# Memory bounds for long audio; neither changes the result. The stem runs at most STEM_GROUP_CHUNKS chunks (1 s
# each) at a time: at the released widths (480 channels) the first convolution's output and its GELU take about
# 0.3 GB of bf16 per 50 chunks, where the checkpoint's conv_chunksize (500) would take 3 GB. The layers run whole
# attention windows in groups of at most GROUP_TOKENS tokens (about 5 minutes of audio; about 0.2 GB of bf16
# activations at d_model 1280, ffn 5120), so 40 minutes need no more than 5.
STEM_GROUP_CHUNKS = 50
GROUP_TOKENS = 4096


def sinusoid_positions(length: int, channels: int, device: torch.device) -> torch.Tensor:
    """(length, channels) float32: [sin | cos] of position / timescale, timescales geometric in 1..10000."""
    half = channels // 2
    log_increment = math.log(SINUSOID_MAX_TIMESCALE) / (half - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(half, dtype=torch.float, device=device))
    angles = torch.arange(length, device=device)[:, None] * inv_timescales[None, :]  # (length, half)
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)


class AudioAttention(nn.Module):
    """Whisper-style encoder attention; `key_bias=False` for encoders whose k_proj has no bias (Qwen2.5-Omni's).

    Reads d_model and num_heads from `cfg`, so Qwen2.5-Omni's audio config (same field names) builds it too."""

    def __init__(self, cfg: AudioEncoderConfig, key_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.d_model // cfg.num_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=key_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)

    def forward(self, x: torch.Tensor, windows: PackedSequences) -> torch.Tensor:
        tokens = x.shape[0]
        # (tokens, d_model) -> (tokens, heads, head_dim) each
        q, k, v = (p(x).view(tokens, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(packed_attention(q, k, v, windows).reshape(tokens, -1))


class AudioEncoderLayer(nn.Module):
    """Pre-norm Whisper encoder layer; reads d_model, num_heads, ffn_dim and activation from `cfg`."""

    def __init__(self, cfg: AudioEncoderConfig, key_bias: bool = True):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.self_attn = AudioAttention(cfg, key_bias)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.act = activation_by_name(cfg.activation)

    def forward(self, x: torch.Tensor, windows: PackedSequences) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), windows)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        if cfg.d_model % 2 or cfg.d_model < 4:
            raise ValueError(f"audio d_model must be even and >= 4 for sinusoidal positions, got {cfg.d_model}")
        if cfg.n_window_infer < 2 * cfg.n_window:
            raise ValueError(f"audio n_window_infer ({cfg.n_window_infer}) must cover at least one chunk of "
                             f"2*n_window = {2 * cfg.n_window} frames")
        if downsampled_length(2 * cfg.n_window) > cfg.max_source_positions:
            raise ValueError(f"a chunk of {2 * cfg.n_window} frames exceeds max_source_positions "
                             f"({cfg.max_source_positions})")
        self.cfg = cfg
        channels = cfg.downsample_hidden_size
        conv = dict(kernel_size=CONV_KERNEL, stride=CONV_STRIDE, padding=CONV_PADDING)
        self.conv2d1 = nn.Conv2d(1, channels, **conv)
        self.conv2d2 = nn.Conv2d(channels, channels, **conv)
        self.conv2d3 = nn.Conv2d(channels, channels, **conv)
        self.conv_out = nn.Linear(channels * downsampled_length(cfg.num_mel_bins), cfg.d_model, bias=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.ln_post = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.proj1 = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj2 = nn.Linear(cfg.d_model, cfg.output_dim)
        self.act = activation_by_name(cfg.activation)

    @property
    def chunk_frames(self) -> int:
        return 2 * self.cfg.n_window

    @property
    def window_tokens(self) -> int:
        """Tokens per attention window: n_window_infer frames (a whole number of chunks) = 104 tokens for 8 s."""
        return downsampled_length(self.chunk_frames) * (self.cfg.n_window_infer // self.chunk_frames)

    def forward(self, features: list[torch.Tensor], group_tokens: int | None = GROUP_TOKENS,
                should_stop: Callable[[], bool] | None = None) -> list[torch.Tensor]:
        """features[i]: (num_mel_bins, frames_i) log-mel -> [(audio_token_count(frames_i), output_dim)].

        The layers run whole attention windows in groups of at most `group_tokens` tokens (None = all at once);
        `should_stop` is asked before every group after the first, and True raises errors.Cancelled."""
        self._check(features)
        chunks, chunk_frames = self._chunk(features)  # (chunks, mel, longest chunk), (chunks,)
        x = self._embed_chunks(chunks)  # (chunks, steps, d_model)
        # Keep each chunk's valid steps: chunk-major, so audios stay packed one after another in time order.
        valid = torch.tensor([downsampled_length(n) for n in chunk_frames], device=x.device)
        x = x[torch.arange(x.shape[1], device=x.device)[None, :] < valid[:, None]]  # (tokens, d_model)
        counts = [audio_token_count(f.shape[1], self.cfg.n_window) for f in features]
        out = x.new_empty(x.shape[0], self.cfg.output_dim)
        start = 0
        for group in group_by_budget(self.attention_windows(counts), group_tokens):
            stop_if_asked(should_stop, start > 0, "audio")
            end = start + sum(group)
            out[start:end] = self._run_layers(x[start:end], group)
            start = end
        return list(out.split(counts))

    def _run_layers(self, x: torch.Tensor, windows: list[int]) -> torch.Tensor:
        """(tokens, d_model) of whole attention windows (lengths `windows`) -> (tokens, output_dim)."""
        packing = PackedSequences.from_lengths(windows, x.device)
        for layer in self.layers:
            x = layer(x, packing)
        return self.proj2(self.act(self.proj1(self.ln_post(x))))

    def _check(self, features: list[torch.Tensor]) -> None:
        if not features:
            raise ValueError("AudioEncoder needs at least one audio")
        for i, f in enumerate(features):
            if f.dim() != 2 or f.shape[0] != self.cfg.num_mel_bins or f.shape[1] < 1:
                raise ValueError(f"audio {i}: expected log-mel features of shape ({self.cfg.num_mel_bins}, "
                                 f"frames >= 1), got {tuple(f.shape)}")

    def _chunk(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Split every audio into 2*n_window-frame chunks (the last may be shorter); pad all to the longest."""
        size = self.chunk_frames
        padded, chunk_frames = [], []
        for f in features:
            frames = f.shape[1]
            num_chunks = -(-frames // size)
            # (mel, frames) -> zero-pad to whole chunks -> (chunks, mel, size)
            whole = F.pad(f, (0, num_chunks * size - frames)).reshape(f.shape[0], num_chunks, size)
            padded.append(whole.transpose(0, 1))
            chunk_frames += [size] * (num_chunks - 1) + [frames - (num_chunks - 1) * size]
        longest = max(chunk_frames)
        return torch.cat(padded)[:, :, :longest], chunk_frames

    def _embed_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """(chunks, mel, frames) -> (chunks, downsampled frames, d_model), sinusoidal positions added."""
        dtype = self.conv2d1.weight.dtype
        out = []
        # The first convolution's output is the largest activation (C x mel/2 x frames/2 per chunk): run the
        # stem over a bounded number of chunks at a time so memory stays bounded for long audio.
        for group in chunks.split(min(self.cfg.conv_chunksize, STEM_GROUP_CHUNKS)):
            h = F.gelu(self.conv2d1(group.unsqueeze(1).to(dtype)))  # (n, C, mel/2, frames/2)
            h = F.gelu(self.conv2d2(h))  # (n, C, mel/4, frames/4)
            h = F.gelu(self.conv2d3(h))  # (n, C, mel/8, frames/8)
            n, c, mel, steps = h.shape
            out.append(self.conv_out(h.permute(0, 3, 1, 2).reshape(n, steps, c * mel)))  # (n, steps, d_model)
        x = torch.cat(out)
        return x + sinusoid_positions(x.shape[1], x.shape[2], x.device).to(x.dtype)

    def attention_windows(self, token_counts: list[int]) -> list[int]:
        """Each audio's tokens cut into attention windows of window_tokens; the last window takes the rest."""
        window = self.window_tokens
        lengths = []
        for count in token_counts:
            full, rest = divmod(count, window)
            lengths += [window] * full + ([rest] if rest else [])
        return lengths

