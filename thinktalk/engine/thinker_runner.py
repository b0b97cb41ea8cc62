"""Runs the Thinker over a static KV cache: one prefill of a right-padded batch, then fixed-shape decode steps.

Cache slots: row b's prompt occupies slots [0, length_b); decode step n writes slot length_b + n. Padding tokens of
shorter rows are written past their row's length during prefill, but a query at slot s only attends to slots <= s,
all of which hold real tokens by the time it is asked, so padding never leaks into a reply.

Prefill runs in chunks of `prefill_chunk` prompt positions: chunk [start, end) writes its K/V into slots
[start, end) and attends slots [0, end) with key slot <= query slot, so the result is the one-pass result while
the activations (MoE rows = batch * chunk * top_k) stay those of one chunk; each chunk's are freed before the next.

A decode step reads and writes only device tensors (lengths, rope deltas, cache) and has static shapes, so it can
be captured as a CUDA graph; the host learns the sampled tokens only in the generation loop around it.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from ..models.thinker import Thinker
from .graphs import CapturedStep, StepMode, default_mode
from ..layers.kv_cache import CacheCursor, LayerCaches
from ..layers.sampler import Sampler


# Prompt positions per prefill chunk (per row); None = one pass. At the released widths, for a 70k-token video
# prompt, a chunk of 2048 peaks at about 1.5 GiB of bf16 (16,384 MoE rows at top_k 8, the (chunk, keys) mask, k and
# v expanded per head on CUDA), one pass at about 17 GiB (engine/memory.py's estimates). Prompts up to one chunk
# run in one pass as before. Longer ones pay for masked attention (no causal block skipping): on the CPU, tiny
# model, 4,096 tokens, one thread: 0.25-0.29 s in one pass, 0.50-0.59 s in chunks of 2048 (measured).
PREFILL_CHUNK = 2048


class PromptHook(Protocol):
    """A decoder LayerHook over whole prompts that can be narrowed to the prompt positions [start, end)."""

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor: ...

    def window(self, start: int, end: int) -> "PromptHook": ...


@dataclass
class PrefillInputs:
    """A right-padded batch of prompts, ready for the language model."""

    token_ids: torch.Tensor  # (batch, seq) long; a short row is padded with its own last token
    embeds: torch.Tensor  # (batch, seq, hidden)
    positions: torch.Tensor  # (3, batch, seq) TM-RoPE positions
    lengths: torch.Tensor  # (batch,) long: real tokens per row
    rope_deltas: torch.Tensor  # (batch,) float: decode position = cache slot + delta (fractional for some videos)
    after_layer: PromptHook | None = None  # deepstack injection of visual features
    keep_hidden: int | None = None  # also return hidden states after this many layers (for the talker)


def text_prefill_inputs(thinker: Thinker, prompts: list[list[int]], device: torch.device) -> PrefillInputs:
    """Token-id prompts of different lengths -> PrefillInputs with plain text positions (t = h = w = index)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row] = prompt[-1]  # padding repeats a token the row already has: harmless to the repetition penalty
        ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    ids = ids.to(device)
    positions = torch.arange(longest, device=device).view(1, 1, -1).expand(3, len(prompts), -1)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    return PrefillInputs(ids, thinker.embed(ids), positions, lengths, torch.zeros(len(prompts), device=device))


