"""How many KV-cache tokens fit: a pure planner over byte counts, computed from the config, never measured.

    available = free device bytes once the weights are loaded (CUDA: torch.cuda.mem_get_info), or a budget
    available - headroom - max(encoder peak, prefill chunk peak)      transient, reused by the allocator
              = tokens * (thinker KV + talker KV + prompt state)      per cache slot, every row of the batch

The encoders run one group of frames / windows at a time and the prefill one chunk at a time (their tunables
live next to their code), so their peaks are fixed numbers, not functions of the media's length. What does grow
with the prompt is counted per token: the prompt's embeddings, the hidden states kept for the talker and the
deepstack features (counted for every token, as if every token were visual: an upper bound). The talker gets as
many slots as the thinker: its prompt carries the user turn the thinker read, plus about one frame per text token.
The activation peaks are estimates from the tensor shapes (the largest tensors alive at once), not measurements.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import AudioEncoderConfig, DecoderConfig, OmniConfig, VisionEncoderConfig
from ..models import audio_encoder, vision_encoder
from .thinker_runner import PREFILL_CHUNK

MEMINFO = "/proc/meminfo"  # Linux: MemTotal / MemAvailable, in kB
HEADROOM_FRACTION = 0.03  # of the available bytes: allocator fragmentation, sampler and decode-step temporaries
FLOAT32_BYTES, BOOL_BYTES, LONG_BYTES = 4, 1, 8
GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes by purpose and the cache slots they leave (all counts for the whole batch)."""

    available_bytes: int  # free once the weights are loaded
    weights_bytes: int
    encoder_peak_bytes: int
    prefill_peak_bytes: int
    headroom_bytes: int
    bytes_per_token: int  # thinker KV + talker KV + prompt state, per cache slot
    tokens: int  # cache slots over the whole batch, thinker and talker alike
    max_len: int  # slots per row: tokens // batch

    def describe(self) -> str:
        rows = [("available after weights", self.available_bytes), ("encoder peak", self.encoder_peak_bytes),
                ("prefill chunk peak", self.prefill_peak_bytes), ("headroom", self.headroom_bytes),
                ("KV + prompt state", self.tokens * self.bytes_per_token)]
        lines = [f"  {name:26} {n / GIB:8.2f} GiB" for name, n in rows]
        return "\n".join(lines + [f"  {'bytes per cache slot':26} {self.bytes_per_token:8d}",
                                  f"  {'cache slots (max_len)':26} {self.tokens:8d} ({self.max_len} per row)"])


def kv_bytes_per_token(text: DecoderConfig, dtype_bytes: int) -> int:
    """K and V of every layer for one cache slot: 2 * layers * kv_heads * head_dim * bytes."""
    return 2 * text.num_layers * text.num_kv_heads * text.head_dim * dtype_bytes


def prompt_state_bytes_per_token(cfg: OmniConfig, dtype_bytes: int) -> int:
    """What a prefill holds per prompt token besides the cache: embeddings, the hidden states kept for the talker,
    one deepstack feature per level (as if the token were visual), positions (3 float32) and the token id."""
    hidden = cfg.thinker.text.hidden_size
    levels = len(cfg.thinker.vision.deepstack_visual_indexes)
    return hidden * dtype_bytes * (2 + levels) + 3 * FLOAT32_BYTES + LONG_BYTES


def vision_group_peak_bytes(vision: VisionEncoderConfig, group_patches: int, dtype_bytes: int) -> int:
    """One group of frames in a vision block: the attention half holds x, LN(x), qkv, q and k rotated in float32
    and back, and the attention output; the MLP half x, fc1 and its GELU. Plus the group's pixel patches and its
    float32 position and rotary tables, and the merged outputs (a quarter as many rows, 4x as wide)."""
    h, head_dim = vision.hidden_size, vision.hidden_size // vision.num_heads
    attention = h * dtype_bytes * (1 + 1 + 3 + 2 + 1) + 2 * h * FLOAT32_BYTES
    mlp = h * dtype_bytes + 2 * vision.intermediate_size * dtype_bytes
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    tables = (h + 2 * head_dim) * FLOAT32_BYTES + patch * (dtype_bytes + FLOAT32_BYTES)
    merged = 2 * h * dtype_bytes  # (patches/4, 4h), LN'd and through the first linear
    return group_patches * (max(attention, mlp) + tables + merged)


