"""The thinker's rows: one static (rows, max_len) KV cache whose rows streams hold, prefilled in place, decoded
together. Every piece of work is an explicit call the scheduler makes; nothing steps by itself.

    batch = ThinkerBatch(thinker, rows, max_len)
    row = batch.take_row()                                 the lowest free row, or None
    batch.write_prefix(row, prefix)                        a cached conversation prefix's K/V into the row
    logits, kept = batch.prefill_chunk(row, inputs, start, end)   prompt positions [start, end) into the row
    batch.start_decoding(row, inputs, first_token, sampler)        the row steps from now on
    tokens = batch.step()                                  one decode step for every decoding row -> {row: token}
    batch.stop(row) / batch.release(row)                   the row stops stepping / is free again

A prefill writes straight into its row (a one-row view of the shared cache, no copy) in chunks, so the scheduler can
run one chunk of a long prompt between decode steps. A step covers the leading rows up to the highest one decoding,
rounded up to a power of two (`step_rows`): a few static shapes, each compiled or captured once. Rows inside a step
that do not decode (free, prefilling, stopped) are parked at the last slot of their own row (CacheCursor.park), the
one slot no prompt or reply of theirs holds data in. Each row keeps its own Sampler, so a reply gets the tokens it
would get alone.

A stream decoding alone takes a one-row batch from `PrivateRows`, which keeps released ones between requests, by
row length rounded up to a power of two: a decode step's graph (CUDA) or compiled code is built once per length and
replayed by every later request of that length, instead of being recaptured for each reply.
"""

from __future__ import annotations

import threading

import torch

from ..config import SamplingConfig
from ..errors import RequestError
from ..layers.kv_cache import CacheCursor, LayerCaches
from ..layers.sampler import Sampler
from ..models.thinker import Thinker
from .graphs import StepMode
from .thinker_runner import PREFILL_CHUNK, PrefillInputs, ThinkerRunner, prefill_chunk

DEFAULT_MAX_LEN = 4096  # cache slots per row (prompt + reply): most chats fit; longer requests get a row of their own
PRIVATE_MIN_LEN = 256  # the shortest private row: short replies all share one step shape
PRIVATE_IDLE_LIMIT = 2  # released private batches kept, newest first (each holds its KV cache and captured steps)


def check_batching(rows: int, max_len: int) -> None:
    """Raises RequestError naming the bad value."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise RequestError(f"batch rows must be an integer >= 1, got {rows!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise RequestError(f"batch max_len must be an integer >= 2 (one prompt and one reply token), got {max_len!r}")


def step_rows(needed: int, rows: int) -> int:
    """How many leading rows a step covers when rows [0, needed) must step: the next power of two, at most `rows`.
    Rows are taken lowest first, so few streams step few rows; a handful of row counts means a handful of graphs."""
    covered = 1
    while covered < needed:
        covered *= 2
    return min(covered, rows)


class RowPool:
    """Which rows of a static batch are taken; rows are handed out lowest first (see step_rows)."""

    def __init__(self, rows: int):
        self.taken = [False] * rows

    @property
    def leased(self) -> int:
        return sum(self.taken)

    def take(self) -> int | None:
        row = next((r for r, taken in enumerate(self.taken) if not taken), None)
        if row is not None:
            self.taken[row] = True
        return row

    def give_back(self, row: int) -> None:
        assert self.taken[row], f"row {row} is not taken"
        self.taken[row] = False


class ThinkerBatch:
    def __init__(self, thinker: Thinker, rows: int, max_len: int, compile: bool = False,
                 mode: StepMode | None = None, prefill_chunk_size: int | None = PREFILL_CHUNK):
        check_batching(rows, max_len)
        self.thinker, self.rows, self.max_len, self.chunk = thinker, rows, max_len, prefill_chunk_size
        self.runner = ThinkerRunner(thinker, rows, max_len, compile, prefill_chunk_size, mode)
        self.cache: LayerCaches = self.runner.cache
        self.cursor: CacheCursor = self.runner.cursor
        device = self.runner.device
        self.last = torch.zeros(rows, dtype=torch.long, device=device)  # each row's newest token: the step's input
        self.idle = torch.ones(rows, dtype=torch.bool, device=device)  # rows not decoding (free, prefilling, done)
        # Batch-wide greedy pick: no repetition penalty, so it keeps no history and serves every plain greedy row.
        self.greedy = Sampler(SamplingConfig(), rows, thinker.cfg.text.vocab_size, device)
        self.samplers: dict[int, Sampler] = {}  # decoding rows -> their stream's sampler
        self.pool = RowPool(rows)
        self.steps = 0  # decode steps run so far (tests and benchmarks count them)
        self.rows_stepped = 0  # rows those steps covered, in all

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def leased(self) -> int:
        return self.pool.leased

    @property
    def decoding(self) -> bool:
        return bool(self.samplers)

    def fits(self, tokens: int) -> bool:
        return tokens <= self.max_len

    def take_row(self) -> int | None:
        return self.pool.take()

    def row_cache(self, row: int) -> LayerCaches:
        return self.cache.row(row)

    @torch.inference_mode()
    def prefill_chunk(self, row: int, inputs: PrefillInputs, start: int,
                      end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt positions [start, end) of the batch-1 `inputs` into row `row` (slots [start, end); earlier slots
        already hold the prompt's first `start` positions) -> (logits at the prompt's last token if it lies in
        the chunk, else at the chunk's end (1, vocab); kept hidden states of the chunk (1, end - start, hidden) or
        None)."""
        assert self.pool.taken[row] and inputs.embeds.shape[0] == 1, (row, inputs.embeds.shape)
        seq = inputs.embeds.shape[1]
        if seq > self.max_len:
            raise RequestError(f"the prompt ({seq} tokens) does not fit a cache row ({self.max_len} slots)")
        return prefill_chunk(self.thinker, self.row_cache(row), inputs, start, end, seq)

    def start_decoding(self, row: int, inputs: PrefillInputs, first: int, sampler: Sampler) -> None:
        """Row `row` holds its whole prompt and has sampled `first`: it decodes from the next step on."""
        self.cursor.place(row, inputs.lengths[0], inputs.rope_deltas[0])
        self.last[row] = first
        self.idle[row] = False
        self.samplers[row] = sampler

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """One decode step for every decoding row -> {row: its next token} (the step's one host sync)."""
        assert self.samplers, "a decode step with no row decoding"
        rows = step_rows(1 + max(self.samplers), self.rows)
        self.cursor.park(self.idle, self.max_len - 1)
        plain = {row: _plain_greedy(s) for row, s in self.samplers.items()}
        if all(plain.values()):
            tokens = self.runner.decode_and_sample(self.last[:rows], self.greedy, rows)
        else:
            logits = self.runner.decode_step(self.last[:rows], rows)  # (rows, vocab)
            tokens = self.greedy(logits)
            for row, sampler in self.samplers.items():
                if not plain[row]:
                    tokens[row] = sampler(logits[row:row + 1])[0]
        self.last[:rows].copy_(tokens)
        host = tokens.tolist()
        self.steps += 1
        self.rows_stepped += rows
        return {row: host[row] for row in self.samplers}

    def stop(self, row: int) -> None:
        """The row's reply has its last token: it steps no more (its cache stays until release)."""
        self.samplers.pop(row, None)
        self.idle[row] = True

    def release(self, row: int) -> None:
        self.stop(row)
        self.pool.give_back(row)


