"""The vision encoder of the Thinker (a SigLIP-style ViT): pixel patches in, one token per 2x2 patches out.

    patches (num_patches, C*T*P*P), laid out by the processor frame by frame, each frame in 2x2 merge blocks
      -> patch_embed: Conv3d over (T, P, P) with stride = kernel, i.e. one linear map per patch  (patches, hidden)
      -> + learned (side x side) position table, bilinearly resampled to the frame's (h, w) grid
      -> [x + Attn(LN(x), 2-D rotary) ; x + fc2(GELU_tanh(fc1(LN(x))))] x depth, attention within each frame
         (so frames run in groups of at most GROUP_PATCHES patches, each group's activations freed before the next)
            after block i in deepstack_visual_indexes: merger_list[j](x) -> a deepstack feature (tokens, out)
      -> merger: LN per patch -> concat 2x2 patches -> Linear -> GELU -> Linear        (patches / 4, out_hidden)

The deepstack mergers normalise after the concatenation instead of before (the checkpoint's `ln_q` is 4x wider).
Module names match the checkpoint keys under `thinker.visual.`; no buffers (rotary tables are computed per call).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionEncoderConfig
from ..layers.activation import activation_by_name
from ..layers.encoder_attention import PackedSequences, group_by_budget, packed_attention, stop_if_asked
from ..layers.rotary import apply_rotary, axial_rotary

ROPE_THETA = 10000.0  # the vision config carries no rope_theta; the reference uses its default
LAYER_NORM_EPS = 1e-6
# Patches per group of frames run through the blocks at once. Attention stays within a frame, so grouping changes
# nothing in the result; it bounds the activations: at the released widths (hidden 1152, MLP 4304) a group of
# 16,384 patches peaks at about 0.7 GiB of bf16 (engine/memory.py's estimate), where a 120-s 1080p video (276k
# patches) at once would take about 12 GiB.
GROUP_PATCHES = 16384


@dataclass
class VisionOutput:
    embeds: torch.Tensor  # (tokens, out_hidden_size), tokens = sum(t * h * w) / spatial_merge_size^2
    deepstack: list[torch.Tensor]  # one (tokens, out_hidden_size) per deepstack_visual_indexes entry, layer order


def merge_block_order(h: int, w: int, merge: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each patch of an (h, w) frame in processor order: merge x merge blocks in raster order,
    raster order inside each block. Returns two (h*w,) long tensors."""
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    # (h, w) -> (h/m, m, w/m, m) -> (h/m, w/m, m, m): blocks first, then the patches inside a block
    return tuple(t.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten() for t in (rows, cols))