def audio_peak_bytes(audio: AudioEncoderConfig, dtype_bytes: int) -> int:
    """The larger of the stem (a group of chunks: the first convolution's output and its GELU) and the layers
    (a group of tokens: x, LN(x), q, k, v, attention output, fc1 and its GELU)."""
    half = -(-audio.num_mel_bins // 2) * -(-2 * audio.n_window // 2)  # a stride-2 convolution's (mel, time)
    stem = audio_encoder.STEM_GROUP_CHUNKS * 2 * audio.downsample_hidden_size * half * dtype_bytes
    layers = audio_encoder.GROUP_TOKENS * (6 * audio.d_model + 2 * audio.ffn_dim) * dtype_bytes
    return max(stem, layers)


def prefill_chunk_peak_bytes(text: DecoderConfig, batch: int, chunk: int, keys: int, dtype_bytes: int) -> int:
    """One prefill chunk of `chunk` positions attending `keys` cache slots, the larger of its two halves, plus the
    residual stream. Attention: q (projected, rotated), the (chunk, keys) mask and its additive form, and on CUDA
    k and v expanded to every query head (see layers/attention.py). MoE: the gathered rows (tokens * top_k), their
    gate/up products, SwiGLU and down projections, and the float32 router probabilities."""
    rows = batch * chunk
    hidden = text.hidden_size
    residual = 3 * rows * hidden * dtype_bytes  # x, its norm, the sublayer output
    q = 2 * rows * text.num_heads * text.head_dim * dtype_bytes
    mask = chunk * keys * (BOOL_BYTES + dtype_bytes)
    expanded_kv = 2 * batch * text.num_heads * keys * text.head_dim * dtype_bytes
    attention = q + mask + expanded_kv
    moe = text.moe
    if moe is None:
        ffn = rows * 3 * text.intermediate_size * dtype_bytes
    else:
        assigned = rows * moe.top_k
        ffn = (assigned * (2 * hidden + 3 * moe.expert_intermediate_size) * dtype_bytes
               + rows * moe.num_experts * FLOAT32_BYTES)
    return residual + max(attention, ffn)


def plan_memory(cfg: OmniConfig, dtype: torch.dtype, weights_bytes: int, total_bytes: int,
                free_bytes: int | None = None, *, batch: int = 1, prefill_chunk: int | None = PREFILL_CHUNK,
                max_prompt: int | None = None, talker: bool = True,
                group_patches: int = vision_encoder.GROUP_PATCHES) -> MemoryPlan:
    """total_bytes: the device's (or the budget's) size; free_bytes: free once the weights are loaded (None: total
    minus weights). max_prompt: the longest prompt a chunk may attend (None: the text model's position limit).
    Raises ValueError naming the numbers when the weights or the fixed reserves do not fit."""
    if weights_bytes > total_bytes:
        raise ValueError(f"the weights ({weights_bytes / GIB:.2f} GiB, {weights_bytes} bytes) do not fit in the "
                         f"device ({total_bytes / GIB:.2f} GiB, {total_bytes} bytes)")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    available = total_bytes - weights_bytes if free_bytes is None else free_bytes
    size = torch.empty((), dtype=dtype).element_size()
    text = cfg.thinker.text
    keys = max_prompt if max_prompt is not None else text.max_position_embeddings
    chunk = keys if prefill_chunk is None else min(prefill_chunk, keys)
    encoders = max(audio_peak_bytes(cfg.thinker.audio, size),
                   vision_group_peak_bytes(cfg.thinker.vision, group_patches, size))
    prefill = prefill_chunk_peak_bytes(text, batch, chunk, keys, size)
    headroom = int(available * HEADROOM_FRACTION)
    per_token = kv_bytes_per_token(text, size) + prompt_state_bytes_per_token(cfg, size)
    if talker and cfg.talker is not None:
        per_token += kv_bytes_per_token(cfg.talker.text, size)
    left = available - headroom - max(encoders, prefill)
    if left < per_token * batch:
        raise ValueError(f"no room for the KV cache: {available / GIB:.2f} GiB free after the weights, "
                         f"{max(encoders, prefill) / GIB:.2f} GiB reserved for the encoders / a prefill chunk and "
                         f"{headroom / GIB:.2f} GiB headroom leave {left / GIB:.2f} GiB")
    tokens = left // per_token
    return MemoryPlan(available, weights_bytes, encoders, prefill, headroom, per_token, tokens, tokens // batch)


def device_memory(device: torch.device, budget_bytes: int | None = None) -> tuple[int, int | None]:
    """(total, free) bytes for plan_memory. CUDA asks the driver (call it once the weights are loaded: free is what
    is left); elsewhere the caller's budget is the total and free is None (plan_memory subtracts the weights)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    if budget_bytes is None:
        raise ValueError(f"device {device}: give a memory budget in bytes (there is no device memory to ask)")
    return budget_bytes, None


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of this machine's RAM, for a CPU model whose weights are loaded: MemAvailable
    counts the page cache the kernel can drop (free pages alone would undercount it). Without /proc/meminfo
    (macOS), the physical and free pages from sysconf."""
    try:
        fields = dict(line.split(":", 1) for line in open(MEMINFO).read().splitlines() if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def rows_that_fit(plan: MemoryPlan, max_len: int, most: int) -> int:
    """Rows of `max_len` cache slots each that the plan's tokens hold, at least 1 and at most `most`."""
    assert max_len >= 1 and most >= 1
    return max(1, min(most, plan.tokens // max_len))


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as they are (works on the meta device too)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
