"""Qwen2.5-Omni's audio encoder (Whisper-large-v3 style): log-mel frames in, one token per 40 ms out.

    mel (num_mel_bins, frames), for each audio
      -> chunks of 2 * n_window frames (2 s; the last one shorter), each encoded on its own:
         conv1 (k3, pad 1) -> GELU, zeroed past the chunk's end -> conv2 (k3, stride 2, pad 1) -> GELU
                                                                          (chunk, frames / 2, d_model)
      -> + sinusoidal positions, restarting at 0 in every chunk
      -> [x + Attn(LN(x)) ; x + fc2(GELU(fc1(LN(x))))] x num_layers, attention within each chunk
      -> per audio, its chunks end to end: average pool pairs of steps (an odd last step is dropped)
      -> ln_post -> proj                                                  (audio_token_count(frames), output_dim)

Why no padding effect: the reference pads every chunk of a call to the longest, but zeroes conv1's output past each
chunk's end, and both convs read zeros there anyway (their own padding), so a chunk's valid outputs never see the
padding. Chunks therefore run in groups of any size with the same result; groups bound the memory of long audio.
`audio_bos_eos_token` is a checkpoint tensor the reference builds but never uses; it is kept so loading is strict.
Module names match the checkpoint keys under `thinker.audio_tower.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config_qwen2_5 import Qwen25AudioConfig, audio_steps, audio_token_count
from ...layers.encoder_attention import PackedSequences, group_by_budget
from ..audio_encoder import LAYER_NORM_EPS, AudioEncoderLayer, sinusoid_positions

CONV_KERNEL, CONV_PADDING, CONV2_STRIDE = 3, 1, 2
# Chunks (2 s each) run through the stem and the layers together, at most this many at a time: at the released widths
# (d_model 1280, ffn 5120) about 0.3 GB of float32 activations, whatever the length of the audio.
GROUP_CHUNKS = 64


def chunk_lengths(frames: int, n_window: int) -> list[int]:
    """Frames per chunk of one audio: full chunks of 2 * n_window, then the rest (none when it divides)."""
    full, rest = divmod(frames, 2 * n_window)
    return [2 * n_window] * full + ([rest] if rest else [])


class Qwen25AudioEncoder(nn.Module):
    def __init__(self, cfg: Qwen25AudioConfig):
        super().__init__()
        self.cfg = cfg
        conv = dict(kernel_size=CONV_KERNEL, padding=CONV_PADDING)
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, cfg.d_model, **conv)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, stride=CONV2_STRIDE, **conv)
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg, key_bias=False) for _ in range(cfg.num_layers))
        self.ln_post = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.proj = nn.Linear(cfg.d_model, cfg.output_dim)

    def forward(self, features: list[torch.Tensor], group_chunks: int | None = GROUP_CHUNKS) -> list[torch.Tensor]:
        """features[i]: (num_mel_bins, frames_i) log-mel -> [(audio_token_count(frames_i), output_dim)]."""
        for i, mel in enumerate(features):
            if mel.dim() != 2 or mel.shape[0] != self.cfg.num_mel_bins or mel.shape[1] < 1:
                raise ValueError(f"audio {i}: features must be (num_mel_bins={self.cfg.num_mel_bins}, frames >= 1), "
                                 f"got {tuple(mel.shape)}")
        chunks = [(i, start, length) for i, mel in enumerate(features)
                  for start, length in self._chunk_starts(mel.shape[1])]
        steps = [audio_steps(length) for _, _, length in chunks]
        hidden = self.conv1.weight.new_empty(sum(steps), self.cfg.d_model)  # every audio's steps, end to end
        done, first = 0, 0
        for group in group_by_budget([1] * len(chunks), group_chunks):
            part = chunks[first:first + len(group)]
            out = self._encode_chunks([features[i][:, s:s + n] for i, s, n in part])
            hidden[done:done + out.shape[0]] = out
            done, first = done + out.shape[0], first + len(group)
        return self._pool_and_project(hidden, [mel.shape[1] for mel in features])

    def _chunk_starts(self, frames: int) -> list[tuple[int, int]]:
        lengths = chunk_lengths(frames, self.cfg.n_window)
        starts = [sum(lengths[:k]) for k in range(len(lengths))]
        return list(zip(starts, lengths))

    def _encode_chunks(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Chunks (mel, n_k) -> their valid steps end to end after the stem and the layers: (sum audio_steps(n_k), d)."""
        weight = self.conv1.weight
        longest = max(c.shape[1] for c in chunks)
        # (chunks, mel, longest), zero-padded; `valid` marks each chunk's own frames
        x = torch.stack([F.pad(c.to(weight.device, weight.dtype), (0, longest - c.shape[1])) for c in chunks])
        lengths = torch.tensor([c.shape[1] for c in chunks], device=weight.device)
        valid = torch.arange(longest, device=weight.device)[None, :] < lengths[:, None]  # (chunks, longest)
        h = F.gelu(self.conv1(x)) * valid[:, None, :].to(x.dtype)
        h = F.gelu(self.conv2(h)).transpose(1, 2)  # (chunks, steps, d_model)
        h = h + sinusoid_positions(h.shape[1], h.shape[2], h.device).to(h.dtype)
        steps = [audio_steps(c.shape[1]) for c in chunks]
        kept = torch.arange(h.shape[1], device=h.device)[None, :] < torch.tensor(steps, device=h.device)[:, None]
        x = h[kept]  # (sum of steps, d_model), chunk after chunk
        packing = PackedSequences.from_lengths(steps, x.device)  # attention within each chunk
        for layer in self.layers:
            x = layer(x, packing)
        return x

    def _pool_and_project(self, hidden: torch.Tensor, frames: list[int]) -> list[torch.Tensor]:
        """Average each audio's steps in pairs (0, 1), (2, 3), ...; then ln_post and proj, per audio."""
        outputs, start = [], 0
        for count in frames:
            steps = audio_steps(count)
            pairs = audio_token_count(count)
            own = hidden[start:start + 2 * pairs].view(pairs, 2, -1)
            outputs.append(self.proj(self.ln_post(own.mean(dim=1))))
            start += steps
        return outputs
