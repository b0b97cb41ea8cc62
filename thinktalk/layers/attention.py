"""Grouped-query self-attention with per-head q/k RMSNorm, rotary positions and an optional static KV cache.

Cache layout per layer: k and v of shape (batch, kv_heads, max_len, head_dim), preallocated once. New keys are
written at `slots` (batch, seq) with an index_put, so a decode step has static shapes and no host synchronisation.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm
from .rotary import apply_rotary


@dataclass
class AttentionMeta:
    """What every attention layer of one forward pass shares."""

    cos: torch.Tensor  # (batch, seq, head_dim)
    sin: torch.Tensor  # (batch, seq, head_dim)
    mask: torch.Tensor | None  # (batch, 1, seq, keys) bool, True = may attend; None = causal within seq
    slots: torch.Tensor | None = None  # (batch, seq) cache slot of each new token; None = no cache
    key_len: int | None = None  # attend to cache slots [0, key_len); None = the whole cache (static decode shape)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 bias: bool = False, qk_norm: bool = True, output_bias: bool | None = None):
        """`bias`: q/k/v (and, unless `output_bias` says otherwise, o) projections have biases; Qwen2-style
        decoders have biased q/k/v and an unbiased o (output_bias=False) and no q/k norm (qk_norm=False)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias if output_bias is None else output_bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, meta: AttentionMeta,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, meta.cos, meta.sin), apply_rotary(k, meta.cos, meta.sin)
        q = q.transpose(1, 2)  # (batch, heads, seq, head_dim)
        if cache is not None:
            k_cache, v_cache = cache
            rows = torch.arange(batch, device=x.device).unsqueeze(1)  # (batch, 1) broadcasts against slots
            # k_cache[rows, :, slots] addresses (batch, seq, kv_heads, head_dim): the layout k already has.
            k_cache[rows, :, meta.slots] = k.to(k_cache.dtype)
            v_cache[rows, :, meta.slots] = v.to(v_cache.dtype)
            k, v = k_cache[:, :, :meta.key_len], v_cache[:, :, :meta.key_len]
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        out = scaled_dot_product_attention(q, k, v, meta.mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None) -> torch.Tensor:
    """q: (batch, heads, seq, d); k, v: (batch, kv_heads, keys, d); each group of heads shares a kv head.

    `enable_gqa` lets the kernel index the shared kv heads instead of copying the cache once per group.
    """
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    if seq == 1 and heads != kv_heads:
        # One query per row (a decode step): the heads that share a kv head become that kv head's query rows, so
        # the kernel reads each cached key once per kv head rather than once per query head, in 1/group as many
        # tasks (2-3x faster on the CPU at the released widths). Exact: with one position, no row masks another.
        grouped = q.view(batch, kv_heads, heads // kv_heads, dim)  # heads h*g .. h*g+g-1 share kv head h
        return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).view(batch, heads, 1, dim)
    gqa = heads != kv_heads
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    if gqa and q.device.type == "cuda":
        # Many masked queries (a later prefill chunk): CUDA's fused kernels take a mask or shared kv heads, not
        # both, and SDPA would fall back to its math path with (batch, heads, seq, keys) scores in memory. One copy
        # of k and v per query head costs far less.
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
