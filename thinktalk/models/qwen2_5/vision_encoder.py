"""Qwen2.5-Omni's vision encoder (the Qwen2.5-VL ViT): 14-px patches in, one token per 2x2 patches out.

    patches (num_patches, C*T*P*P), laid out by the processor frame by frame, each frame in 2x2 merge blocks
      -> patch_embed: Conv3d over (T, P, P) with stride = kernel (one linear map per patch, no bias)  (patches, hidden)
      -> [x + Attn(RMSNorm(x), 2-D rotary) ; x + SwiGLU(RMSNorm(x))] x depth
            attention within windows of window_size pixels (4x4 merged tokens at 112 px) of a frame, except the
            blocks in fullatt_block_indexes, which attend over the whole frame
      -> merger: RMSNorm per patch -> concat 2x2 patches -> Linear -> GELU -> Linear     (patches / 4, out_hidden)

Windows: a frame's (h/2, w/2) grid of merged tokens is tiled from the top-left by window_tokens x window_tokens
squares (edge windows are smaller); a window holds the 4 patches of each of its merged tokens. The reference
permutes the patches into window order and back; attention does not depend on the order of its keys, so thinktalk
keeps processor order throughout and attends over the index sets of the windows. No position table: positions are
the 2-D rotary alone. Module names match the checkpoint keys under `thinker.visual.`; no buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config_qwen2_5 import Qwen25VisionConfig
from ...layers.encoder_attention import PackedSequences, group_by_budget, packed_attention
from ...layers.mlp import GatedMLP
from ...layers.norm import RMSNorm
from ...layers.rotary import apply_rotary, axial_rotary
from ..vision_encoder import check_patches, merge_block_order

RMS_NORM_EPS = 1e-6
# Frames run through the blocks in groups of at most this many patches (attention never crosses a frame, so the
# result is the same); at the released widths (hidden 1280, MLP 3420) about 1 GiB of bf16 activations a group.
GROUP_PATCHES = 16384


def window_groups(h: int, w: int, merge: int, window: int, offset: int) -> list[torch.Tensor]:
    """Patch indices (processor order, + offset) of each attention window of one (h, w)-patch frame, row-major."""
    rows, cols = h // merge, w // merge  # the merged-token grid
    unit = merge * merge  # consecutive patches of one merged token
    groups = []
    for top in range(0, rows, window):
        for left in range(0, cols, window):
            r = torch.arange(top, min(top + window, rows))[:, None]
            c = torch.arange(left, min(left + window, cols))[None, :]
            tokens = (r * cols + c).flatten()  # merged tokens of the window, raster order
            groups.append(offset + (tokens[:, None] * unit + torch.arange(unit)).flatten())
    return groups


def packed_from_index_sets(sets: list[torch.Tensor], num_tokens: int, device: torch.device) -> PackedSequences:
    """Attention within each index set: sets of one size are stacked into one batch (no mask needed)."""
    by_size: dict[int, list[torch.Tensor]] = {}
    for indices in sets:
        by_size.setdefault(indices.numel(), []).append(indices)
    groups = tuple(torch.stack(same).to(device) for _, same in sorted(by_size.items()))
    return PackedSequences(groups=groups, num_tokens=num_tokens)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # The kernel covers the whole (C, T, P, P) patch: one matrix product per patch, weight flattened alike.
        weight = self.proj.weight.view(self.proj.out_channels, -1)
        return F.linear(patches.to(weight.dtype), weight)


class VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.k = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.v = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                packing: PackedSequences) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = (p(x).view(tokens, self.num_heads, self.head_dim) for p in (self.q, self.k, self.v))
        cos, sin = rotary  # (tokens, head_dim) float32: rotate in float32, as the reference does
        q, k = (apply_rotary(t.float()[None], cos[None], sin[None])[0].to(v.dtype) for t in (q, k))
        return self.proj(packed_attention(q, k, v, packing).reshape(tokens, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, RMS_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, RMS_NORM_EPS)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                packing: PackedSequences) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, packing)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm per patch, then each merge block's patches concatenated into one token of the LLM's width."""

    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, RMS_NORM_EPS)
        # Sequential so the checkpoint's names mlp.0 / mlp.2 line up (mlp.1 is the parameter-free GELU).
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(),
                                 nn.Linear(self.merged, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (patches, hidden) -> (patches / merge^2, merge^2 * hidden) -> (tokens, out_hidden)
        return self.mlp(self.ln_q(x).view(-1, self.merged))


class Qwen25VisionEncoder(nn.Module):
    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_patches: torch.Tensor, grid_thw: torch.Tensor,
                group_patches: int | None = GROUP_PATCHES) -> torch.Tensor:
        """pixel_patches: (sum t*h*w, C*T*P*P); grid_thw: (n, 3) patches per image or video along (t, h, w).
        -> (sum t*h*w / merge^2, out_hidden_size), in the processor's (= the prompt's) token order."""
        frames = [(h, w) for t, h, w in self._check(pixel_patches, grid_thw) for _ in range(t)]
        weight = self.patch_embed.proj.weight
        merge_area = self.cfg.spatial_merge_size ** 2
        out = weight.new_empty(pixel_patches.shape[0] // merge_area, self.cfg.out_hidden_size)
        start, first = 0, 0
        for group in group_by_budget([h * w for h, w in frames], group_patches):
            end = start + sum(group)
            out[start // merge_area:end // merge_area] = self._run_frames(pixel_patches[start:end],
                                                                         frames[first:first + len(group)])
            start, first = end, first + len(group)
        return out

    def _run_frames(self, pixel_patches: torch.Tensor, frames: list[tuple[int, int]]) -> torch.Tensor:
        """Whole frames of (h, w) patches -> their merged tokens (patches / merge^2, out_hidden)."""
        device, merge = self.patch_embed.proj.weight.device, self.cfg.spatial_merge_size
        tables = {size: self._rotary_table(*size, device) for size in set(frames)}
        cos, sin = (torch.cat([tables[size][i] for size in frames]) for i in range(2))
        windows, offset = [], 0
        for h, w in frames:
            windows += window_groups(h, w, merge, self.cfg.window_tokens, offset)
            offset += h * w
        whole = PackedSequences.from_lengths([h * w for h, w in frames], device)
        windowed = packed_from_index_sets(windows, offset, device)
        x = self.patch_embed(pixel_patches.to(device))
        for i, block in enumerate(self.blocks):
            x = block(x, (cos, sin), whole if i in self.cfg.fullatt_block_indexes else windowed)
        return self.merger(x)

    def _rotary_table(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = merge_block_order(h, w, self.cfg.spatial_merge_size, device)
        return axial_rotary(rows, cols, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta)

    def _check(self, pixel_patches: torch.Tensor, grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
        cfg = self.cfg
        return check_patches(pixel_patches, grid_thw, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2,
                             cfg.spatial_merge_size)