def prefill_chunk(thinker: Thinker, cache: LayerCaches, inputs: PrefillInputs, start: int, end: int,
                  seq: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt positions [start, end) of `inputs` (padded to `seq`) into `cache` (slots [start, end); slots [0, start)
    already hold the earlier positions) -> (logits at each row's last prompt token, clamped into the chunk
    (batch, vocab); hidden states kept for the talker (batch, end - start, hidden) or None)."""
    batch = inputs.embeds.shape[0]
    device = inputs.embeds.device
    queries = torch.arange(start, end, device=device)
    slots = queries.expand(batch, -1)
    # The first chunk's keys are its own positions: plain causal attention, no mask in memory. A later chunk
    # attends slots [0, end) with key slot <= query slot: a (1, 1, chunk, end) mask, shared by every row.
    mask = None if start == 0 else torch.arange(end, device=device).view(1, 1, 1, -1) <= queries.view(1, 1, -1, 1)
    hook = inputs.after_layer
    if hook is not None and (start, end) != (0, seq):
        hook = hook.window(start, end)
    at = (inputs.lengths - 1 - start).clamp(0, end - start - 1)
    logits, _, kept = thinker(inputs.embeds[:, start:end], inputs.positions[:, :, start:end], mask=mask,
                              cache=cache, slots=slots, key_len=end, after_layer=hook,
                              keep_hidden=inputs.keep_hidden, logits_at=at)
    return logits, kept


class DecodeStep:
    """One decode step of a runner's leading `rows` rows: tokens (rows,) -> next-token logits (rows, vocab).

    Reads and writes only device tensors of fixed shapes (the cache rows, the cursor), so it can be compiled or
    captured as a CUDA graph. It holds the model, cache and cursor but not the runner: a captured graph's memory
    goes with the runner, with no reference cycle to wait for.
    """

    def __init__(self, thinker: Thinker, cache: LayerCaches, cursor: CacheCursor, rows: int):
        self.thinker, self.cache, self.cursor, self.rows = thinker, cache.first_rows(rows), cursor, rows

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        slots, positions, mask = self.cursor.step(self.rows)
        embeds = self.thinker.embed(tokens.unsqueeze(1))
        logits, _, _ = self.thinker(embeds, positions, mask=mask, cache=self.cache, slots=slots)
        return logits[:, -1]


class DecodeAndPick:
    """A DecodeStep with a greedy sampler's pick fused in: (tokens (rows,), sampler) -> next tokens (rows,)."""

    def __init__(self, step: DecodeStep):
        self.step = step

    def __call__(self, tokens: torch.Tensor, sampler: Sampler) -> torch.Tensor:
        return sampler(self.step(tokens))


class ThinkerRunner:
    """Owns one static KV cache and where each row stands in it; runs prefills and decode steps.

    Decode steps run in a StepMode (engine/graphs.py), from the outside (the layers stay plain eager code):
      GRAPH (default on CUDA): each step shape is captured once as a CUDA graph and replayed, one launch per step.
      COMPILED (`compile=True`): torch.compile, one static-shape graph per (rows, max_len), fused into C++ loops
        on the CPU with a C++ wrapper, so a step does not return to Python between kernels. The first step of a new
        shape pays for compiling (tens of seconds on a small CPU); later runners of the same shape reuse the graph,
        so it suits a server that keeps one (batch, max_len); past torch._dynamo's recompile limit (8 shapes) new
        shapes run eagerly.
      EAGER (default on the CPU): plain calls.
    A step may cover only the leading `rows` rows of the batch (`rows=`): a shared batch with few requests steps
    only the rows in use (each row count is its own static shape, so its own graph). Prefill stays eager: its
    shapes change with every prompt. `decode_step` returns logits; `decode_and_sample` also picks the next tokens,
    inside the same compiled graph when the sampler is greedy (COMPILED mode; the two compile apart).
    """

    def __init__(self, thinker: Thinker, batch: int, max_len: int, compile: bool = False,
                 prefill_chunk: int | None = PREFILL_CHUNK, mode: StepMode | None = None):
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be an integer >= 1 or None, got {prefill_chunk!r}")
        param = thinker.model.embed_tokens.weight  # device and dtype (an embedding is never quantized)
        self.thinker, self.batch, self.max_len, self.prefill_chunk = thinker, batch, max_len, prefill_chunk
        self.device = param.device
        self.cache = LayerCaches(thinker.cfg.text, batch, max_len, param.dtype, param.device)
        self.cursor = CacheCursor(batch, max_len, self.device)
        self.mode = StepMode.COMPILED if compile else (default_mode(self.device) if mode is None else mode)
        self._steps: dict[int, CapturedStep] = {}  # rows -> the logits step over rows [0, rows)
        self._picks: dict[int, CapturedStep] = {}  # rows -> the step with a greedy pick fused in (COMPILED only)

    @torch.inference_mode()
    def prefill(self, inputs: PrefillInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (logits at each row's last prompt token (batch, vocab), kept hidden states (batch, seq, hidden) or
        None). Runs in chunks of `prefill_chunk` positions (see the module notes)."""
        batch, seq, hidden = inputs.embeds.shape
        assert batch == self.batch and seq <= self.max_len, (batch, seq, self.batch, self.max_len)
        self.cursor.start(inputs.lengths, inputs.rope_deltas, seq)
        chunk = seq if self.prefill_chunk is None else self.prefill_chunk
        last = inputs.lengths - 1  # (batch,) position of each row's last prompt token
        logits = None
        kept = None if inputs.keep_hidden is None else inputs.embeds.new_empty(batch, seq, hidden)
        for start in range(0, seq, chunk):
            end = min(start + chunk, seq)
            chunk_logits, chunk_kept = prefill_chunk(self.thinker, self.cache, inputs, start, end, seq)
            # A row's logits come from the chunk holding its last prompt token (device ops: no host sync).
            inside = ((last >= start) & (last < end)).unsqueeze(1)
            logits = chunk_logits if logits is None else torch.where(inside, chunk_logits, logits)
            if kept is not None:
                kept[:, start:end] = chunk_kept
        return logits, kept

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """tokens: (rows,) the last sampled token of each of the leading `rows` rows (default: every row) ->
        next-token logits (rows, vocab). Only those rows' cursors advance and only their cache rows are written.
        In GRAPH mode the logits are the graph's output buffer: valid until the next step (consume or clone)."""
        return self._step(rows)(tokens)

    @torch.inference_mode()
    def decode_and_sample(self, tokens: torch.Tensor, sampler: Sampler, rows: int | None = None) -> torch.Tensor:
        """tokens: (rows,) the last sampled token per row -> the next token per row (rows,).

        COMPILED with a greedy sampler (plain tensor code): the pick runs inside the compiled step, one call with
        the argmax fused in, instead of a compiled step plus a dozen eager ops (9-12% of a tiny-model step). A
        drawing sampler needs its torch.Generator, which torch.compile cannot trace: it runs after the step, as
        does every sampler in the other modes.
        """
        if self.mode is not StepMode.COMPILED or sampler.generator is not None:
            return sampler(self._step(rows)(tokens))
        rows = self.batch if rows is None else rows
        if rows not in self._picks:
            self._picks[rows] = CapturedStep(DecodeAndPick(DecodeStep(self.thinker, self.cache, self.cursor, rows)),
                                             self.mode, self.device)
        return self._picks[rows](tokens, sampler)

    def _step(self, rows: int | None) -> CapturedStep:
        rows = self.batch if rows is None else rows
        assert 1 <= rows <= self.batch, (rows, self.batch)
        if rows not in self._steps:
            self._steps[rows] = CapturedStep(DecodeStep(self.thinker, self.cache, self.cursor, rows), self.mode,
                                             self.device)
        return self._steps[rows]
