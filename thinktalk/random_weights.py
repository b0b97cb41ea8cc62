"""Strong random weights made where the model lives, and a reference model (transformers) that shares them.

Full size (35e9 parameters, 70.5 GB in bf16) leaves room on one 80 GB GPU for one copy of the weights only, so:

    model = random_model(config, device, dtype, seed)    # built on meta, materialised, randomize_()d in place
    reference, report = tied_reference(model, config)    # the reference's parameters ARE thinktalk's tensors

`randomize_` draws each tensor in place (`Tensor.normal_`, no temporary) from its own seeded generator on the
tensor's device, so a tensor's values depend on (seed, its name, device type) and not on the order of the others.
The distribution is the one the parity tests use (tests/checkpoints.py): matrices N(0, 1/sqrt(fan_in)) so that MoE
routing spreads over experts, embeddings N(0, 1), output heads HEAD_GAIN times stronger so that top-1 tokens are
well separated, norm scales near 1, other vectors small; code2wav's SnakeBeta, layer scales and gains are set so
that the wave is audible and mostly inside [-1, 1].

`tied_reference` builds the reference on the meta device and sets each of its parameters to the thinktalk tensor
holding the same values. The names are mapped through the checkpoint: the reference's own save-time conversion
(`transformers.core_model_loading.revert_weight_conversion`) gives the on-disk names of a reference parameter, and
`thinktalk.weights` gives the thinktalk parameter each on-disk name lands in. A parameter is shared when the two
in-memory layouts agree element for element (checked by running the reference's conversion on a small index probe),
which holds for every parameter of the released structure; a layout that differed would be an error naming the
tensor, never a silent copy. The reference's only own memory is its buffers (rotary frequencies, the audio
encoder's sinusoids, code2wav's code offsets), computed by its own initialisation on the device.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from .config import parse_config
from .models.code2wav import Code2Wav
from .models.omni import OmniModel
from .quant.modules import quantize_modules, quantized_matrices
from .quant.spec import QuantizeOnLoad
from .weights import sources_of, checkpoint_layout, materialize

# Distribution of the random weights (see the module docstring).
HEAD_GAIN = 4.0  # output heads (thinker lm_head, talker codec_head, code predictor heads)
NORM_STD = 0.1  # norm scales ~ N(1, NORM_STD)
SMALL_STD = 0.02  # biases and other vectors
SNAKE_STD = 0.3  # SnakeBeta log-alpha/log-beta: away from the identity
LAYER_SCALE_MEAN, LAYER_SCALE_STD = 0.5, 0.1  # code2wav layer scales and ConvNeXt gammas: every branch matters
DECODER_BLOCK_GAIN = 0.5  # per code2wav decoder block: random blocks otherwise double the amplitude each
CODE2WAV_GAIN = 4.0  # the last conv: the wave mostly inside [-1, 1] (tests/checkpoints.py: strengthen_code2wav_)
OUTPUT_HEADS = ("lm_head", "codec_head")
PROBE_DIM = 12  # the layout probe shrinks each dim to gcd(dim, 12): keeps halves/thirds/quarters, costs nothing


# ----------------------------------------------------------------------------------------------------------------
# Strong random weights


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the global seed and the parameter's name (independent of iteration order)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _fan_in(name: str, param: torch.Tensor) -> int:
    """Inputs per output: the last dim of a matrix or a stacked expert matrix; in_channels * kernel of a conv."""
    if param.dim() == 2 or "experts" in name:
        return param.shape[-1]
    return math.prod(param.shape[1:])


def _mean_std(name: str, param: torch.Tensor, embeddings: set[str]) -> tuple[float, float]:
    if name in embeddings:
        return 0.0, 1.0
    if param.dim() >= 2:
        gain = HEAD_GAIN if any(head in name for head in OUTPUT_HEADS) else 1.0
        return 0.0, gain / math.sqrt(_fan_in(name, param))
    if name.endswith((".alpha", ".beta")):
        return 0.0, SNAKE_STD
    if name.endswith(("layer_scale.scale", ".gamma")):
        return LAYER_SCALE_MEAN, LAYER_SCALE_STD
    if "norm" in name or name.endswith(".weight"):
        return 1.0, NORM_STD
    return 0.0, SMALL_STD


def random_model(config: dict, device: torch.device | str, dtype: torch.dtype, seed: int,
                 audio_output: bool = True, quantize: "str | QuantizeOnLoad | None" = None) -> OmniModel:
    """An OmniModel for `config` (a config.json as a dict) with strong random weights, built without a host copy:
    meta device -> uninitialised storage on `device` -> drawn in place. Eval mode. With `quantize` ("int8", "int4",
    "fp8" or a QuantizeOnLoad) the quantized matrices are drawn directly in their stored form (never a float copy:
    the full-size int4 model is 18 GiB where its bf16 copy would be 66)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = OmniModel(parse_config(config), audio_output=audio_output)
    if quantize is not None:
        options = quantize if isinstance(quantize, QuantizeOnLoad) else QuantizeOnLoad(quantize)
        quantize_modules(model, options.plan(), dtype, device.type)
    model = materialize(model, device, dtype).eval()
    randomize_(model, seed)
    return model


