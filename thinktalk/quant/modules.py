"""Quantized stand-ins for nn.Linear and the fused MoE experts, and the one function that puts them in a model.

    QuantLinear   y = x @ W.T + b      W: QuantMatrices (one matrix), b: the float bias when the linear has one
    QuantExperts  the same routing as layers/moe.Experts (sorted rows, float32 combine); each expert's SwiGLU
                  computed from `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) in quantized form

`quantize_modules(model, plan, dtype, device_type)` runs on the meta-device model before it is materialised: every
module the plan names is replaced in place by its quantized stand-in (same attribute name, so checkpoint names
still lead to it), built for the device the model will live on. Nothing else of the model changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.moe import Experts, ExpertPath, ExpertsBase, SortedAssignments, experts_by_block
from .matrices import QuantMatrices, matrices_for
from .spec import QuantizationError, QuantPlan, WeightSpec


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, spec: WeightSpec, dtype: torch.dtype,
                 device_type: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_q = matrices_for(spec, None, out_features, in_features, dtype, device_type)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.weight_q.matmul(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class QuantExperts(ExpertsBase):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, spec_gate_up: WeightSpec,
                 spec_down: WeightSpec, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = matrices_for(spec_gate_up, num_experts, 2 * intermediate_size, hidden_size, dtype,
                                         device_type)
        self.down_proj = matrices_for(spec_down, num_experts, hidden_size, intermediate_size, dtype, device_type)

    def choose_path(self, x: torch.Tensor) -> ExpertPath:
        # The CPU's int4/int8 kernels take one matrix at a time: blocks of rows per expert (a host sync, free on
        # the CPU). On CUDA the Triton kernels take every expert at once from the sorted rows, sync-free.
        return ExpertPath.BLOCKS if self.down_proj.layout == "cpu" else ExpertPath.GROUPED

    def run_sorted(self, rows: torch.Tensor, sorted_: SortedAssignments, path: ExpertPath) -> torch.Tensor:
        if path is ExpertPath.BLOCKS:
            return experts_by_block(rows, sorted_.group_ends, self.gate_up_proj.matmul, self.down_proj.matmul)
        if path is not ExpertPath.GROUPED:
            raise ValueError(f"quantized experts compute by blocks or grouped, not {path.value}")
        from . import triton_kernels

        gate, up = triton_kernels.grouped_matmul(rows, self.gate_up_proj, sorted_.group_ends).chunk(2, dim=-1)
        return triton_kernels.grouped_matmul(F.silu(gate) * up, self.down_proj, sorted_.group_ends)


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module for every nn.Linear and fused Experts: what a plan may name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Experts))}


def quantize_modules(model: nn.Module, plan: QuantPlan, dtype: torch.dtype, device_type: str) -> dict[str, WeightSpec]:
    """Replace, on the meta device, each module `plan` quantizes. Returns name -> spec of what was replaced."""
    chosen: dict[str, WeightSpec] = {}
    for name, module in quantizable(model).items():
        try:
            stand_in, spec = _stand_in(module, plan, name, dtype, device_type)
        except QuantizationError as error:
            raise QuantizationError(f"{name}: {error}") from None
        if stand_in is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, stand_in)
            chosen[name] = spec
    return chosen


def _stand_in(module: nn.Module, plan: QuantPlan, name: str, dtype: torch.dtype,
              device_type: str) -> tuple[nn.Module | None, WeightSpec | None]:
    with torch.device("meta"):
        if isinstance(module, nn.Linear):
            spec = plan.spec_for(name, "weight", module.in_features)
            if spec is None:
                return None, None
            return QuantLinear(module.in_features, module.out_features, module.bias is not None, spec, dtype,
                               device_type), spec
        hidden = module.gate_up_proj.shape[-1]
        gate_up = plan.spec_for(name, "gate_up_proj", hidden)
        down = plan.spec_for(name, "down_proj", module.intermediate_size)
        if gate_up is None and down is None:
            return None, None
        if gate_up is None or down is None:
            raise QuantizationError("either both or neither of the experts' gate_up and down projections must be "
                                    "quantized (thinktalk stores an expert's matrices in one form)")
        return QuantExperts(module.num_experts, hidden, module.intermediate_size, gate_up, down, dtype,
                            device_type), gate_up


def quantized_matrices(model: nn.Module) -> dict[str, QuantMatrices]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantMatrices)}
