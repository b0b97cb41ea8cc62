"""Sparse mixture-of-experts feed-forward block with an optional sigmoid-gated shared expert.

Experts are stored fused, the layout thinktalk computes with (the checkpoint stores one tensor per expert; the
loader stacks them):
    experts.gate_up_proj: (num_experts, 2 * intermediate, hidden)   rows [gate; up]
    experts.down_proj:    (num_experts, hidden, intermediate)

Routing: softmax over all experts in float32, top-k, renormalised when `norm_topk_prob`. Four ways to apply the
experts (`ExpertPath`; `choose_path` picks one, a caller or test may name another):
  - GROUPED (sm90 / sm100 GPUs in bfloat16): the (token, expert) assignments sorted by expert, so each expert sees its
    tokens as one contiguous block of rows, then one grouped matmul (F.grouped_mm) per projection over all
    experts: no Python loop and no host synchronisation, so the same code runs in prefill and in a captured
    decode step. F.grouped_mm also runs on the CPU in bfloat16 when row strides are 16-byte aligned, which is
    how tests check this path without a GPU;
  - ROW_GATHER (other accelerators): the same sort, then each row multiplies by its expert's gathered matrix;
    sync-free too;
  - BLOCKS (the CPU), where a host sync costs nothing and torch's grouped GEMM walks every expert (even idle ones):
    the same sort, then one loop over the experts that received tokens, each doing its whole block at once
    (measured 2-10x faster);
  - GATHERED (the CPU inside torch.compile), where a host sync would split the graph: no sort at all, each
    (token, slot) gathers its expert's matrices (`experts_gathered`), which inductor fuses into the products.
"""

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoeConfig
from .mlp import GatedMLP


class ExpertPath(enum.Enum):
    GROUPED = "grouped"  # sorted rows, F.grouped_mm per projection
    ROW_GATHER = "row_gather"  # sorted rows, each times its expert's gathered matrix
    BLOCKS = "blocks"  # sorted rows, one matmul per active expert (host loop)
    GATHERED = "gathered"  # unsorted (token, slot) pairs with gathered matrices, for compiled CPU steps


# GPU generations (compute capability major) with torch's fast grouped GEMM: Hopper (9) and Blackwell (10). On the
# others F.grouped_mm falls back to a loop that copies the group offsets to the host, which a CUDA graph cannot hold.
GROUPED_MM_CAPABILITIES = (9, 10)


def choose_path(x: torch.Tensor) -> ExpertPath:
    """The path for activations x on their device, as the module doc describes."""
    if x.device.type == "cpu":
        return ExpertPath.GATHERED if torch.compiler.is_compiling() else ExpertPath.BLOCKS
    if x.device.type == "cuda" and grouped_mm_is_fast(x.dtype, torch.cuda.get_device_capability(x.device)):
        return ExpertPath.GROUPED
    return ExpertPath.ROW_GATHER