def _plain_greedy(sampler: Sampler) -> bool:
    """Picked by one argmax over the whole batch (inside the compiled step if all rows are); a row with a grammar
    constraint or logprobs is picked by its own sampler from the step's logits (see layers/sampler.py)."""
    return sampler.plain


def private_length(needed: int, longest: int) -> int:
    """Cache slots of a private row for `needed` positions: the next power of two from PRIVATE_MIN_LEN, but no
    longer than `longest` (the model's positions) unless `needed` itself is."""
    length = PRIVATE_MIN_LEN
    while length < needed:
        length *= 2
    return max(needed, min(length, longest))


class PrivateRows:
    """One-row ThinkerBatches for streams that decode alone, kept between requests (see the module doc).

    take(needed) -> a batch with its one row taken (a kept one of the right length, else a new one);
    give_back(batch) once the row is released. Thread-safe: the schedulers of concurrent generate calls share it.
    mode: how the batches' decode steps run (None: the device's default, a CUDA graph on a GPU).
    """

    def __init__(self, thinker: Thinker, prefill_chunk_size: int | None = PREFILL_CHUNK,
                 mode: StepMode | None = None):
        self.thinker, self.chunk, self.mode = thinker, prefill_chunk_size, mode
        self.longest = thinker.cfg.text.max_position_embeddings
        self.idle: list[ThinkerBatch] = []  # released batches, oldest first
        self.built = 0  # batches made so far (tests and benchmarks count reuse with it)
        self._lock = threading.Lock()

    def take(self, needed: int) -> ThinkerBatch:
        length = private_length(needed, self.longest)
        with self._lock:
            batch = next((b for b in reversed(self.idle) if b.max_len == length), None)
            if batch is None:
                self.built += 1
            else:
                self.idle.remove(batch)
        if batch is None:
            batch = ThinkerBatch(self.thinker, 1, length, mode=self.mode, prefill_chunk_size=self.chunk)
        row = batch.take_row()
        assert row == 0 and not batch.decoding, (row, batch.decoding)
        return batch

    def give_back(self, batch: ThinkerBatch) -> None:
        assert batch.rows == 1 and batch.leased == 0, (batch.rows, batch.leased)
        with self._lock:
            assert all(b is not batch for b in self.idle), "a private batch given back twice"
            self.idle.append(batch)
            del self.idle[:max(0, len(self.idle) - PRIVATE_IDLE_LIMIT)]  # the oldest go, with their caches and graphs
