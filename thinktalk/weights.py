"""Strict loading of the released Qwen3-Omni checkpoint layout into thinktalk's modules.

The checkpoint-name mapping lives here and only here. thinktalk's module names equal the checkpoint keys, with one
exception: MoE experts. On disk each expert is three tensors; thinktalk computes with them stacked:

    on disk                                         thinktalk
    {p}.mlp.experts.{e}.gate_proj.weight (I, H)  -> {p}.mlp.experts.gate_up_proj[e, :I]   (E, 2I, H)
    {p}.mlp.experts.{e}.up_proj.weight   (I, H)  -> {p}.mlp.experts.gate_up_proj[e, I:]
    {p}.mlp.experts.{e}.down_proj.weight (H, I)  -> {p}.mlp.experts.down_proj[e]          (E, H, I)

Loading is memory-mapped, shard by shard and tensor by tensor, cast straight to the target dtype and device, so
host memory beyond the model stays below one tensor. Anything missing, unexpected, mis-shaped, of a non-float
dtype, truncated or corrupt is a `CheckpointError` naming the tensor or file; the half-filled model is dropped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import InputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(InputError):
    """A checkpoint's weight files do not match the model its config describes."""


@dataclass(frozen=True)
class TensorSource:
    """One on-disk tensor and where it lands: `target[index] = tensor`."""

    key: str  # checkpoint key
    target: str  # thinktalk parameter name
    index: tuple  # () for the whole parameter; (e,) or (e, slice) for one expert's rows
    shape: tuple[int, ...]  # expected on-disk shape


# Fused parameter suffix -> the per-expert on-disk tensors it stacks: (on-disk suffix, which rows of the fused dim).
# The row range is given as (part, parts): part k of the fused dim split in `parts` equal pieces.
FUSED_EXPERTS = {
    "mlp.experts.gate_up_proj": (("gate_proj.weight", 0, 2), ("up_proj.weight", 1, 2)),
    "mlp.experts.down_proj": (("down_proj.weight", 0, 1),),
}


def checkpoint_layout(model: nn.Module, exclude: frozenset[str] = frozenset()) -> dict[str, TensorSource]:
    """Every checkpoint key the model expects, with its expected shape and destination (parameters in `exclude`
    are filled by someone else: a GroupedSources)."""
    layout = {}
    for name, param in model.state_dict(keep_vars=True).items():
        if name in exclude:
            continue
        for source in sources_of(name, tuple(param.shape)):
            layout[source.key] = source
    return layout


class GroupedSources(Protocol):
    """Checkpoint tensors that are not copied one to one but combined (a quantized matrix from its packed codes,
    scales and zero points): the loader hands each such tensor over and the sources assemble what they fill."""

    def owned_parameters(self) -> frozenset[str]:
        """The model parameters these sources fill (left out of the one-to-one layout)."""

    def expected_shapes(self) -> dict[str, tuple[int, ...] | None]:
        """Checkpoint key -> its expected shape (None: checked when assembled)."""

    def take(self, path: Path, key: str, tensor: torch.Tensor) -> None:
        """One tensor read from `path`; raises CheckpointError (naming it) when it is wrong."""

    def missing(self) -> list[str]:
        """Keys still needed once every shard has been read."""

    def explain_unexpected(self, keys: list[str]) -> str | None:
        """A clearer message for unexpected keys these sources recognise (e.g. a float weight where a quantized one
        belongs), or None."""


def sources_of(name: str, shape: tuple[int, ...]) -> Iterator[TensorSource]:
    for suffix, parts in FUSED_EXPERTS.items():
        if name.endswith(suffix):
            base = name[: -len("gate_up_proj" if suffix.endswith("gate_up_proj") else "down_proj")]
            experts, rows, cols = shape
            for e in range(experts):
                for disk_suffix, part, count in parts:
                    piece = rows // count
                    index = (e,) if count == 1 else (e, slice(part * piece, (part + 1) * piece))
                    yield TensorSource(f"{base}{e}.{disk_suffix}", name, index, (piece, cols))
            return
    yield TensorSource(name, name, (), shape)