def grouped_mm_is_fast(dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    return hasattr(F, "grouped_mm") and dtype == torch.bfloat16 and capability[0] in GROUPED_MM_CAPABILITIES


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """Row r of x (sorted by expert) times weight[e].T for the expert e whose group holds r. -> (rows, out).

    x: (rows, in); weight: (experts, out, in); group_ends: (experts,) int32 cumulative row counts (an expert with
    no rows repeats the previous end). F.grouped_mm needs bfloat16 and 16-byte aligned strides (in, out multiples
    of 8).
    """
    return F.grouped_mm(x, weight.transpose(-2, -1), offs=group_ends)


def row_gather_matmul(x: torch.Tensor, weight: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
    """Row r of x times weight[expert_of_row[r]].T, gathering each row's expert matrix (the same bytes a batch-1
    decode must read anyway). x: (rows, in); weight: (experts, out, in) -> (rows, out)."""
    return torch.bmm(weight[expert_of_row], x.unsqueeze(-1)).squeeze(-1)


def experts_gathered(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor) -> torch.Tensor:
    """Sync-free path: every (token, slot) pair multiplies by its own expert's matrices, gathered. -> (tokens, hidden).

    x: (tokens, hidden); weights, experts: (tokens, top_k); gate_up: (experts, 2 * inter, hidden);
    down: (experts, hidden, inter). No sort, no host synchronisation and only static shapes, so it can be traced
    into a compiled decode step, where inductor fuses each gather into its matrix-vector product and reads every
    selected expert matrix once per (token, slot) without copying it (measured faster than the block path for
    1-8 tokens, from the tiny test model to the released widths). Run eagerly it copies tokens * top_k expert
    matrices first (3-15x slower than the block path at real widths), so eager code keeps the block path.
    """
    tokens, top_k = experts.shape
    rows = x.unsqueeze(1).expand(tokens, top_k, x.shape[-1]).reshape(tokens * top_k, x.shape[-1], 1)
    flat = experts.reshape(-1)  # assignment a = token * top_k + slot
    gate, up = torch.bmm(gate_up[flat], rows).squeeze(-1).chunk(2, dim=-1)  # (tokens * top_k, inter) each
    out = torch.bmm(down[flat], (F.silu(gate) * up).unsqueeze(-1)).view(tokens, top_k, -1)
    return weighted_sum(out, weights)


# (x rows of one expert, expert index) -> x @ W[expert].T: how a block of rows meets one expert's matrix
ExpertProduct = Callable[[torch.Tensor, int], torch.Tensor]


def experts_by_block(rows: torch.Tensor, group_ends: torch.Tensor, gate_up: ExpertProduct,
                     down: ExpertProduct) -> torch.Tensor:
    """Rows (sorted by expert) through each active expert's SwiGLU as one block: one host sync for the group ends,
    then one product per projection per expert that received tokens. -> (rows, hidden)."""
    out = torch.empty_like(rows)
    start = 0
    for expert, end in enumerate(group_ends.tolist()):
        if end > start:
            gate, up = gate_up(rows[start:end], expert).chunk(2, dim=-1)
            out[start:end] = down(F.silu(gate) * up, expert)
        start = end
    return out


@dataclass
class SortedAssignments:
    """The (token, slot) assignments of a batch sorted by expert (stable), so each expert's rows are contiguous."""

    order: torch.Tensor  # (tokens * top_k,) row r holds assignment order[r] (a = token * top_k + slot)
    token_of_row: torch.Tensor  # (tokens * top_k,)
    expert_of_row: torch.Tensor  # (tokens * top_k,)
    group_ends: torch.Tensor  # (experts,) int32 cumulative row counts (an idle expert repeats the previous end)


def sort_assignments(experts: torch.Tensor, num_experts: int) -> SortedAssignments:
    """experts: (tokens, top_k). Sync-free (no data-dependent shapes)."""
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=experts.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return SortedAssignments(order, order // top_k, flat[order], counts.cumsum(0, dtype=torch.int32))


def weighted_sum(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out: (tokens, top_k, hidden) expert outputs; weights: (tokens, top_k) -> (tokens, hidden) in out's dtype.

    As the reference's grouped experts do: each product rounded to the model's dtype, then one sum over the top-k
    axis, which torch accumulates in float32 and rounds once, in a fixed order (no atomic add, whose order and k
    roundings would change from run to run), so runs are bit-identical."""
    return (out * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (tokens, hidden) -> weights (tokens, top_k) in x's dtype, experts (tokens, top_k)
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts


class ExpertsBase(nn.Module, ABC):
    """Routing around `num_experts` SwiGLU experts; subclasses say how sorted rows meet the expert matrices."""

    num_experts: int

    def choose_path(self, x: torch.Tensor) -> ExpertPath:
        return choose_path(x)

    @abstractmethod
    def run_sorted(self, rows: torch.Tensor, sorted_: SortedAssignments, path: ExpertPath) -> torch.Tensor:
        """rows: (tokens * top_k, hidden) grouped by expert -> each row's expert output, (tokens * top_k, hidden)."""

    def run_gathered(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no gathered path")

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                path: ExpertPath | None = None) -> torch.Tensor:
        """x: (tokens, hidden); weights, experts: (tokens, top_k); path: None = `choose_path(x)`. -> (tokens, hidden)"""
        path = self.choose_path(x) if path is None else path
        if path is ExpertPath.GATHERED:
            # Traced into a compiled step, where the block path's host sync would split the graph. Inductor
            # fuses the gather into the matrix-vector products, so no expert matrix is copied.
            return self.run_gathered(x, weights, experts)
        tokens, top_k = experts.shape
        sorted_ = sort_assignments(experts, self.num_experts)
        out = self.run_sorted(x[sorted_.token_of_row], sorted_, path)  # (tokens * top_k, hidden) by expert
        unsorted = torch.empty_like(out).index_copy_(0, sorted_.order, out)  # back to assignment order
        return weighted_sum(unsorted.view(tokens, top_k, -1), weights)


class Experts(ExpertsBase):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def run_gathered(self, x, weights, experts):
        return experts_gathered(x, weights, experts, self.gate_up_proj, self.down_proj)

    def run_sorted(self, rows, sorted_, path):
        if path is ExpertPath.BLOCKS:
            return experts_by_block(rows, sorted_.group_ends, lambda r, e: F.linear(r, self.gate_up_proj[e]),
                                    lambda r, e: F.linear(r, self.down_proj[e]))
        if path is ExpertPath.GROUPED:
            gate, up = grouped_matmul(rows, self.gate_up_proj, sorted_.group_ends).chunk(2, dim=-1)
            return grouped_matmul(F.silu(gate) * up, self.down_proj, sorted_.group_ends)
        gate, up = row_gather_matmul(rows, self.gate_up_proj, sorted_.expert_of_row).chunk(2, dim=-1)
        return row_gather_matmul(F.silu(gate) * up, self.down_proj, sorted_.expert_of_row)


class SparseMoe(nn.Module):
    """Names match the checkpoint: mlp.gate (router), mlp.experts, mlp.shared_expert, mlp.shared_expert_gate."""

    def __init__(self, hidden_size: int, moe: MoeConfig):
        super().__init__()
        self.gate = Router(hidden_size, moe.num_experts, moe.top_k, moe.norm_topk_prob)
        self.experts = Experts(moe.num_experts, hidden_size, moe.expert_intermediate_size)
        self.shared_expert = None
        if moe.shared_expert_intermediate_size > 0:
            self.shared_expert = GatedMLP(hidden_size, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.gate(x)
        out = self.experts(x, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)
