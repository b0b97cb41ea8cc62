"""Thinker prefill and decode speed on the CPU: thinktalk and the reference (transformers) side by side, one run.

    python bench/thinker_cpu.py [--size tiny|small] [--new-tokens 64] [--prompt 256] [--threads 2] [--eager]

Builds one random Qwen3-Omni checkpoint with the reference, saves it, loads it into thinktalk, and times both on
the same prompts. Prints tokens per second and the ratio. Machines are noisy: compare ratios, not absolute times.
thinktalk's decode step is compiled (ThinkerRunner(compile=True)) unless --eager; the compile happens in an
untimed warm-up run whose duration is printed. The reference runs eagerly, as transformers' generate() does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import build_reference, load_as_omni, tiny_config_dict  # noqa: E402

from thinktalk.config import SamplingConfig  # noqa: E402
from thinktalk.layers.sampler import Sampler  # noqa: E402
from thinktalk.engine.thinker_runner import ThinkerRunner, text_prefill_inputs  # noqa: E402
from thinktalk.omni import Omni  # noqa: E402


BENCH_VOCAB = 16384  # small enough that the lm_head does not dominate a step (in the real model it is ~1/10th)


def bench_config(size: str) -> dict:
    """The test suite's tiny thinker (or a wider one), with a BENCH_VOCAB-token vocabulary."""
    config = tiny_config_dict(talker=False)
    config["thinker_config"]["text_config"]["vocab_size"] = BENCH_VOCAB
    if size == "small":  # wide enough that matmuls, not Python, take most of the time
        config["thinker_config"]["text_config"].update(hidden_size=512, moe_intermediate_size=256,
                                                       num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                                       num_experts=32, num_experts_per_tok=4, num_hidden_layers=4)
        config["thinker_config"]["text_config"]["rope_parameters"]["mrope_section"] = [16, 8, 8]
        config["thinker_config"]["audio_config"]["output_dim"] = 512
        config["thinker_config"]["vision_config"]["out_hidden_size"] = 512
    return config


RUNS = 5  # every figure is the best of this many runs, for both engines: a shared machine's noise only adds time


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def thinktalk_times(omni: Omni, prompts: list[list[int]], new_tokens: int, max_len: int,
                    compile: bool) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens steps) for one batch."""
    thinker = omni.model.thinker
    runner = ThinkerRunner(thinker, len(prompts), max_len, compile=compile)
    sampler = Sampler(SamplingConfig(), len(prompts), thinker.cfg.text.vocab_size, omni.device)
    start = time.perf_counter()
    logits, _ = runner.prefill(text_prefill_inputs(thinker, prompts, omni.device))
    tokens = sampler(logits)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        tokens = runner.decode_and_sample(tokens, sampler)
    tokens.tolist()
    return prefill, time.perf_counter() - start


class TokenClock:
    """A transformers streamer that notes when each batch of tokens reaches it: first the prompt, then one put per
    generated token (on the CPU, right after that token is picked)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def reference_times(reference, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """The reference's generate(): prefill = a 1-token generate; decode = the time from its first generated token
    to its last in a (new_tokens + 1)-token generate, i.e. new_tokens decode steps, clocked by a streamer (timing
    the steps directly rather than subtracting two noisy totals, which a burst of noise can make negative)."""
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def generate(n, streamer=None):
        with torch.no_grad():
            reference.thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, streamer=streamer)

    def decode() -> float:
        clock = TokenClock()
        generate(new_tokens + 1, clock)
        assert len(clock.times) == new_tokens + 2, len(clock.times)  # the prompt, then every generated token
        return clock.times[-1] - clock.times[1]

    prefill = best_of(RUNS, lambda: generate(1))
    return prefill, min(decode() for _ in range(RUNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["small", "tiny"], default="tiny")
    parser.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--eager", action="store_true", help="do not compile thinktalk's decode step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    reference = build_reference(bench_config(args.size), seed=0)
    omni = load_as_omni(reference)

    print(f"thinker on CPU, {args.size} random model (vocab {BENCH_VOCAB}), float32, {args.threads} threads, "
          f"prompt {args.prompt} tokens, {args.new_tokens} new tokens (greedy), thinktalk decode "
          f"{'eager' if args.eager else 'compiled'}")
    print(f"{'batch':>5} | {'':9} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, omni.cfg.thinker.text.vocab_size, (batch, args.prompt), generator=gen).tolist()
        max_len = args.prompt + args.new_tokens + 1  # one cache shape per batch: the warm-up's compile serves all
        start = time.perf_counter()
        thinktalk_times(omni, prompts, 4, max_len, not args.eager)  # warm-up (and compile), not timed
        warm_up = time.perf_counter() - start
        runs = [thinktalk_times(omni, prompts, args.new_tokens, max_len, not args.eager) for _ in range(RUNS)]
        ours = (min(r[0] for r in runs), min(r[1] for r in runs))
        theirs = reference_times(reference, prompts, args.new_tokens)
        rows = {"thinktalk": ours, "reference": theirs}
        for name, (prefill, decode) in rows.items():
            print(f"{batch:>5} | {name:9} {batch * args.prompt / prefill:14.0f} {batch * args.new_tokens / decode:13.1f}")
        print(f"{batch:>5} | {'ratio':9} {theirs[0] / ours[0]:13.2f}x {theirs[1] / ours[1]:12.2f}x"
              f"   (thinktalk warm-up{'' if args.eager else ' incl. compile'}: {warm_up:.1f} s, untimed)")


if __name__ == "__main__":
    main()