@torch.no_grad()
def randomize_(model: OmniModel, seed: int) -> None:
    """Overwrite every parameter in place with strong random values, drawn on the parameter's own device."""
    embeddings = {f"{path}.weight" for path, module in model.named_modules() if isinstance(module, nn.Embedding)}
    quantized = quantized_matrices(model)
    for name, param in model.named_parameters():
        if name.rpartition(".")[0] in quantized:
            continue
        generator = torch.Generator(param.device).manual_seed(tensor_seed(seed, name))
        mean, std = _mean_std(name, param, embeddings)
        param.normal_(mean, std, generator=generator)
    for name, matrices in quantized.items():  # as the float matrices: N(0, gain / sqrt(fan_in))
        generator = torch.Generator(next(matrices.parameters()).device).manual_seed(tensor_seed(seed, name))
        gain = HEAD_GAIN if any(head in name for head in OUTPUT_HEADS) else 1.0
        matrices.random_(generator, gain / math.sqrt(matrices.in_features))
    if model.code2wav is not None:
        _condition_code2wav_(model.code2wav)


def _condition_code2wav_(code2wav: Code2Wav) -> None:
    """Halve each decoder block's gain (activations stay O(1), SnakeBeta's sin() well conditioned) and scale the
    last conv so that the wave stays mostly inside [-1, 1]. Same module paths as the reference's code2wav."""
    for block in code2wav.decoder[1:-2]:
        block.block[1].conv.weight.mul_(DECODER_BLOCK_GAIN)
        for unit in block.block[2:]:
            unit.conv2.conv.weight.mul_(DECODER_BLOCK_GAIN)
    code2wav.decoder[-1].conv.weight.mul_(CODE2WAV_GAIN)


# ----------------------------------------------------------------------------------------------------------------
# A reference model sharing thinktalk's tensors


@dataclass
class TieReport:
    shared: dict[str, str] = field(default_factory=dict)  # reference parameter -> thinktalk parameter
    shared_bytes: int = 0
    buffers: dict[str, int] = field(default_factory=dict)  # the reference's own buffers -> bytes (its only memory)

    @property
    def own_bytes(self) -> int:
        return sum(self.buffers.values())

    def summary(self) -> str:
        return (f"reference shares {len(self.shared)} parameters ({self.shared_bytes / 1e9:.2f} GB) with thinktalk; "
                f"0 parameters copied; its own memory: {len(self.buffers)} buffers, {self.own_bytes / 1e6:.2f} MB")


