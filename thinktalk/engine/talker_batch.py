"""The talker's rows: concurrent spoken replies share each talker step and code-predictor pass. Every piece of work
is an explicit call the scheduler makes.

    batch = TalkerBatch(talker, cfg, rows, max_len)   one (rows, max_len) talker KV cache and cursor, one
                                                      code-predictor workspace of batch `rows`, built once
    row = batch.take_row()                            the lowest free row, or None
    code0 = batch.prefill(row, prefill, samplers)     the talker prompt into the row: frame 0's code0 (host int)
    frames = batch.complete({row: samplers, ...})     ONE code-predictor pass for those rows -> {row: (codes
                                                      (1, groups), codec sum (1, hidden))}, the caller's to keep
    batch.deposit(row, codec_sum + text_embed)        the row's next input
    code0s = batch.step()                             ONE talker step for every deposited row -> {row: code0}
    batch.release(row)

A step covers the leading rows (`step_rows`); rows inside it that did not deposit are held (their cursor does not
advance, so their write lands on the slot their own next step overwrites before reading, and they keep their hidden
state and code0). A pass restarts the workspace at slot 0 for every lane; lanes not asked for compute harmlessly
and draw nothing. Each reply keeps its own samplers (TalkerSamplers), applied to its own row's logits and drawing
from its own generator once per call, in the order it would alone, so a reply gets exactly the codes it gets alone.

The steps run eagerly: the rows drawing change from call to call, each with its own generator, so neither is one
CUDA graph (a private TalkerSession is). Shapes are static per covered row count; a step synchronises with the host
once (the rows' new code0, which the scheduler needs to know whether a reply goes on).
"""

from __future__ import annotations

import torch

from ..config import OmniConfig
from ..layers.kv_cache import CacheCursor, LayerCaches
from ..layers.sampler import Sampler, first_argmax
from ..models.talker import Talker
from .talker_prompt import TalkerPrefill
from .talker_session import TalkerSamplers, prefill_talker
from .thinker_batch import RowPool, check_batching, step_rows


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


class TalkerBatch:
    """One static (rows, max_len) talker KV cache, step and code-predictor pass shared by every row's reply."""

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
        self.samplers: dict[int, TalkerSamplers] = {}  # rows deposited for the next step -> their samplers
        self.pool = RowPool(rows)
        self.steps = self.passes = 0  # talker steps and code-predictor passes run (tests and benchmarks count)
        self.rows_stepped = self.rows_passed = 0  # lanes they covered, in all

    @property
    def leased(self) -> int:
        return self.pool.leased

    @property
    def has_deposits(self) -> bool:
        return bool(self.samplers)

    def fits(self, prompt_len: int, max_frames: int) -> bool:
        return prompt_len + max_frames + 1 <= self.max_len  # a TalkerSession's cache length

    def take_row(self) -> int | None:
        return self.pool.take()

    @torch.inference_mode()
    def prefill(self, row: int, prefill: TalkerPrefill, samplers: TalkerSamplers) -> int:
        """The talker prompt into `row` (in place) -> frame 0's code0."""
        seq = prefill.embeds.shape[1]
        cursor = CacheCursor(1, seq, self.device)
        hidden, logits = prefill_talker(self.talker, prefill, self.cache.row(row), cursor)
        self.cursor.place(row, cursor.lengths[0], cursor.rope_deltas[0])
        code0 = samplers.code0(logits)  # (1,)
        self.hidden[row], self.code0[row] = hidden[0], code0[0]
        self.free[row] = False
        self.cursor.park(self.free)
        return int(code0[0])

    @torch.inference_mode()
    def complete(self, rows: dict[int, TalkerSamplers]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """One code-predictor pass for `rows` (their code0 is the newest) -> each row's frame."""
        lanes = step_rows(1 + max(rows), self.rows)
        sampler = RowSamplers({row: s.residual for row, s in rows.items()})
        # RowSamplers stands in for a Sampler: the pass only calls it on (lanes, vocab) logits.
        codes, codec_sum = self.talker.complete_frame(self.hidden[:lanes], self.code0[:lanes],
                                                      self.workspace.first_rows(lanes), sampler)
        self.passes += 1
        self.rows_passed += lanes
        return {row: (codes[row:row + 1].clone(), codec_sum[row:row + 1].clone()) for row in rows}

    def deposit(self, row: int, embeds: torch.Tensor, samplers: TalkerSamplers) -> None:
        """embeds: (1, hidden), the codec sum of the row's last frame plus the text embedding for the next step."""
        self.inputs[row] = embeds[0]
        self.deposited[row] = True
        self.samplers[row] = samplers

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """One talker step for every deposited row; each samples its next code0 with its own sampler."""
        assert self.samplers, "a talker step with no row deposited"
        lanes = step_rows(1 + max(self.samplers), self.rows)
        advance = self.deposited[:lanes]
        slots, positions, mask = self.cursor.step(lanes, advance)
        hidden, logits = self.talker(self.inputs[:lanes].unsqueeze(1), positions, mask,
                                     self.cache.first_rows(lanes), slots)
        # Held rows keep their state: a fresh row may still wait for its pass.
        self.hidden[:lanes] = torch.where(advance.unsqueeze(1), hidden[:, -1], self.hidden[:lanes])
        for row, samplers in self.samplers.items():
            self.code0[row] = samplers.code0(logits[row:row + 1, -1])[0]
        self.deposited[:lanes] = False
        host = self.code0[:lanes].tolist()  # the step's one host synchronisation
        stepped = {row: host[row] for row in self.samplers}
        self.samplers = {}
        self.steps += 1
        self.rows_stepped += lanes
        return stepped

    def release(self, row: int) -> None:
        self.pool.give_back(row)
        self.samplers.pop(row, None)
        self.deposited[row] = False
        self.free[row] = True
        self.cursor.park(self.free)
