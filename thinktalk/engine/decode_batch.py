"""Continuous batching of the Thinker: concurrent replies share one static-shape decode step.

    SharedDecodeBatch(thinker, rows, max_len)     one ThinkerRunner of shape (rows, max_len), built once
    .lease(inputs, sampler, budget, stops)        a free row for one reply, or None (no free row, or too long):
        the prompt is prefilled alone (batch 1, a temporary cache of its own length, its deepstack hook and kept
        hidden states), its K/V are copied into the row of the shared cache and the row's cursor is set
    BatchLease.next_token()                       the reply's next token from the row's buffer; an empty buffer
        runs ONE decode step for every leased row, and each stepping row's token joins that row's buffer
    BatchLease.close()                            the row is free again (the reply ended, or its stream closed)

Rows join and leave between steps. A step covers the leading rows up to the highest one stepping, rounded up to a
power of two (`step_rows`): a few static shapes, each compiled or captured once. Rows may run
ahead of their consumer (a spoken reply reads its text slowly): their tokens wait in the buffer. Free rows and rows
that have finished still compute (static shapes) but are parked at slot 0 of their own row, so their writes stay in
bounds and touch nobody else; their tokens are dropped. Each reply keeps its own Sampler (parameters, seed,
repetition-penalty history), applied to its row's logits, so a reply gets the tokens it would get alone.
Not thread-safe: one thread drives every lease (the server's engine worker does).
"""

from __future__ import annotations

from collections import deque

import torch

from ..config import SamplingConfig
from ..models.thinker import Thinker
from .sampler import Sampler
from .thinker_runner import PrefillInputs, ThinkerRunner

DEFAULT_MAX_LEN = 4096  # cache slots per row (prompt + reply): most chats fit; longer requests run privately


def check_batching(rows: int, max_len: int) -> None:
    """Raises ValueError naming the bad value."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"batch rows must be an integer >= 1, got {rows!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"batch max_len must be an integer >= 2 (one prompt and one reply token), got {max_len!r}")


def step_rows(needed: int, rows: int) -> int:
    """How many leading rows a step covers when rows [0, needed) must step: the next power of two, at most `rows`.
    Leases take the lowest free row, so few requests step few rows (a step's cost grows with its rows: the output
    layer, and on a GPU the experts the rows route to); a handful of row counts means a handful of graphs."""
    covered = 1
    while covered < needed:
        covered *= 2
    return min(covered, rows)


class BatchLease:
    """One reply's row of a SharedDecodeBatch: its tokens in order, then its release."""

    def __init__(self, batch: SharedDecodeBatch, row: int, sampler: Sampler, budget: int, stops: set[int],
                 kept: torch.Tensor | None):
        self.batch, self.row, self.sampler, self.budget, self.stops = batch, row, sampler, budget, stops
        self.kept = kept  # (1, seq, hidden) hidden states kept by the prefill for the talker, or None
        self.buffer: deque[int] = deque()  # produced, not yet taken by the consumer
        self.produced = 0
        self.stepping = True  # False once the row produced a stop token or its budget
        self.released = False
        params = sampler.params
        # A plain greedy row is picked by one argmax over the whole batch (inside the compiled step if all are).
        self.plain_greedy = (not params.do_sample and params.repetition_penalty == 1.0
                             and sampler.suppress_ids is None)

    def push(self, token: int) -> None:
        """The row produced `token` (the batch calls this)."""
        assert self.stepping and not self.released, (self.row, self.stepping, self.released)
        self.buffer.append(token)
        self.produced += 1
        if token in self.stops or self.produced >= self.budget:
            self.stepping = False
            self.batch.stop_row(self.row)

    def next_token(self) -> int:
        assert not self.released, f"row {self.row} was released"
        if not self.buffer:
            assert self.stepping, f"row {self.row}: asked for a token past the reply's end"
            self.batch.step()
        return self.buffer.popleft()

    def close(self) -> None:
        """Frees the row; safe to call more than once."""
        if not self.released:
            self.released = True
            self.batch.release(self.row)


class SharedDecodeBatch:
    """One static (rows, max_len) KV cache and decode step shared by every leased reply."""

    def __init__(self, thinker: Thinker, rows: int, max_len: int, compile: bool = False):
        check_batching(rows, max_len)
        self.thinker, self.rows, self.max_len = thinker, rows, max_len
        self.runner = ThinkerRunner(thinker, rows, max_len, compile)
        device = self.runner.device
        self.last = torch.zeros(rows, dtype=torch.long, device=device)  # each row's newest token: the step's input
        self.idle = torch.ones(rows, dtype=torch.bool, device=device)  # rows not stepping (free or finished)
        # Batch-wide greedy pick: no repetition penalty, so it keeps no history and serves every plain greedy row.
        self.greedy = Sampler(SamplingConfig(), rows, thinker.cfg.text.vocab_size, device)
        self.leases: list[BatchLease | None] = [None] * rows
        self.steps = 0  # decode steps run so far (tests and benchmarks count them)
        self.rows_stepped = 0  # rows those steps covered, in all

    @property
    def leased(self) -> int:
        return sum(lease is not None for lease in self.leases)

    def fits(self, prompt_len: int, budget: int) -> bool:
        return prompt_len + budget <= self.max_len

    @torch.inference_mode()
    def lease(self, inputs: PrefillInputs, sampler: Sampler, budget: int, stops: set[int]) -> BatchLease | None:
        """A row for one prompt (batch-1 `inputs`; `sampler` batch 1, the prompt already observed), prefilled and
        holding its first token; None when no row is free or prompt + budget exceeds a row."""
        batch, seq, _ = inputs.embeds.shape
        assert batch == 1, f"a lease prefills one prompt, got {batch}"
        row = next((r for r, lease in enumerate(self.leases) if lease is None), None)
        if row is None or not self.fits(seq, budget):
            return None
        prefill = ThinkerRunner(self.thinker, 1, seq)  # a temporary cache of the prompt's own length
        logits, kept = prefill.prefill(inputs)
        self.runner.cache.copy_row(row, prefill.cache, 0, seq)
        self.runner.cursor.place(row, inputs.lengths[0], inputs.rope_deltas[0])
        first = sampler(logits)  # (1,)
        self.last[row] = first[0]
        lease = BatchLease(self, row, sampler, budget, stops, kept)
        self.leases[row] = lease
        self.idle[row] = False
        lease.push(int(first[0]))
        return lease

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every leased row still stepping; each one's token joins its buffer."""
        stepping = [lease for lease in self.leases if lease is not None and lease.stepping]
        assert stepping, "a decode step with no row stepping"
        rows = step_rows(1 + max(lease.row for lease in stepping), self.rows)
        self.runner.cursor.park(self.idle)
        if all(lease.plain_greedy for lease in stepping):
            tokens = self.runner.decode_and_sample(self.last[:rows], self.greedy, rows)
        else:
            logits = self.runner.decode_step(self.last[:rows], rows)  # (rows, vocab)
            tokens = self.greedy(logits)
            for lease in stepping:
                if not lease.plain_greedy:
                    tokens[lease.row] = lease.sampler(logits[lease.row:lease.row + 1])[0]
        self.last[:rows].copy_(tokens)
        host = tokens.tolist()  # the step's one host synchronisation
        self.steps += 1
        self.rows_stepped += rows
        for lease in stepping:
            lease.push(host[lease.row])

    def stop_row(self, row: int) -> None:
        self.idle[row] = True

    def release(self, row: int) -> None:
        assert self.leases[row] is not None, f"row {row} is not leased"
        self.leases[row] = None
        self.idle[row] = True
