"""Runs the Thinker over a static KV cache: one prefill of a right-padded batch, then fixed-shape decode steps.

Cache slots: row b's prompt occupies slots [0, length_b); decode step n writes slot length_b + n. Padding tokens of
shorter rows are written past their row's length during prefill, but a query at slot s only attends to slots <= s,
all of which hold real tokens by the time it is asked, so padding never leaks into a reply.

A decode step reads and writes only device tensors (lengths, rope deltas, cache) and has static shapes, so it can
be captured as a CUDA graph; the host learns the sampled tokens only in the generation loop around it.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..layers.decoder import LayerHook
from ..models.thinker import Thinker
from .kv_cache import CacheCursor, LayerCaches
from .sampler import Sampler


@dataclass
class PrefillInputs:
    """A right-padded batch of prompts, ready for the language model."""

    token_ids: torch.Tensor  # (batch, seq) long; a short row is padded with its own last token
    embeds: torch.Tensor  # (batch, seq, hidden)
    positions: torch.Tensor  # (3, batch, seq) TM-RoPE positions
    lengths: torch.Tensor  # (batch,) long: real tokens per row
    rope_deltas: torch.Tensor  # (batch,) float: decode position = cache slot + delta (fractional for some videos)
    after_layer: LayerHook | None = None  # deepstack injection of visual features
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


class ThinkerRunner:
    """Owns one static KV cache and where each row stands in it; runs prefills and decode steps.

    compile=True wraps the decode step with torch.compile from the outside (the layers stay plain eager code): one
    static-shape graph per (batch, max_len), fused into C++ loops on the CPU, with a C++ wrapper there so that a
    step does not return to Python between kernels. The first decode step of a new shape pays for compiling (tens of
    seconds on a small CPU); later runners of the same shape reuse the compiled graph, so compile suits a server
    that keeps one (batch, max_len); past torch._dynamo's recompile limit (8 shapes) new shapes run eagerly.
    Prefill stays eager: its shapes change with every prompt. `decode_step` returns logits; `decode_and_sample`
    also picks the next tokens, inside the same compiled graph when the sampler is greedy (the two compile apart).
    """

    def __init__(self, thinker: Thinker, batch: int, max_len: int, compile: bool = False):
        param = thinker.lm_head.weight
        self.thinker, self.batch, self.max_len = thinker, batch, max_len
        self.device = param.device
        self.cache = LayerCaches(thinker.cfg.text, batch, max_len, param.dtype, param.device)
        self.cursor = CacheCursor(batch, max_len, self.device)
        self._step, self._step_and_pick = self._eager_step, self._eager_step_and_pick
        if compile:
            # Each traces into one graph (tests/test_decode_speed_paths.py checks it). No fullgraph=True: past the
            # recompile limit it would raise, where without it a new shape runs eagerly.
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else {}
            self._step = torch.compile(self._eager_step, dynamic=False, options=options)
            self._step_and_pick = torch.compile(self._eager_step_and_pick, dynamic=False, options=options)

    @torch.inference_mode()
    def prefill(self, inputs: PrefillInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (logits at each row's last prompt token (batch, vocab), kept hidden states or None)."""
        batch, seq, _ = inputs.embeds.shape
        assert batch == self.batch and seq <= self.max_len, (batch, seq, self.batch, self.max_len)
        slots = self.cursor.start(inputs.lengths, inputs.rope_deltas, seq)
        # Keys are the cache's first `seq` slots, written by this very prefill: plain causal attention (mask=None)
        # is exact, and needs no (seq, seq) mask in memory.
        logits, _, kept = self.thinker(inputs.embeds, inputs.positions, mask=None, cache=self.cache, slots=slots,
                                       key_len=seq, after_layer=inputs.after_layer, keep_hidden=inputs.keep_hidden,
                                       logits_at=inputs.lengths - 1)
        return logits, kept

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (batch,) the last sampled token per row -> next-token logits (batch, vocab)."""
        return self._step(tokens)

    @torch.inference_mode()
    def decode_and_sample(self, tokens: torch.Tensor, sampler: Sampler) -> torch.Tensor:
        """tokens: (batch,) the last sampled token per row -> the next token per row (batch,).

        A greedy sampler is plain tensor code, so it runs inside the compiled step: one call, with the argmax
        fused in, instead of a compiled step plus a dozen eager ops (9-12% of a tiny-model step). A drawing
        sampler needs its torch.Generator, which torch.compile cannot trace: it runs after the step.
        """
        if sampler.generator is not None:
            return sampler(self._step(tokens))
        return self._step_and_pick(tokens, sampler)

    def _eager_step_and_pick(self, tokens: torch.Tensor, sampler: Sampler) -> torch.Tensor:
        return sampler(self._eager_step(tokens))

    def _eager_step(self, tokens: torch.Tensor) -> torch.Tensor:
        slots, positions, mask = self.cursor.step()
        embeds = self.thinker.embed(tokens.unsqueeze(1))
        logits, _, _ = self.thinker(embeds, positions, mask=mask, cache=self.cache, slots=slots)
        return logits[:, -1]


@dataclass
class StepOutput:
    """One decode step seen from the host: the token each row produced, and which rows have now finished."""

    tokens: list[int]
    finished: list[bool]  # finished after this token (it was a stop token, or the budget ran out)
    active: list[bool]  # the row was still generating at this step (its token belongs to its reply)


def generate_tokens(runner: ThinkerRunner, inputs: PrefillInputs, sampler: Sampler, max_new_tokens: int,
                    stop_ids: set[int]) -> Iterator[StepOutput]:
    """Prefill, then decode until every row has produced a stop token or `max_new_tokens` tokens."""
    longest = int(inputs.lengths.max())
    if longest + max_new_tokens > runner.max_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the cache "
                         f"({runner.max_len} slots)")
    sampler.observe(inputs.token_ids)  # prompt tokens count for the repetition penalty, as in the reference
    logits, _ = runner.prefill(inputs)
    tokens = sampler(logits)
    done = [False] * runner.batch
    for step in range(max_new_tokens):
        host = tokens.tolist()
        active = [not d for d in done]
        for row, token in enumerate(host):
            if not done[row] and (token in stop_ids or step == max_new_tokens - 1):
                done[row] = True
        yield StepOutput(host, list(done), active)
        if all(done):
            return
        tokens = runner.decode_and_sample(tokens, sampler)
