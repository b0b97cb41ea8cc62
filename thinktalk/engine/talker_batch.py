"""Continuous batching of the Talker: concurrent spoken replies share each talker step and code-predictor pass.

    SharedTalkerBatch(talker, cfg, rows, max_len)   one (rows, max_len) talker KV cache and cursor, one
                                                    code-predictor workspace of batch `rows`, built once
    .lease(prefill, sampling, seed)                 a free row (the lowest) for one reply, or None (no free row, or
        prompt + frame budget exceeds a row: the caller runs a private TalkerSession, same codes). The talker prompt
        is prefilled alone (batch 1, a cache of its own length), its K/V are copied into the row, and the reply's
        own code0 sampler picks frame 0's code0
    TalkerLease.finished / complete() / advance(codec_sum, text) / close()   TalkerSession's contract

Work is lazy, so that streams advanced round-robin by one thread (the server's engine worker) batch by themselves:
    advance(...)                    only deposits the row's next input (codec sum + text embedding)
    finished / complete() of a row that deposited
                                    ONE talker step for every row that deposited, over the leading rows
                                    (`step_rows`). Rows inside the step that did not deposit (waiting, or free) are
                                    held: their cursor does not advance, so their write lands on the slot their own
                                    next step overwrites before reading, and they keep their hidden state and code0
    complete() of a row whose code0 is fresh
                                    ONE code-predictor pass for every row whose code0 is fresh and whose frame is not
                                    completed yet; other lanes compute harmlessly (every pass restarts the
                                    workspace at slot 0) and draw nothing
Each reply keeps its own samplers (`talker_samplers`, as a TalkerSession builds them), applied to its own row of the
logits; each draws from its own generator once per call, in the order it would alone, so a reply gets exactly the
codes it gets alone. A row is free again once the reply's last frame is known (`finished` is true) or on close().

The steps run eagerly: the set of rows drawing changes from call to call, and each draws from its own generator, so
neither is captured as one CUDA graph (TalkerSession's GRAPH mode). Shapes are static per covered row count and a
step synchronises with the host once (the rows' new code0, which `finished` needs), as a TalkerSession does.
Not thread-safe: one thread drives every lease.
"""

from __future__ import annotations

import enum

import torch

from ..config import OmniConfig, SamplingConfig
from ..models.talker import Talker
from .decode_batch import check_batching, step_rows
from .kv_cache import CacheCursor, LayerCaches
from .sampler import Sampler, first_argmax
from .talker_prompt import TalkerPrefill
from .talker_session import TalkerSamplers, prefill_talker, talker_samplers


class RowState(enum.Enum):
    DEPOSITED = "deposited"  # advance() left the next input: waits for a talker step
    FRESH = "fresh"  # hidden state and code0 are current: waits for a code-predictor pass
    COMPLETED = "completed"  # a pass made the frame's codes: waits for complete() to take them
    TAKEN = "taken"  # complete() returned the codes: waits for advance()


class RowSamplers:
    """The residual sampler of a batched pass: (lanes, vocab) logits -> (lanes,) codes. Each listed row goes through
    its reply's own sampler (one draw from its own generator per call, as alone); the other lanes take the argmax,
    which draws nothing. Plain greedy rows (the code predictor has no repetition penalty) take the argmax too."""

    def __init__(self, samplers: dict[int, Sampler]):
        self.samplers = {row: s for row, s in samplers.items() if s.params.do_sample}

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = first_argmax(logits.float())
        for row, sampler in self.samplers.items():
            tokens[row] = sampler(logits[row:row + 1])[0]
        return tokens


