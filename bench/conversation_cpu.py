"""A 20-turn spoken conversation on the Realtime socket: time to the first audio of every turn, with the conversation
prefix cache and without it (what the engine did before: every turn re-read, and re-encoded, the whole
conversation), side by side in one run. Tiny random checkpoint on the CPU; the machine is shared, so compare.

    python bench/conversation_cpu.py [--turns 20] [--audio-seconds 2] [--threads 1]

Each turn sends `--audio-seconds` of speech-like tone as the user's audio and asks for a spoken reply; the figure is
the time from response.create to the first response.output_audio.delta, as a client sees it. The scheduler's
counters give the prompt positions each turn prefilled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import build_reference, load_as_omni, tiny_config_dict  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from thinktalk.serve.engine_worker import EngineWorker  # noqa: E402
from thinktalk.serve.realtime import WorkerStreamRunner, realtime_router  # noqa: E402
from thinktalk.serve.realtime_events import float_to_pcm16  # noqa: E402

RATE = 24_000


def tone(seconds: float, turn: int) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * (300 + 20 * turn) * t)).astype(np.float32)


def receive_until(ws, kind: str) -> list[dict]:
    events = []
    while True:
        events.append(json.loads(ws.receive_text()))
        if events[-1]["type"] == kind:
            return events


def conversation(omni, turns: int, seconds: float, prefix_cache_bytes: int) -> list[tuple[float, int]]:
    """Per turn: (seconds to the first audio delta, prompt positions prefilled)."""
    omni.enable_batching(rows=2, max_len=8192, prefix_cache_bytes=prefix_cache_bytes)
    scheduler = omni.scheduler
    worker = EngineWorker(omni, max_active=2, max_queued=2)
    worker.start()
    app = FastAPI()
    app.include_router(realtime_router(omni, runner=WorkerStreamRunner(worker), defaults={
        "max_output_tokens": 8, "talker_max_new_tokens": 13, "seed": 0, "audio_chunk_frames": 1}))
    figures = []
    try:
        with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
            receive_until(ws, "session.created")
            for turn in range(turns):
                ws.send_text(json.dumps({"type": "input_audio_buffer.append",
                                         "audio": float_to_pcm16(tone(seconds, turn))}))
                ws.send_text(json.dumps({"type": "input_audio_buffer.commit"}))
                receive_until(ws, "conversation.item.created")
                before = scheduler.prefilled_positions
                start = time.perf_counter()
                ws.send_text(json.dumps({"type": "response.create"}))
                first = None
                for event in receive_until(ws, "response.done"):
                    if event["type"] == "response.output_audio.delta" and first is None:
                        first = time.perf_counter() - start
                figures.append((first, scheduler.prefilled_positions - before))
    finally:
        worker.stop()
        omni.disable_batching()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--audio-seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    omni = load_as_omni(build_reference(tiny_config_dict(), seed=0))
    runs = {"no prefix cache": conversation(omni, args.turns, args.audio_seconds, 0),
            "prefix cache": conversation(omni, args.turns, args.audio_seconds, 256 * 2**20)}
    print(f"{args.turns}-turn spoken Realtime conversation, {args.audio_seconds:g} s of audio per user turn, tiny "
          f"random checkpoint, CPU float32, {args.threads} thread(s); command: {' '.join([sys.executable, *sys.argv])}")
    print(f"{'turn':>4} | " + " | ".join(f"{name:>30}" for name in runs))
    print(f"{'':>4} | " + " | ".join(f"{'first audio s':>16} {'prefilled':>13}" for _ in runs))
    for turn in range(args.turns):
        print(f"{turn + 1:>4} | " + " | ".join(f"{figures[turn][0]:16.3f} {figures[turn][1]:13d}"
                                                for figures in runs.values()))
    for name, figures in runs.items():
        first, last = figures[0][0], figures[-1][0]
        print(f"{name}: turn {args.turns} / turn 1 first audio {last / first:.2f}x "
              f"({first:.3f} s -> {last:.3f} s)")


if __name__ == "__main__":
    main()
