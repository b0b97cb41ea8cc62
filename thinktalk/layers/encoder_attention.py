"""Bidirectional attention over packed variable-length sequences: the encoders' block-diagonal attention.

The perception encoders pack many sequences into one (tokens, ...) tensor: audio attention windows (8 s each)
and image or video frames. Attention must stay within each sequence, a block-diagonal pattern. A dense
(tokens, tokens) mask would grow with the square of the input (40 minutes of audio is 31,200 tokens); instead the
sequences of equal length are gathered into one batch and attended with no mask at all:

    tokens --gather--> (num_seqs, seq_len, heads, head_dim) per length --SDPA--> scatter back to tokens

so the work and memory are sum(seq_len^2), linear in the number of sequences, and the kernels need no mask.
Audio has one common window length plus at most one shorter tail per audio; a video's frames share one length;
so there are few groups. The grouping is computed once per forward pass and shared by every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import Cancelled


@dataclass(frozen=True)
class PackedSequences:
    """How a packed run of tokens splits into consecutive sequences, grouped by sequence length."""

    groups: tuple[torch.Tensor, ...]  # each (num_seqs, seq_len) long: token indices of same-length sequences
    num_tokens: int

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str) -> PackedSequences:
        """`lengths`: token counts of consecutive sequences, in packing order (zero-length ones are skipped)."""
        if any(n < 0 for n in lengths):
            raise ValueError(f"sequence lengths must be >= 0, got {lengths}")
        starts_by_length: dict[int, list[int]] = {}
        start = 0
        for n in lengths:
            if n > 0:
                starts_by_length.setdefault(n, []).append(start)
            start += n
        groups = []
        for n, starts in sorted(starts_by_length.items()):
            first = torch.tensor(starts, dtype=torch.long, device=device)  # (num_seqs,)
            groups.append(first[:, None] + torch.arange(n, device=device))  # (num_seqs, n)
        return cls(groups=tuple(groups), num_tokens=start)

    @property
    def max_length(self) -> int:
        return max((g.shape[1] for g in self.groups), default=0)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: PackedSequences) -> torch.Tensor:
    """Softmax(q k^T / sqrt(head_dim)) v within each packed sequence.

    q, k, v: (tokens, heads, head_dim) -> (tokens, heads, head_dim).
    """
    if q.shape[0] != packing.num_tokens:
        raise ValueError(f"got {q.shape[0]} tokens but the packing covers {packing.num_tokens}")
    out = torch.empty_like(q)
    for index in packing.groups:
        # (num_seqs, seq_len, heads, head_dim) -> (num_seqs, heads, seq_len, head_dim) for SDPA
        qg, kg, vg = (t[index].transpose(1, 2) for t in (q, k, v))
        out[index] = F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2)
    return out


def group_by_budget(lengths: list[int], budget: int | None) -> list[list[int]]:
    """Consecutive sequence lengths in groups of at most `budget` tokens; a longer sequence forms a group alone;
    None = one group. The encoders run their sequences group by group: attention never crosses a sequence, so the
    result is the same and only one group's activations are alive at a time."""
    if budget is None:
        return [list(lengths)]
    groups: list[list[int]] = [[]]
    used = 0
    for n in lengths:
        if groups[-1] and used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += n
    return groups


def stop_if_asked(should_stop: Callable[[], bool] | None, between_groups: bool, encoder: str) -> None:
    """Between two groups of an encoder's work: errors.Cancelled when its request was cancelled meanwhile."""
    if between_groups and should_stop is not None and should_stop():
        raise Cancelled(f"the {encoder} encoder stopped between groups: its request was cancelled")
