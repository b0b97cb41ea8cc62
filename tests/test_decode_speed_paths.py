"""The fast decode paths compute what the plain eager paths compute.

- The MoE's sync-free gathered path (used inside a compiled step) equals the CPU block path.
- The sampler's blocked CPU argmax picks the same index as argmax, ties and NaN included.
- A compiled decode step (ThinkerRunner(compile=True)) gives the eager step's logits, step after step, and a second
  runner of the same shape, which reuses the compiled graph, reads and writes its own cache.
- Both decode steps (with and without the greedy sampler) trace into one graph: no host synchronisation or
  untraceable call splits them.
- decode_and_sample picks the eager runner's tokens, with the greedy sampler (repetition penalty included) inside
  the compiled step and with a drawing sampler after it.

The thinker is the test suite's tiny one with strong random weights, built directly (no reference needed).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from checkpoints import strengthen_, tiny_config_dict
from thinktalk.config import SamplingConfig, parse_config
from thinktalk.layers.sampler import Sampler, first_argmax
from thinktalk.engine.thinker_runner import DecodeAndPick, DecodeStep, ThinkerRunner, text_prefill_inputs
from thinktalk.layers.moe import SparseMoe, experts_gathered
from thinktalk.models.thinker import Thinker

ATOL = 1e-4
CPU = torch.device("cpu")
HAS_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None  # inductor's CPU backend compiles C++


@pytest.fixture(scope="module")
def thinker() -> Thinker:
    model = Thinker(parse_config(tiny_config_dict(talker=False)).thinker).eval()
    strengthen_(model, seed=3)
    return model


def random_prompts(lengths: list[int], seed: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_gathered_experts_equal_block_path(thinker, tokens):
    moe = next(m for m in thinker.modules() if isinstance(m, SparseMoe))
    x = torch.randn(tokens, thinker.cfg.text.hidden_size, generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        weights, experts = moe.gate(x)
        block = moe.experts(x, weights, experts)  # eager on the CPU: the block path
        gathered = experts_gathered(x, weights, experts, moe.experts.gate_up_proj, moe.experts.down_proj)
    assert block.abs().max() > 0.1, "experts too weak for a meaningful comparison"
    torch.testing.assert_close(gathered, block, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch, vocab", [(1, 16384), (8, 16384), (3, 152064), (2, 1000)])
def test_first_argmax_equals_argmax(batch, vocab):
    gen = torch.Generator().manual_seed(vocab + batch)
    logits = torch.randn(batch, vocab, generator=gen)
    if batch > 1:
        logits[1] = torch.randint(0, 3, (vocab,), generator=gen).float()  # ties everywhere: the first one wins
    if batch > 2:
        logits[2, 5000], logits[2, 7000] = float("nan"), float("nan")  # argmax takes the first NaN
    logits[0, vocab // 2] = 10.0  # a clear winner inside a block
    assert torch.equal(first_argmax(logits), logits.argmax(dim=-1))
    assert torch.equal(first_argmax(torch.full((batch, vocab), float("-inf"))), torch.zeros(batch, dtype=torch.long))


def test_decode_steps_trace_into_one_graph(thinker):
    runner = ThinkerRunner(thinker, 2, 12)
    prompts = random_prompts([5, 9], seed=4, vocab=thinker.cfg.text.vocab_size)
    tokens = runner.prefill(text_prefill_inputs(thinker, prompts, CPU))[0].argmax(-1)
    sampler = Sampler(SamplingConfig(repetition_penalty=1.2), 2, thinker.cfg.text.vocab_size, CPU)
    with torch.inference_mode():
        step = DecodeStep(thinker, runner.cache, runner.cursor, rows=2)
        for step, args in [(step, (tokens,)), (DecodeAndPick(step), (tokens, sampler))]:
            explained = torch._dynamo.explain(step)(*args)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_decode_steps_equal_eager_steps(thinker):
    """Two batches of the same shape, each run by an eager and a compiled runner, steps interleaved: every
    compiled step equals its eager step, so the shared compiled graph holds no runner's tensors."""
    vocab, steps = thinker.cfg.text.vocab_size, 4
    batches = [random_prompts([5, 9], seed=1, vocab=vocab), random_prompts([7, 3], seed=2, vocab=vocab)]
    pairs = []
    for prompts in batches:
        eager, compiled = ThinkerRunner(thinker, 2, 9 + steps), ThinkerRunner(thinker, 2, 9 + steps, compile=True)
        first = [r.prefill(text_prefill_inputs(thinker, prompts, CPU))[0] for r in (eager, compiled)]
        torch.testing.assert_close(first[1], first[0], atol=0, rtol=0)  # prefill is eager in both
        pairs.append((eager, compiled, first[0].argmax(-1)))
    for _ in range(steps):
        for i, (eager, compiled, tokens) in enumerate(pairs):
            expected, got = eager.decode_step(tokens), compiled.decode_step(tokens)
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
            pairs[i] = (eager, compiled, expected.argmax(-1))


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("params", [SamplingConfig(repetition_penalty=1.3),
                                    SamplingConfig(do_sample=True, top_k=20, top_p=0.9)], ids=["greedy", "draw"])
def test_compiled_decode_and_sample_picks_the_eager_tokens(thinker, params):
    vocab, steps = thinker.cfg.text.vocab_size, 4
    prompts = random_prompts([4, 9], seed=3, vocab=vocab)
    picked = []
    for compile in (False, True):
        runner = ThinkerRunner(thinker, 2, 9 + steps, compile=compile)  # the shape above: its graph is reused
        sampler = Sampler(params, 2, vocab, CPU, seed=7)
        ids = torch.tensor([p + p[-1:] * (9 - len(p)) for p in prompts])
        sampler.observe(ids)
        tokens = sampler(runner.prefill(text_prefill_inputs(thinker, prompts, CPU))[0])
        seq = [tokens]
        for _ in range(steps):
            tokens = runner.decode_and_sample(tokens, sampler)
            seq.append(tokens)
        picked.append((torch.stack(seq), sampler.seen))
    (eager_tokens, eager_seen), (compiled_tokens, compiled_seen) = picked
    assert torch.equal(compiled_tokens, eager_tokens)
    assert torch.equal(compiled_seen, eager_seen)  # the penalty's in-place bookkeeping happened inside the graph
