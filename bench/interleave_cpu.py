"""Decode while a long prompt arrives: 8 streams decoding text when a long prompt joins mid-way. With the prefill run
in one pass (as the engine did before its scheduler: a new request's whole prefill ran while every running stream
waited) and in chunks between decode steps, side by side in one run. Tiny random checkpoint on the CPU.

    python bench/interleave_cpu.py [--streams 8] [--long-prompt 4000] [--chunk 256] [--threads 1]

Figures: the running streams' aggregate decode tokens/s from the long request's arrival to its first token, the
longest wait a running stream had between two of its tokens in that window (seconds, and in prefill units from the
scheduler's step log), and the long request's time to its first token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import build_reference, load_as_omni, tiny_config_dict  # noqa: E402

from thinktalk.events import Started, TextDelta  # noqa: E402

NEVER = [-1]


def run(omni, streams: int, long_tokens: int, chunk: int | None) -> dict[str, float]:
    omni.enable_batching(rows=streams + 1, max_len=long_tokens + 256, prefill_chunk=chunk)
    scheduler = omni.scheduler
    stamps: dict[int, list[float]] = {i: [] for i in range(streams)}
    for i in range(streams):
        request = omni.request([{"role": "user", "content": f"Stream {i}, go."}], max_new_tokens=400,
                               do_sample=False, stop_token_ids=NEVER, return_audio=False)
        omni.submit(request, lambda e, i=i: isinstance(e, TextDelta) and stamps[i].append(time.perf_counter()))
    while min(len(s) for s in stamps.values()) < 20:  # all decoding
        omni.iterate()
    long = " ".join(f"w{i}" for i in range(long_tokens))
    arrived, first = time.perf_counter(), []
    omni.submit(omni.request([{"role": "user", "content": long}], max_new_tokens=4, do_sample=False,
                             return_audio=False), lambda e: isinstance(e, Started) and first.append(time.perf_counter()))
    start_log = len(scheduler.log)
    while not first:
        omni.iterate()
    window = [[t for t in s if arrived <= t <= first[0]] for s in stamps.values()]
    gaps = [b - a for s in stamps.values() for a, b in zip(s, s[1:]) if b >= arrived and a <= first[0]]
    log = list(scheduler.log)[start_log:]
    units, most = 0, 0
    for record in log:
        if record.kind == "prefill":
            units += 1
        elif record.kind == "decode":
            most, units = max(most, units), 0
    omni.disable_batching()
    return {"decode tok/s": sum(len(w) for w in window) / (first[0] - arrived), "longest gap s": max(gaps),
            "gap in prefill units": most, "long prompt first token s": first[0] - arrived}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-prompt", type=int, default=4000, help="words in the long prompt (~2 tokens each)")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    omni = load_as_omni(build_reference(tiny_config_dict(), seed=0))
    rows = {"one-pass prefill (before)": run(omni, args.streams, args.long_prompt, None),
            f"chunks of {args.chunk} (scheduler)": run(omni, args.streams, args.long_prompt, args.chunk)}
    print(f"{args.streams} streams decoding, a {args.long_prompt}-word prompt arrives; tiny random checkpoint, CPU "
          f"float32, {args.threads} thread(s); command: {' '.join([sys.executable, *sys.argv])}")
    names = list(next(iter(rows.values())))
    print(f"{'':34} | " + " | ".join(f"{n:>24}" for n in names))
    for label, figures in rows.items():
        print(f"{label:34} | " + " | ".join(f"{figures[n]:24.3f}" for n in names))


if __name__ == "__main__":
    main()