class TalkerLease:
    """One spoken reply's row of a SharedTalkerBatch, with TalkerSession's contract."""

    def __init__(self, batch: SharedTalkerBatch, row: int, samplers: TalkerSamplers, max_frames: int, code0: int):
        self.batch, self.row, self.samplers, self.max_frames = batch, row, samplers, max_frames
        self.code0 = code0  # host copy of the row's newest code0
        self.state = RowState.FRESH
        self.frames = 0
        self.codes: torch.Tensor | None = None  # (1, groups) the completed frame's codes, the caller's to keep
        self.codec_sum: torch.Tensor | None = None  # (1, hidden) their embedding sum
        self.released = False

    def done(self) -> bool:
        """The newest code0 is codec EOS, or the frame budget is spent (known without running anything)."""
        return self.code0 == self.batch.cfg.talker.codec_eos_id or self.frames >= self.max_frames - 1

    @property
    def finished(self) -> bool:
        """As TalkerSession.finished; a deposited row first needs its step. A finished reply frees its row; a
        closed one has nothing more to say."""
        if self.released:
            return True
        # A spent budget needs no step: the code0 it would sample gets no frame (a TalkerSession computes it).
        if self.state is RowState.DEPOSITED and self.frames < self.max_frames - 1:
            self.batch.step()
        if self.done():
            self.close()
            return True
        return False

    def complete(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this frame's codes (1, groups), the codec part of the next input (1, hidden)), the caller's."""
        assert not self.released, f"talker row {self.row} was released"
        if self.state is RowState.DEPOSITED:
            self.batch.step()
        assert not self.done(), f"talker row {self.row}: asked for a frame past the reply's end"
        if self.state is RowState.FRESH:
            self.batch.complete_frames()
        assert self.state is RowState.COMPLETED, (self.row, self.state)
        self.state = RowState.TAKEN
        self.frames += 1
        return self.codes, self.codec_sum

    def advance(self, codec_sum: torch.Tensor, text_embed: torch.Tensor) -> None:
        """Deposits the next input, (1, hidden) each; the step runs when a row next needs its result."""
        assert not self.released and self.state is RowState.TAKEN, (self.row, self.released, self.state)
        self.batch.deposit(self.row, codec_sum + text_embed)
        self.state = RowState.DEPOSITED

    def close(self) -> None:
        """Frees the row; safe to call more than once."""
        if not self.released:
            self.released = True
            self.batch.release(self.row)


class SharedTalkerBatch:
    """One static (rows, max_len) talker KV cache, step and code-predictor pass shared by every leased reply."""

    def __init__(self, talker: Talker, cfg: OmniConfig, rows: int, max_len: int):
        check_batching(rows, max_len)
        weight = talker.model.codec_embedding.weight  # device and dtype (an embedding is never quantized)
        self.talker, self.cfg, self.rows, self.max_len = talker, cfg, rows, max_len
        self.dtype, self.device = weight.dtype, weight.device
        self.cache = LayerCaches(cfg.talker.text, rows, max_len, self.dtype, self.device)
        self.cursor = CacheCursor(rows, max_len, self.device)
        self.workspace = talker.code_predictor.workspace(rows)
        width = cfg.talker.text.hidden_size
        self.inputs = torch.zeros(rows, width, dtype=self.dtype, device=self.device)  # deposited next inputs
        self.hidden = torch.zeros(rows, width, dtype=self.dtype, device=self.device)  # newest final-normed hidden
        self.code0 = torch.zeros(rows, dtype=torch.long, device=self.device)  # newest code0
        self.deposited = torch.zeros(rows, dtype=torch.bool, device=self.device)  # rows the next step advances
        self.free = torch.ones(rows, dtype=torch.bool, device=self.device)  # parked at slot 0 of their own row
        self.leases: list[TalkerLease | None] = [None] * rows
        self.steps = self.passes = 0  # talker steps and code-predictor passes run (tests and benchmarks count)
        self.rows_stepped = self.rows_passed = 0  # lanes they covered, in all

    @property
    def leased(self) -> int:
        return sum(lease is not None for lease in self.leases)

    def fits(self, prompt_len: int, max_frames: int) -> bool:
        return prompt_len + max_frames + 1 <= self.max_len  # a TalkerSession's cache length

    @torch.inference_mode()
    def lease(self, prefill: TalkerPrefill, sampling: SamplingConfig, seed: int | None = None) -> TalkerLease | None:
        """A row for one reply, prefilled and holding frame 0's code0; None when no row is free or it is too long."""
        batch, seq, _ = prefill.embeds.shape
        assert batch == 1, f"a lease prefills one talker prompt, got {batch}"
        row = next((r for r, lease in enumerate(self.leases) if lease is None), None)
        if row is None or not self.fits(seq, sampling.max_new_tokens):
            return None
        alone = LayerCaches(self.cfg.talker.text, 1, seq, self.dtype, self.device)  # the prompt's own length
        cursor = CacheCursor(1, seq, self.device)
        hidden, logits = prefill_talker(self.talker, prefill, alone, cursor)
        self.cache.copy_row(row, alone, 0, seq)
        self.cursor.place(row, cursor.lengths[0], cursor.rope_deltas[0])
        samplers = talker_samplers(self.cfg, sampling, seed, self.device)
        code0 = samplers.code0(logits)  # (1,)
        self.hidden[row], self.code0[row] = hidden[0], code0[0]
        self.free[row] = False
        lease = TalkerLease(self, row, samplers, sampling.max_new_tokens, int(code0[0]))
        self.leases[row] = lease
        return lease

    def deposit(self, row: int, embeds: torch.Tensor) -> None:
        self.inputs[row] = embeds[0]
        self.deposited[row] = True

    def _live(self, state: RowState) -> list[TalkerLease]:
        return [lease for lease in self.leases if lease is not None and lease.state is state]

    @torch.inference_mode()
    def step(self) -> None:
        """One talker step for every deposited row; each samples its next code0 with its own sampler."""
        stepping = self._live(RowState.DEPOSITED)
        assert stepping, "a talker step with no row deposited"
        lanes = step_rows(1 + max(lease.row for lease in stepping), self.rows)
        advance = self.deposited[:lanes]
        slots, positions, mask = self.cursor.step(lanes, advance)
        hidden, logits = self.talker(self.inputs[:lanes].unsqueeze(1), positions, mask,
                                     self.cache.first_rows(lanes), slots)
        # Held rows keep their state: a fresh row may still wait for its pass.
        self.hidden[:lanes] = torch.where(advance.unsqueeze(1), hidden[:, -1], self.hidden[:lanes])
        for lease in stepping:
            self.code0[lease.row] = lease.samplers.code0(logits[lease.row:lease.row + 1, -1])[0]
        self.deposited[:lanes] = False
        host = self.code0[:lanes].tolist()  # the step's one host synchronisation
        for lease in stepping:
            lease.code0, lease.state = host[lease.row], RowState.FRESH
        self.steps += 1
        self.rows_stepped += lanes

    @torch.inference_mode()
    def complete_frames(self) -> None:
        """One code-predictor pass for every row whose code0 is fresh and whose reply goes on."""
        passing = [lease for lease in self._live(RowState.FRESH) if not lease.done()]
        assert passing, "a code-predictor pass with no fresh row"
        lanes = step_rows(1 + max(lease.row for lease in passing), self.rows)
        sampler = RowSamplers({lease.row: lease.samplers.residual for lease in passing})
        # RowSamplers stands in for a Sampler: the pass only calls it on (lanes, vocab) logits.
        codes, codec_sum = self.talker.complete_frame(self.hidden[:lanes], self.code0[:lanes],
                                                      self.workspace.first_rows(lanes), sampler)
        for lease in passing:
            row = lease.row
            lease.codes, lease.codec_sum = codes[row:row + 1].clone(), codec_sum[row:row + 1].clone()
            lease.state = RowState.COMPLETED
        self.passes += 1
        self.rows_passed += lanes

    def release(self, row: int) -> None:
        assert self.leases[row] is not None, f"talker row {row} is not leased"
        self.leases[row] = None
        self.deposited[row] = False
        self.free[row] = True
        self.cursor.park(self.free)
