"""Aggregate thinker tokens/s of N concurrent text requests, with and without continuous batching, on the CPU.

    python bench/concurrency_cpu.py [--clients 1 4 8] [--new-tokens 32] [--rows 8] [--threads 1] [--compile]
                                    [--no-reference] [--speech-frames 24]

Builds the test suite's tiny random checkpoint with the reference (transformers), loads it into thinktalk, and
runs N text requests (prompts of different lengths, greedy, no stop token: every reply has --new-tokens tokens)
as `Omni.stream` generators advanced round-robin, one event each per turn, exactly as the server's engine worker
advances them. "alone": every request owns a batch-1 runner (N decode steps per token). "batched":
`Omni.enable_batching(rows, max_len)`: the requests lease rows of one shared decode step. Time includes prompt
preparation and prefill. The reference's figure is its `thinker.generate` on the same N prompts as one padded
batch (static batching: everyone starts and ends together), greedy. Every figure is the best of RUNS runs.
Then the same for spoken replies (--speech-frames > 0): codec frames/s of N concurrent replies (greedy thinker and
talker, 2 text tokens, every reply --speech-frames - 1 frames unless it says codec EOS sooner), alone (a private
TalkerSession each) and batched (rows of the shared talker batch), with the talker steps and code-predictor passes
run per frame.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import build_reference, load_as_omni, tiny_config_dict  # noqa: E402

from thinktalk.omni import Done, Omni  # noqa: E402

RUNS = 3  # best of: a shared machine's noise only adds time
NEVER = [-1]  # a stop id the model never produces, so every reply has exactly --new-tokens tokens
WORDS = "the quick brown fox jumps over the lazy dog while a lighthouse keeper watches the grey sea".split()


def messages(i: int) -> list[dict]:
    """Request i: a user message of 3 + 2*i words (prompts of different lengths)."""
    text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + 2 * i))
    return [{"role": "user", "content": text}]


def interleaved(omni: Omni, clients: int, new_tokens: int) -> tuple[float, int, list[list[int]]]:
    """-> (seconds, reply tokens in all, each reply's tokens), the streams advanced round-robin."""
    start = time.perf_counter()
    live = {i: omni.stream(messages(i), max_new_tokens=new_tokens, do_sample=False, stop_token_ids=NEVER,
                           return_audio=False) for i in range(clients)}
    replies: list[list[int]] = [[] for _ in range(clients)]
    while live:
        for i, stream in list(live.items()):
            event = next(stream)
            if isinstance(event, Done):
                replies[i] = event.result.token_ids
                del live[i]
    return time.perf_counter() - start, sum(len(r) for r in replies), replies


def spoken(omni: Omni, clients: int, frames: int) -> tuple[float, int, list[list[int]]]:
    """-> (seconds, codec frames in all, each reply's codes), the spoken streams advanced round-robin."""
    start = time.perf_counter()
    live = {i: omni.stream(messages(i), max_new_tokens=2, do_sample=False, stop_token_ids=NEVER, return_audio=True,
                           talker_do_sample=False, talker_max_new_tokens=frames) for i in range(clients)}
    codes: list[list[int]] = [[] for _ in range(clients)]
    while live:
        for i, stream in list(live.items()):
            event = next(stream)
            if isinstance(event, Done):
                codes[i] = event.result.codes.flatten().tolist()
                del live[i]
    seconds = time.perf_counter() - start
    return seconds, sum(len(c) for c in codes) // omni.cfg.talker.num_code_groups, codes


def speech_table(omni: Omni, args: argparse.Namespace) -> None:
    print(f"\nspoken replies: greedy, {args.speech_frames} frame budget, talker rows x slots = {args.rows} x "
          f"{args.max_len + args.speech_frames}")
    print(f"{'clients':>7} | {'alone frames/s':>14} {'batched frames/s':>16} {'speed-up':>8} {'steps/frame':>11}"
          f" {'passes/frame':>12}")
    for clients in args.clients:
        omni.disable_batching()
        spoken(omni, clients, 4)  # warm-up
        alone = min(spoken(omni, clients, args.speech_frames)[0] for _ in range(RUNS))
        expected = spoken(omni, clients, args.speech_frames)[2]
        omni.enable_batching(args.rows, args.max_len, talker_max_len=args.max_len + args.speech_frames)
        shared = omni.talker_batching
        spoken(omni, clients, 4)  # warm-up, not timed
        warm_steps, warm_passes = shared.steps, shared.passes
        runs = [spoken(omni, clients, args.speech_frames) for _ in range(RUNS)]
        if any(r[2] != expected for r in runs):
            raise RuntimeError("batched spoken replies differ from the replies spoken alone")
        batched, frames = min(r[0] for r in runs), runs[0][1]
        steps, passes = (shared.steps - warm_steps) / (RUNS * frames), (shared.passes - warm_passes) / (RUNS * frames)
        print(f"{clients:>7} | {frames / alone:14.1f} {frames / batched:16.1f} {alone / batched:7.2f}x "
              f"{steps:11.3f} {passes:12.3f}")


def reference_seconds(reference, omni: Omni, clients: int, new_tokens: int) -> float:
    """The reference's generate() on the N prompts as one left-padded batch."""
    prompts = [omni.encode_prompt(messages(i)) for i in range(clients)]
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(clients, longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    start = time.perf_counter()
    with torch.no_grad():
        reference.thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=8, help="rows of the shared decode batch")
    parser.add_argument("--max-len", type=int, default=256, help="slots per row of the shared batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="compile the shared decode step")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--speech-frames", type=int, default=24, help="talker frame budget (0: no speech table)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    reference = build_reference(tiny_config_dict(talker=args.speech_frames > 0), seed=0)
    omni = load_as_omni(reference)

    print(f"thinker on CPU, tiny random model, float32, {args.threads} threads, {args.new_tokens} new tokens per "
          f"request (greedy), streams advanced round-robin; batched = {args.rows} rows x {args.max_len} slots"
          f"{', compiled step' if args.compile else ', eager'}")
    print(f"{'clients':>7} | {'alone tok/s':>11} {'batched tok/s':>13} {'speed-up':>8} {'steps/token':>11}"
          f" {'reference tok/s':>15}")
    for clients in args.clients:
        omni.disable_batching()
        interleaved(omni, clients, 4)  # warm-up
        alone = min(interleaved(omni, clients, args.new_tokens)[0] for _ in range(RUNS))
        expected = interleaved(omni, clients, args.new_tokens)[2]
        batch = omni.enable_batching(args.rows, args.max_len, compile=args.compile)
        interleaved(omni, clients, 4)  # warm-up (and compile), not timed
        warm_steps = batch.steps
        runs = [interleaved(omni, clients, args.new_tokens) for _ in range(RUNS)]
        if any(r[2] != expected for r in runs):
            raise RuntimeError("batched replies differ from the replies decoded alone")
        batched = min(r[0] for r in runs)
        tokens = clients * args.new_tokens
        steps_per_token = (batch.steps - warm_steps) / (RUNS * tokens)  # alone: (new_tokens - 1) / new_tokens
        ref = "" if args.no_reference else (
            f"{tokens / min(reference_seconds(reference, omni, clients, args.new_tokens) for _ in range(RUNS)):15.1f}")
        print(f"{clients:>7} | {tokens / alone:11.1f} {tokens / batched:13.1f} {alone / batched:7.2f}x "
              f"{steps_per_token:11.3f} {ref}")
    if args.speech_frames > 0:
        speech_table(omni, args)


if __name__ == "__main__":
    main()
