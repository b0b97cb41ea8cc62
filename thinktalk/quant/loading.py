"""Quantized matrices assembled from the checkpoint as its tensors stream past (weights.GroupedSources).

Every stored matrix slot (a QuantLinear's matrix, or one expert of a fused QuantExperts projection) waits for the
on-disk tensors of the linears it is made of:

    thinktalk slot                                  on-disk linears (each with its format's pieces)
    {p}.self_attn.q_proj.weight_q                   {p}.self_attn.q_proj          .weight_packed / .weight_scale ...
    {p}.mlp.experts.gate_up_proj [e]                {p}.mlp.experts.{e}.gate_proj  + {p}.mlp.experts.{e}.up_proj
    {p}.mlp.experts.down_proj [e]                   {p}.mlp.experts.{e}.down_proj

When the last piece of a slot arrives, the pieces are decoded on the target device (quant/decoded.py), their rows
concatenated and stored; then they are dropped. So host memory holds at most the pieces of the slots still being
filled: one expert's matrices, not a layer (the pieces of one module sit together in the released shards). Nothing
is dequantised to float on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..weights import QUANTIZED_SUFFIXES, CheckpointError
from .decoded import concat_rows
from .formats.base import EXPERT_PARTS, MatrixReader, Piece
from .matrices import QuantMatrices
from .modules import QuantExperts, QuantLinear
from .on_load import OnLoadReader
from .spec import QuantizationError


@dataclass
class _Slot:
    target: QuantMatrices
    index: int | None
    parts: list[tuple[str, tuple[int, int]]]  # (on-disk linear, its (out, in)) in row order
    pieces: dict[str, dict[str, Piece]]  # on-disk linear -> suffix -> piece
    received: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    done: bool = False

    def needed(self) -> list[str]:
        if self.done:
            return []
        return [f"{name}.{suffix}" for name, pieces in self.pieces.items() for suffix, piece in pieces.items()
                if not piece.optional and suffix not in self.received.get(name, {})]


class QuantSources:
    """The GroupedSources of every quantized module of `model`, read with `reader`, decoded on `device`."""

    def __init__(self, model: nn.Module, reader: MatrixReader, device: torch.device):
        self.reader, self.device = reader, device
        self.slots: list[_Slot] = []
        self.owned: set[str] = set()
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                self._add(name, module.weight_q, None, [(name, (module.out_features, module.in_features))])
                self.owned.update(f"{name}.weight_q.{p}" for p, _ in module.weight_q.named_parameters())
            elif isinstance(module, QuantExperts):
                for matrix in EXPERT_PARTS:
                    target: QuantMatrices = getattr(module, matrix)
                    rows = target.out_features // len(EXPERT_PARTS[matrix])
                    for e in range(module.num_experts):
                        self._add(name, target, e, [(f"{name}.{e}.{part}", (rows, target.in_features))
                                                    for part in EXPERT_PARTS[matrix]])
                    self.owned.update(f"{name}.{matrix}.{p}" for p, _ in target.named_parameters())
        self.by_key: dict[str, tuple[_Slot, str, str]] = {}
        for slot in self.slots:
            for disk_name, pieces in slot.pieces.items():
                for suffix in pieces:
                    self.by_key[f"{disk_name}.{suffix}"] = (slot, disk_name, suffix)

    def _add(self, module: str, target: QuantMatrices, index: int | None, parts) -> None:
        pieces = {}
        for disk_name, shape in parts:
            try:
                self.reader.check_spec(disk_name, target.spec, shape)
                pieces[disk_name] = self.reader.pieces(disk_name, target.spec, shape)
            except QuantizationError as error:
                raise QuantizationError(f"{module}: {error}") from None
        self.slots.append(_Slot(target, index, parts, pieces))

    # weights.GroupedSources -------------------------------------------------------------------------------------

    def owned_parameters(self) -> frozenset[str]:
        return frozenset(self.owned)

    def expected_shapes(self) -> dict[str, tuple[int, ...] | None]:
        return {key: slot.pieces[name][suffix].shape for key, (slot, name, suffix) in self.by_key.items()}

    def take(self, path: Path, key: str, tensor: torch.Tensor) -> None:
        slot, disk_name, suffix = self.by_key[key]
        slot.received.setdefault(disk_name, {})[suffix] = tensor
        if not slot.needed():
            self._store(path, slot)

    def _store(self, path: Path, slot: _Slot) -> None:
        decoded = []
        for disk_name, shape in slot.parts:
            tensors = {s: t.to(self.device) for s, t in slot.received[disk_name].items()}
            try:
                decoded.append(self.reader.decode(disk_name, slot.target.spec, shape, tensors))
            except QuantizationError as error:
                raise QuantizationError(f"{path}: {error}") from None
        try:
            slot.target.store(concat_rows(decoded), slot.index)
        except QuantizationError as error:  # about the matrix as a whole: name its linears
            raise QuantizationError(f"{path}: {' and '.join(name for name, _ in slot.parts)}: {error}") from None
        slot.received, slot.done = {}, True  # drop the pieces

    def missing(self) -> list[str]:
        return sorted(key for slot in self.slots for key in slot.needed())

    def explain_unexpected(self, keys: list[str]) -> str | None:
        on_load = isinstance(self.reader, OnLoadReader)
        source = (f"quantize on load ({self.reader.describe()})" if on_load
                  else f"quantization_config ({self.reader.describe()})")
        pieces_of = {name: pieces for slot in self.slots for name, pieces in slot.pieces.items()}
        for key in keys:
            if on_load and key.rpartition(".")[2] in QUANTIZED_SUFFIXES:
                return (f"tensor {key} is a piece of a quantized matrix, but config.json has no "
                        f"quantization_config, and quantize on load needs a float checkpoint")
            module = key.rpartition(".")[0]
            if module in pieces_of:
                wanted = ", ".join(f"{module}.{suffix}" for suffix in pieces_of[module])
                return (f"tensor {key} does not belong to {module}'s quantized form: {source} quantizes {module}, "
                        f"stored as {wanted}")
        for key in keys:
            if key.rpartition(".")[2] in QUANTIZED_SUFFIXES:
                return (f"tensor {key} is a piece of a quantized matrix, but {source} keeps "
                        f"{key.rpartition('.')[0]} in float")
        return None