def shard_files(checkpoint_dir: Path) -> dict[Path, list[str] | None]:
    """Shard path -> the keys the index assigns it (None when there is no index: a single file)."""
    index_path = checkpoint_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({error!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
            raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names, "
                                  f"got {str(weight_map)[:80]}")
        shards: dict[Path, list[str]] = {}
        for key, file in weight_map.items():
            shards.setdefault(checkpoint_dir / file, []).append(key)
        for path in shards:
            if not path.is_file():
                raise CheckpointError(f"{index_path}: names shard {path.name}, which is not in {checkpoint_dir}")
        return dict(shards)
    single = checkpoint_dir / SINGLE_FILE
    if single.is_file():
        return {single: None}
    raise CheckpointError(f"{checkpoint_dir}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")


def load_weights(model: nn.Module, checkpoint_dir: Path | str, device: torch.device, dtype: torch.dtype,
                 skip_prefixes: tuple[str, ...] = (), show_progress: bool | None = None,
                 grouped: GroupedSources | None = None) -> None:
    """Fill `model` (already materialised on `device` in `dtype`) from the checkpoint, strictly.

    Keys under `skip_prefixes` (e.g. talker./code2wav. when audio output is off) are neither loaded nor required.
    `grouped`: the sources of the parameters that are assembled from several tensors (quantized matrices).
    """
    checkpoint_dir = Path(checkpoint_dir)
    layout = checkpoint_layout(model, grouped.owned_parameters() if grouped else frozenset())
    grouped_shapes = grouped.expected_shapes() if grouped else {}
    params = model.state_dict(keep_vars=True)
    shards = shard_files(checkpoint_dir)
    loaded: set[str] = set()
    unexpected: list[str] = []
    progress = _progress(len(layout) + len(grouped_shapes), show_progress)
    for path, indexed_keys in shards.items():
        with _open_shard(path) as shard:
            keys = list(shard.keys())
            if indexed_keys is not None and set(indexed_keys) != set(keys):
                missing_here = sorted(set(indexed_keys) - set(keys))[:3]
                raise CheckpointError(f"{path}: does not hold the tensors the index assigns it "
                                      f"(e.g. {missing_here or sorted(set(keys) - set(indexed_keys))[:3]})")
            for key in keys:
                if key.startswith(skip_prefixes):
                    continue
                source = layout.get(key)
                if source is not None:
                    _copy_tensor(shard, path, source, params[source.target], device)
                    loaded.add(key)
                elif key in grouped_shapes:
                    grouped.take(path, key, _read_tensor(shard, path, key, grouped_shapes[key]))
                else:
                    unexpected.append(key)
                    continue
                progress.update(1)
    progress.close()
    if unexpected:
        unexpected.sort()
        explained = grouped.explain_unexpected(unexpected) if grouped else _quantized_piece(checkpoint_dir, unexpected)
        raise CheckpointError(explained or f"{checkpoint_dir}: {len(unexpected)} unexpected tensor(s) the model "
                                           f"does not have, e.g. {', '.join(sorted(unexpected)[:5])}")
    missing = sorted(k for k in layout if k not in loaded) + (grouped.missing() if grouped else [])
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: {len(missing)} tensor(s) missing from the checkpoint, "
                              f"e.g. {', '.join(missing[:5])}")


# The on-disk names of quantized matrices' pieces in the formats thinktalk reads (for messages only).
QUANTIZED_SUFFIXES = frozenset({"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                                "qweight", "qzeros", "scales", "g_idx", "weight_scale_inv", "input_scale"})


def _quantized_piece(checkpoint_dir: Path, keys: list[str]) -> str | None:
    """For a float model: the message when the checkpoint holds pieces of quantized matrices."""
    for key in keys:
        if key.rpartition(".")[2] in QUANTIZED_SUFFIXES:
            return (f"{checkpoint_dir}: tensor {key} is a piece of a quantized matrix, but config.json has no "
                    f"quantization_config, so {key.rpartition('.')[0]} is loaded as a float .weight")
    return None


def _open_shard(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file; truncated or corrupt? ({error})") from None


def _read_tensor(shard, path: Path, key: str, shape: tuple[int, ...] | None) -> torch.Tensor:
    """One tensor, its shape checked before it is read (None: any shape)."""
    found_shape = tuple(shard.get_slice(key).get_shape())
    if shape is not None and found_shape != tuple(shape):
        raise CheckpointError(f"{path}: tensor {key} has shape {list(found_shape)}, expected {list(shape)}")
    try:
        return shard.get_tensor(key)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: tensor {key} cannot be read; truncated or corrupt? ({error})") from None


def _copy_tensor(shard, path: Path, source: TensorSource, target: torch.Tensor, device: torch.device) -> None:
    tensor = _read_tensor(shard, path, source.key, source.shape)
    if not tensor.is_floating_point():
        raise CheckpointError(f"{path}: tensor {source.key} has dtype {tensor.dtype}, expected a floating type")
    with torch.no_grad():
        target.data[source.index].copy_(tensor.to(device=device, dtype=target.dtype))


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool | None):
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc="loading weights", unit="tensor")


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Turn a model built on the meta device into uninitialised storage on `device` (filled by load_weights)."""
    assert not any(True for _ in model.buffers()), "thinktalk modules keep no buffers; constants are computed"
    return model.to(dtype=dtype).to_empty(device=device)