def bilinear_taps(size: int, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample `size` points across a `side`-long axis, ends aligned (align_corners=True).

    Returns (low index, high index, weight of high), each (size,); high is clamped at the edge (weight 0 there).
    """
    src = torch.arange(size, dtype=torch.float, device=device) * (side - 1) / max(size - 1, 1)
    low = src.floor()
    frac = src - low
    low = low.long()
    return low, (low + 1).clamp(max=side - 1), frac


def check_patches(pixel_patches: torch.Tensor, grid_thw: torch.Tensor, patch_numel: int,
                  merge: int) -> list[tuple[int, int, int]]:
    """Validate a vision encoder's inputs against their grids; -> the grids as (t, h, w) tuples."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] < 1:
        raise ValueError(f"grid_thw must have shape (n >= 1, 3), got {tuple(grid_thw.shape)}")
    grids = [tuple(g) for g in grid_thw.tolist()]
    for t, h, w in grids:
        if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): sizes must be >= 1 and h, w multiples of {merge}")
    num_patches = sum(t * h * w for t, h, w in grids)
    if pixel_patches.shape != (num_patches, patch_numel):
        raise ValueError(f"pixel_patches must have shape ({num_patches}, {patch_numel}) for grids {grids}, "
                         f"got {tuple(pixel_patches.shape)}")
    return grids


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # A Conv3d whose kernel covers the whole (C, T, P, P) patch is one matrix product per patch:
        # (patches, C*T*P*P) @ (hidden, C*T*P*P)^T, the weight flattened in the same (C, T, P, P) order.
        weight = self.proj.weight.view(self.proj.out_channels, -1)
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                frames: PackedSequences) -> torch.Tensor:
        tokens = x.shape[0]
        # (tokens, 3 * hidden) -> 3 x (tokens, heads, head_dim)
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = rotary  # (tokens, head_dim) float32; rotate in float32 as the checkpoint's reference does
        q, k = (apply_rotary(t.float()[None], cos[None], sin[None])[0].to(v.dtype) for t in (q, k))
        return self.proj(packed_attention(q, k, v, frames).reshape(tokens, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = activation_by_name(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                frames: PackedSequences) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each merge block's patches into one token and maps it to the language model's width.

    `norm_after_concat=False` (the final merger): LayerNorm over each patch's hidden, then concatenate.
    `norm_after_concat=True` (deepstack mergers): concatenate, then LayerNorm over the concatenation.
    """

    def __init__(self, cfg: VisionEncoderConfig, norm_after_concat: bool):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.norm_after_concat = norm_after_concat
        self.ln_q = nn.LayerNorm(self.merged if norm_after_concat else cfg.hidden_size, eps=LAYER_NORM_EPS)
        # Sequential so the checkpoint's names mlp.0 / mlp.2 line up (mlp.1 is the parameter-free GELU).
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(),
                                 nn.Linear(self.merged, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (patches, hidden) -> (patches / merge^2, merge^2 * hidden) -> (tokens, out_hidden)
        if self.norm_after_concat:
            x = self.ln_q(x.view(-1, self.merged))
        else:
            x = self.ln_q(x).view(-1, self.merged)
        return self.mlp(x)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_heads
        if head_dim % 4:
            raise ValueError(f"vision head_dim ({head_dim}) must be a multiple of 4 for 2-D rotary positions")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_concat=False)
        self.merger_list = nn.ModuleList(PatchMerger(cfg, norm_after_concat=True)
                                         for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_patches: torch.Tensor, grid_thw: torch.Tensor,
                group_patches: int | None = GROUP_PATCHES,
                should_stop: Callable[[], bool] | None = None) -> VisionOutput:
        """pixel_patches: (sum t*h*w, C*T*P*P); grid_thw: (n, 3) patches per image or video along (t, h, w).

        Frames run through the blocks in groups of at most `group_patches` patches (a larger frame runs alone;
        None = all at once). pixel_patches may stay on the host: each group moves to the weights' device alone.
        `should_stop` is asked before every group after the first, and True raises errors.Cancelled.
        """
        grids = self._check(pixel_patches, grid_thw)
        if group_patches is not None and group_patches < 1:
            raise ValueError(f"group_patches must be >= 1 or None, got {group_patches}")
        frames = [(h, w) for t, h, w in grids for _ in range(t)]  # attention runs within each of these
        weight = self.patch_embed.proj.weight
        merge_area, levels = self.cfg.spatial_merge_size ** 2, len(self.cfg.deepstack_visual_indexes)
        tokens = pixel_patches.shape[0] // merge_area
        embeds = weight.new_empty(tokens, self.cfg.out_hidden_size)
        deepstack = [weight.new_empty(tokens, self.cfg.out_hidden_size) for _ in range(levels)]
        tables: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # per frame size: positions, cos, sin
        start, first = 0, 0
        for group in group_by_budget([h * w for h, w in frames], group_patches):
            stop_if_asked(should_stop, start > 0, "vision")
            end = start + sum(group)
            rows = slice(start // merge_area, end // merge_area)
            group_frames, first = frames[first:first + len(group)], first + len(group)
            embeds[rows], *deep = self._run_group(pixel_patches[start:end], group_frames, tables)
            for level, features in enumerate(deep):
                deepstack[level][rows] = features
            start = end
        return VisionOutput(embeds=embeds, deepstack=deepstack)

    def _run_group(self, pixel_patches: torch.Tensor, frames: list[tuple[int, int]],
                   tables: dict[tuple[int, int], tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """Whole frames of (h, w) patches -> [merged tokens, deepstack level 0, 1, ...], each (patches/4, out)."""
        device = self.patch_embed.proj.weight.device
        for size in frames:
            if size not in tables:
                tables[size] = self._frame_tables(*size, device)
        position, cos, sin = (torch.cat([tables[size][i] for size in frames]) for i in range(3))
        x = self.patch_embed(pixel_patches.to(device, self.patch_embed.proj.weight.dtype))  # (patches, hidden)
        x = x + position.to(x.dtype)
        packing = PackedSequences.from_lengths([h * w for h, w in frames], device)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x, (cos, sin), packing)
            if i in self.cfg.deepstack_visual_indexes:
                outputs.append(self.merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return [self.merger(x)] + outputs

    def _check(self, pixel_patches: torch.Tensor, grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
        cfg = self.cfg
        return check_patches(pixel_patches, grid_thw, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2,
                             cfg.spatial_merge_size)

    def _frame_tables(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One (h, w) frame's tables in processor patch order, float32: learned positions (h*w, hidden) and the
        2-D rotary cos, sin (h*w, head_dim). They depend only on the frame's size."""
        rows, cols = merge_block_order(h, w, self.cfg.spatial_merge_size, device)
        return (self._position_embeddings(h, w, device)[rows, cols],) + self._rotary(rows, cols)

    def _position_embeddings(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(h, w, hidden) float32: the learned side x side table, bilinearly resampled to an (h, w) frame."""
        side = math.isqrt(self.cfg.num_position_embeddings)
        table = self.pos_embed.weight.float().view(side, side, -1)
        r0, r1, fr = bilinear_taps(h, side, device)
        c0, c1, fc = bilinear_taps(w, side, device)
        fr, fc = fr[:, None, None], fc[None, :, None]
        # the four neighbours weighted by the products of the per-axis weights
        return ((1 - fr) * (1 - fc) * table[r0][:, c0] + (1 - fr) * fc * table[r0][:, c1]
                + fr * (1 - fc) * table[r1][:, c0] + fr * fc * table[r1][:, c1])

    def _rotary(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D rotary tables (patches, head_dim) float32 for patches at (rows, cols) (layers/rotary.py)."""
        return axial_rotary(rows, cols, self.cfg.hidden_size // self.cfg.num_heads, ROPE_THETA)

