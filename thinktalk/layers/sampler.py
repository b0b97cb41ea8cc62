"""Next-token selection on the device, with static shapes and no host synchronisation.

    logits (batch, vocab) -> repetition penalty over tokens seen so far -> [greedy argmax]
                          or -> temperature -> top-k -> top-p -> multinomial draw

The repetition penalty follows the usual convention: a seen token's logit is divided by the penalty when positive
and multiplied by it when negative. `seen` is a (batch, vocab) bool tensor updated in place after every step.

Two per-request additions, for one-row samplers only (a stream's own; the batch-wide greedy pick never has them):
    constraint  a TokenConstraint (a grammar matcher, engine/constraints.py): its (vocab,) mask of allowed ids sets
                every other logit to -inf before the pick; `accept(token)` moves it past each chosen token
    logprobs    k >= 0: the chosen token's log-probability and the k most likely ids', from the raw logits (the
                model's own distribution: before the repetition penalty, the grammar mask, temperature, top-k and
                top-p, as vLLM and OpenAI report them); read back with `take_logprobs()`
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import SamplingConfig


ARGMAX_BLOCK = 128  # vocabularies are padded to multiples of 128 (16384 in the bench, 152064 in the released thinker)
BLOCKED_ARGMAX_FROM = 32768  # logits per call; below this the plain argmax wins (measured crossover)


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (batch, vocab) -> (batch,) index of the largest logit, the first one on ties (as argmax).

    torch's CPU argmax is a scalar loop, about 1 ns per logit (0.15 ms for 8 x 16384, 1.3 ms for 8 x 152064)
    while max is vectorised. So on the CPU: max of each block of 128 logits, argmax over the block maxima, then
    argmax within the winning block: the first block holding the maximum, then its first maximum, i.e. the same
    index (NaN included: both treat it as the largest). 3-7x faster from 8 x 16384 logits up.
    """
    batch, vocab = logits.shape
    if logits.device.type != "cpu" or vocab % ARGMAX_BLOCK or batch * vocab < BLOCKED_ARGMAX_FROM:
        return logits.argmax(dim=-1)
    blocks = logits.reshape(batch, vocab // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)  # (batch,)
    rows = torch.arange(batch, device=logits.device)
    return best_block * ARGMAX_BLOCK + blocks[rows, best_block].argmax(dim=-1)


class TokenConstraint(Protocol):
    """Which next tokens a request allows (a grammar over the reply, advanced token by token on the host)."""

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool on the host: True where the next token may be that id."""

    def accept(self, token: int) -> None:
        """The reply's next token was `token` (one the last mask allowed)."""


@dataclass(frozen=True)
class SampledLogprobs:
    """One pick's log-probabilities, still on the device: chosen (1,), top_ids and top_logprobs (1, k)."""

    chosen: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


class Sampler:
    def __init__(self, params: SamplingConfig, batch: int, vocab: int, device: torch.device,
                 seed: int | None = None, suppress_ids: torch.Tensor | None = None,
                 constraint: TokenConstraint | None = None, logprobs: int | None = None):
        assert batch == 1 or (constraint is None and logprobs is None), "per-request options need a one-row sampler"
        self.params = params
        self.constraint, self.logprobs = constraint, logprobs
        self._picked: SampledLogprobs | None = None  # the last pick's, until take_logprobs()
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        self.generator = None
        if params.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed if seed is not None else int(torch.seed() % (2**63)))
        # Ids never to be produced (e.g. the talker's control codes): their logits become -inf.
        self.suppress_ids = suppress_ids

    def observe(self, token_ids: torch.Tensor) -> None:
        """Mark tokens as seen for the repetition penalty. token_ids: (batch, n)."""
        if self.params.repetition_penalty != 1.0:
            self.seen.scatter_(1, token_ids, True)

    @property
    def plain(self) -> bool:
        """Nothing of this request's own: its pick may be the batch-wide one (no penalty, mask or logprobs)."""
        return (not self.params.do_sample and self.params.repetition_penalty == 1.0 and self.suppress_ids is None
                and self.constraint is None and self.logprobs is None)

    def accept(self, token: int) -> None:
        """The host has the chosen token (after the step's sync): the constraint moves past it."""
        if self.constraint is not None:
            self.constraint.accept(token)

    def take_logprobs(self) -> SampledLogprobs | None:
        picked, self._picked = self._picked, None
        return picked

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (batch, vocab) -> token ids (batch,). Also marks the chosen tokens as seen."""
        logits = raw = logits.float()
        if self.constraint is not None:
            # The mask was computed on the host from the tokens accepted so far; this copy is the pick's one
            # host-to-device transfer (a sync on a GPU: the mask must land before the masked pick reads it).
            allowed = self.constraint.allowed().to(logits.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        if self.suppress_ids is not None:
            logits = logits.index_fill(1, self.suppress_ids, float("-inf"))
        penalty = self.params.repetition_penalty
        if penalty != 1.0:
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self.seen, penalised, logits)
        if not self.params.do_sample:
            tokens = first_argmax(logits)
        else:
            tokens = self._draw(logits)
        self.observe(tokens.unsqueeze(1))
        if self.logprobs is not None:
            self._picked = _logprobs(raw, tokens, self.logprobs)
        return tokens

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = logits.topk(p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
            drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p.top_p
            drop_sorted[:, 0] = False  # explicitly: a top_p below float32's least number (5e-324) compares as 0
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, k: int) -> SampledLogprobs:
    """raw (1, vocab) float32 logits, tokens (1,) -> the chosen token's and the top k log-probabilities."""
    logprobs = raw.log_softmax(dim=-1)
    top = logprobs.topk(k, dim=-1)
    return SampledLogprobs(logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1), top.indices, top.values)
