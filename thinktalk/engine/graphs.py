"""Captured steps: a static-shape step function run as one CUDA graph on a GPU, plainly or compiled on the CPU.

A decode step of a small network is dozens of tiny kernels, so on a GPU it is bound by kernel launches, not by
the GPU. `CapturedStep(fn, mode)` records fn once as a CUDA graph and then replays it: one launch per call.

    call 1 .. WARMUP_CALLS   fn(*inputs) eagerly, on a side stream: these are real calls (their results and side
                             effects count), and they do the lazy set-up (cuBLAS handles and workspaces, kernel
                             selection) that must not happen during a capture
    next call                capture fn into a graph on static copies of the inputs (a capture only records: it
                             computes nothing and changes no state), then replay it to compute this call
    every later call         copy the inputs into the static buffers, replay

Because the warm-up calls are real calls, no state needs saving and restoring around them: a step that advances a
cache cursor, fills its KV cache slot or updates a sampler's seen-token mask does so exactly once per call.

What fn may do: take tensors of fixed shapes, dtypes and devices (the same at every call), read and write
persistent device tensors (caches, cursors, masks) in place, and return a tensor or a tuple of tensors. It must
not synchronise with the host (no .item(), .tolist(), data-dependent shapes), and must draw random numbers only
from the `generators` given here: each is registered with the graph, so the offsets its draws advance by are
replayed, and replay n draws exactly what eager call n would have drawn (the generator's state is read at replay).

Output lifetime: the returned tensors are the graph's static outputs. The next call overwrites them, so a caller
that keeps an output past the next call clones it. The wrapper does not clone: most outputs of a decode step are
consumed before the next call (logits to the sampler, the picked token to the next step's input copy), and a clone
per output per step would be a kernel each, on a step that is a single launch. Eager and compiled modes return
fresh tensors, so code that follows the rule is correct in every mode.

On the CPU there are no graphs: EAGER calls fn; COMPILED calls torch.compile(fn, dynamic=False), one static-shape
graph per input shape, which inductor fuses into C++ loops (with a C++ wrapper, so a call does not return to Python
between kernels). Compiling costs seconds to minutes once per shape and process; torch.compile cannot trace a draw
from a torch.Generator (it splits the graph there), so compile pieces that have no draw inside.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

import torch

WARMUP_CALLS = 2  # eager calls before capture: the first does lazy set-up, the second runs on warmed-up state
Outputs = torch.Tensor | tuple[torch.Tensor, ...]


class StepMode(enum.Enum):
    EAGER = "eager"  # call fn
    COMPILED = "compiled"  # call torch.compile(fn, dynamic=False)
    GRAPH = "graph"  # capture fn as a CUDA graph, replay it (CUDA only)


def default_mode(device: torch.device) -> StepMode:
    """A CUDA graph on a GPU; eager on the CPU, where compiling costs far more than a short reply saves."""
    return StepMode.GRAPH if device.type == "cuda" else StepMode.EAGER


def compile_step(fn: Callable[..., Outputs], device: torch.device) -> Callable[..., Outputs]:
    """torch.compile for one static-shape step. No fullgraph=True: past torch._dynamo's recompile limit (8 shapes
    per function) a new shape then runs eagerly instead of raising."""
    options = {"cpp_wrapper": True} if device.type == "cpu" else {}
    return torch.compile(fn, dynamic=False, options=options)


class CapturedStep:
    """fn(*inputs) -> tensor or tuple of tensors, run in `mode` on `device`; see the module doc for the rules."""

    def __init__(self, fn: Callable[..., Outputs], mode: StepMode, device: torch.device,
                 generators: Sequence[torch.Generator | None] = (), warmup: int = WARMUP_CALLS):
        if mode is StepMode.GRAPH and device.type != "cuda":
            raise ValueError(f"CUDA graph capture needs a CUDA device, not {device}")
        self.fn, self.mode, self.device, self.warmup = fn, mode, device, warmup
        self.generators = [g for g in generators if g is not None]
        self._call = compile_step(fn, device) if mode is StepMode.COMPILED else fn
        self.calls = 0
        self.captures = 0  # graphs captured (GRAPH) or compilations started (COMPILED): at most one per step
        self.graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[torch.Tensor] = []
        self._outputs: Outputs | None = None
        self._stream: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor) -> Outputs:
        self.calls += 1
        if self.mode is not StepMode.GRAPH:
            if self.mode is StepMode.COMPILED and self.calls == 1:
                self.captures += 1  # torch.compile compiles at the first call
            return self._call(*inputs)
        if self.graph is None:
            if self.calls <= self.warmup:
                return self._eager_on_side_stream(inputs)
            self._capture(inputs)
        else:
            self._copy_in(inputs)
        self.graph.replay()
        return self._outputs

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _eager_on_side_stream(self, inputs: Sequence[torch.Tensor]) -> Outputs:
        # The side stream first waits for the work that produced the inputs, and the caller's stream then waits
        # for the step. Tensors the step allocates are freed to the side stream; a later warm-up call reuses them
        # only after its own wait on the caller's stream, i.e. after every use the caller enqueued.
        stream, current = self._side_stream(), torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            outputs = self.fn(*inputs)
        current.wait_stream(stream)
        return outputs

    def _capture(self, inputs: Sequence[torch.Tensor]) -> None:
        self._inputs = [x.clone() for x in inputs]  # the static input buffers; the graph reads these addresses
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:  # before the capture begins, as torch requires
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph, stream=self._side_stream()):
            self._outputs = self.fn(*self._inputs)
        self.graph = graph
        self.captures += 1

    def _copy_in(self, inputs: Sequence[torch.Tensor]) -> None:
        if len(inputs) != len(self._inputs):
            raise ValueError(f"captured step takes {len(self._inputs)} inputs, got {len(inputs)}")
        for static, x in zip(self._inputs, inputs):
            if x.shape != static.shape or x.dtype != static.dtype or x.device != static.device:
                raise ValueError(f"captured step input {tuple(x.shape)} {x.dtype} on {x.device} differs from the "
                                 f"captured {tuple(static.shape)} {static.dtype} on {static.device}")
            static.copy_(x)
