"""Spoken replies on the CPU: time to the first audio and real-time factor, thinktalk and the reference, one run.

    python bench/speech_cpu.py [--thinker-tokens 32] [--talker-tokens 64] [--threads 1] [--runs 3] [--compile]

One tiny random checkpoint (built by the reference, saved, loaded into thinktalk), greedy thinker and talker so
both produce the same words and the same audio. thinktalk streams: its first audio chunk leaves after one thinker
token, the talker prefill, one code-predictor pass and one Code2Wav step. The reference does not stream: its
first (and only) audio is the whole reply, after the thinker has finished. RTF = generation time / audio length.
--compile adds a row for thinktalk with the code predictor's decoder-stack runs compiled (StepMode.COMPILED; the
one-off compile time is printed apart and not counted in the runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import build_reference, load_as_omni, tiny_config_dict  # noqa: E402

from thinktalk import Omni  # noqa: E402
from thinktalk.engine.graphs import StepMode  # noqa: E402
from thinktalk.engine.scheduler import Scheduler, SchedulerOptions  # noqa: E402
from thinktalk.events import AudioChunk, Done, Failed  # noqa: E402
from thinktalk.replies import stream_spec  # noqa: E402

MESSAGES = [{"role": "user", "content": "Tell me a short story about the sea."}]


def thinktalk_run(omni: Omni, thinker_tokens: int, talker_tokens: int, chunk_frames: int,
                  mode: StepMode | None = None) -> tuple[float, float, float]:
    """(seconds to the first audio chunk, total seconds, seconds of audio). mode: how the private talker session's
    steps run (a scheduler of its own, as Omni.stream runs one, with that step mode)."""
    request = omni.request(MESSAGES, max_new_tokens=thinker_tokens, do_sample=False, stop_token_ids=[-1],
                           talker_do_sample=False, talker_max_new_tokens=talker_tokens, audio_chunk_frames=chunk_frames)
    start, first = time.perf_counter(), None
    prompt = omni.prepare(MESSAGES)
    scheduler = Scheduler(omni.model, omni.cfg, SchedulerOptions(rows=0, talker_rows=0, step_mode=mode))
    events: list = []
    scheduler.submit(stream_spec(omni.cfg, omni.tokenizer, request, prompt, True, omni.default_voice, events.append))
    while not events or not isinstance(events[-1], (Done, Failed)):
        scheduler.iterate()
        if first is None and any(isinstance(e, AudioChunk) for e in events):
            first = time.perf_counter() - start
    assert isinstance(events[-1], Done), events[-1]
    audio = events[-1].result.audio.size / events[-1].result.sample_rate
    return first, time.perf_counter() - start, audio


def reference_run(reference, ids: list[int], thinker_tokens: int, talker_tokens: int) -> tuple[float, float]:
    """(seconds to its only audio = total seconds, seconds of audio)."""
    tensor = torch.tensor([ids])
    start = time.perf_counter()
    with torch.no_grad():
        _, wav = reference.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), speaker="ethan",
                                    thinker_max_new_tokens=thinker_tokens, thinker_min_new_tokens=thinker_tokens,
                                    thinker_do_sample=False, talker_do_sample=False,
                                    talker_max_new_tokens=talker_tokens)
    return time.perf_counter() - start, wav.numel() / 24000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thinker-tokens", type=int, default=32)
    parser.add_argument("--talker-tokens", type=int, default=64, help="codec frames + 1 (12.5 frames per second)")
    parser.add_argument("--chunk-frames", type=int, default=1, help="codec frames per audio chunk")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest for tiny models (no OpenMP hand-offs)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the compiled code-predictor pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = build_reference(tiny_config_dict(), seed=0)
    omni = load_as_omni(reference)
    ids = omni.encode_prompt(MESSAGES)
    modes = {"thinktalk": StepMode.EAGER}
    if args.compile:
        modes["compiled"] = StepMode.COMPILED
    ours = {}
    for name, mode in modes.items():
        start = time.perf_counter()
        thinktalk_run(omni, 4, 4, args.chunk_frames, mode)  # warm-up (and, compiled, the compile)
        if mode is StepMode.COMPILED:
            print(f"compiling the code predictor's stack runs (warm-up reply included): "
                  f"{time.perf_counter() - start:.1f} s")
        ours[name] = [thinktalk_run(omni, args.thinker_tokens, args.talker_tokens, args.chunk_frames, mode)
                      for _ in range(args.runs)]
    theirs = [reference_run(reference, ids, args.thinker_tokens, args.talker_tokens) for _ in range(args.runs)]
    audio = ours["thinktalk"][0][2]
    ref_total, ref_audio = statistics.median(r[0] for r in theirs), theirs[0][1]
    print(f"tiny random checkpoint, CPU float32, {args.threads} thread(s), greedy, {args.thinker_tokens} text tokens, "
          f"{audio:.2f} s of speech; median of {args.runs} runs")
    print(f"{'':10} {'first audio s':>14} {'total s':>9} {'RTF':>7}")
    for name, runs in ours.items():
        first, total = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"{name:10} {first:14.3f} {total:9.3f} {total / audio:7.3f}")
    print(f"{'reference':10} {ref_total:14.3f} {ref_total:9.3f} {ref_total / ref_audio:7.3f}")
    for name, runs in ours.items():
        first, total = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"{'ratio ' + name:10} {ref_total / first:13.1f}x {ref_total / total:8.1f}x")


if __name__ == "__main__":
    main()