def tied_reference(ours: OmniModel, config: dict) -> tuple[nn.Module, TieReport]:
    """The reference Qwen3OmniMoeForConditionalGeneration for `config` (the checkpoint's config.json as a dict),
    its parameters thinktalk's tensors, its buffers computed on their device, in eval mode."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    param = next(ours.parameters())
    with torch.device("meta"):
        reference = Qwen3OmniMoeForConditionalGeneration._from_config(
            Qwen3OmniMoeConfig(**copy.deepcopy(config)), dtype=param.dtype)
    report = TieReport()
    ours_params = dict(ours.named_parameters())
    for ref_name, target in reference_to_thinktalk(ours, reference).items():
        module_path, _, attr = ref_name.rpartition(".")
        setattr(reference.get_submodule(module_path), attr, ours_params[target])
        report.shared[ref_name] = target
        report.shared_bytes += ours_params[target].nbytes
    report.buffers = _materialise_buffers(reference, param.device)
    if reference.has_talker:
        _work_around_talker_audio_config(reference)
    return reference.eval(), report


def reference_to_thinktalk(ours: OmniModel, reference: nn.Module) -> dict[str, str]:
    """Reference parameter name -> the thinktalk parameter with the same shape and element layout.

    Works on meta tensors (no memory). Raises ValueError naming the first parameter without a counterpart or
    whose layout differs."""
    from transformers.core_model_loading import revert_weight_conversion

    _cache_conversions(reference)
    layout = checkpoint_layout(ours)
    ours_shapes = {name: tuple(p.shape) for name, p in ours.named_parameters()}
    mapping = {}
    for ref_name, param in reference.named_parameters():
        on_disk = revert_weight_conversion(reference, {ref_name: param.detach()})
        targets = {layout[key].target for key in on_disk if key in layout}
        if len(targets) != 1 or len(on_disk) != sum(1 for key in on_disk if key in layout):
            raise ValueError(f"reference parameter {ref_name} is stored as {sorted(on_disk)[:3]}, which thinktalk "
                             f"does not hold as one tensor")
        target = targets.pop()
        if ours_shapes[target] != tuple(param.shape):
            raise ValueError(f"reference parameter {ref_name} has shape {tuple(param.shape)}, thinktalk's {target} "
                             f"{ours_shapes[target]}")
        converted = any(_geometry(piece) != _geometry(param) for piece in on_disk.values())
        if converted and not _same_layout(reference, ref_name, target, tuple(param.shape)):
            raise ValueError(f"reference parameter {ref_name} orders its elements differently from thinktalk's "
                             f"{target}: sharing it would be wrong")
        mapping[ref_name] = target
    return mapping


def _cache_conversions(reference: nn.Module) -> None:
    """revert_weight_conversion recomputes the model's conversion list (a walk over every module) on each call
    unless the model carries it, as from_pretrained leaves it; compute it once, as revert would (without
    PrefixChange, which only applies to checkpoints loaded with a prefix). 40 s -> 3 s at full size."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    if getattr(reference, "_weight_conversions", None) is None:
        conversions = get_model_conversion_mapping(reference, add_legacy=False)
        reference._weight_conversions = [c for c in conversions if not isinstance(c, PrefixChange)] or None


def _geometry(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.stride(), tensor.storage_offset()


def _same_layout(reference: nn.Module, ref_name: str, target: str, shape: tuple[int, ...]) -> bool:
    """Run the reference's save-time conversion on a small index probe of the same structure and put its pieces
    where thinktalk's loader would put them: the layouts agree iff every index lands on itself."""
    from transformers.core_model_loading import revert_weight_conversion

    probe_shape = tuple(math.gcd(d, PROBE_DIM) for d in shape)
    probe = torch.arange(math.prod(probe_shape), dtype=torch.float32).view(probe_shape)
    pieces = revert_weight_conversion(reference, {ref_name: probe})
    sources = {source.key: source for source in sources_of(target, probe_shape)}
    if set(pieces) != set(sources):
        return False
    rebuilt = torch.full(probe_shape, -1.0)
    for key, piece in pieces.items():
        rebuilt[sources[key].index] = piece
    return torch.equal(rebuilt, probe)


def _materialise_buffers(reference: nn.Module, device: torch.device) -> dict[str, int]:
    """Give every meta buffer storage on `device` and let the reference's own initialisation compute it. Only
    modules without parameters of their own own buffers here, so no (shared) parameter is touched."""
    sizes = {}
    for path, module in reference.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        if not buffers:
            continue
        assert not any(True for _ in module.parameters(recurse=False)), path
        module.to_empty(device=device, recurse=False)
        reference._init_weights(module)
        sizes.update({f"{path}.{name}": buf.nbytes for name, buf in module.named_buffers(recurse=False)})
    return sizes


def _work_around_talker_audio_config(reference: nn.Module) -> None:
    """Reference defect (REFERENCE.md): the talker's rope index reads `audio_config.n_window`, which the talker
    config lacks; give this one config instance the thinker's value."""
    n_window = reference.config.thinker_config.audio_config.n_window
    reference.talker.config.audio_config = SimpleNamespace(n_window=n_window)
