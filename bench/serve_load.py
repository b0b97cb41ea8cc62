"""Load on the OpenAI-compatible server: N concurrent streaming clients (text + speech) for T seconds.

    python bench/serve_load.py [--clients 32] [--seconds 60] [--model DIR] [--max-tokens 24] [--speech-seconds 2]

Starts `thinktalk serve` on loopback (default: the built-in random demo checkpoint) in its own process, waits for
/health, then runs the clients (each sends a streaming request, reads it to the end, and sends the next) and prints
requests/s, time to the first audio chunk (p50/p95), real-time factor (request time / seconds of speech; p50/p95),
failed requests, and the server's resident memory before and after. Requests still running at the end are counted
only if they finish within a grace period. Random weights: the words mean nothing; the timings do.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

MAX_CLIENTS, MAX_SECONDS = 256, 600
PCM_BYTES_PER_SECOND = 24000 * 2


@dataclass
class Stats:
    done: int = 0
    failed: int = 0
    first_audio: list[float] = field(default_factory=list)
    rtf: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.errors[reason] = self.errors.get(reason, 0) + 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, body: dict, stats: Stats) -> None:
    start = time.perf_counter()
    first, pcm_bytes = None, 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            stats.fail(f"HTTP {response.status_code}")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                stats.fail(event["error"].get("code") or "error event")
                return
            for choice in event.get("choices", []):
                data = (choice.get("delta", {}).get("audio") or {}).get("data")
                if data:
                    first = first if first is not None else time.perf_counter() - start
                    pcm_bytes += len(base64.b64decode(data))
    elapsed = time.perf_counter() - start
    stats.done += 1
    if first is not None:
        stats.first_audio.append(first)
    if pcm_bytes:
        stats.rtf.append(elapsed / (pcm_bytes / PCM_BYTES_PER_SECOND))


async def client_loop(url: str, body: dict, stop_at: float, stats: Stats) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        while time.perf_counter() < stop_at:
            try:
                await one_request(client, url, body, stats)
            except httpx.HTTPError as error:
                stats.fail(type(error).__name__)


async def run_load(base: str, args) -> tuple[Stats, float]:
    body = {"model": "bench", "messages": [{"role": "user", "content": "Tell me something."}],
            "max_tokens": args.max_tokens, "stream": True, "modalities": ["text", "audio"],
            "audio": {"format": "pcm16", "max_seconds": args.speech_seconds}}
    stats, start = Stats(), time.perf_counter()
    stop_at = start + args.seconds
    loops = [client_loop(base + "/v1/chat/completions", body, stop_at, stats) for _ in range(args.clients)]
    await asyncio.wait_for(asyncio.gather(*loops), args.seconds + args.grace)
    return stats, time.perf_counter() - start


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "thinktalk", "serve", "--port", str(port), "--device", args.device,
               "--served-model-name", "bench", "--threads", str(args.threads)]
    if args.model:
        command += ["--model", args.model]
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(base: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} (see --server-log)")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)  # not listening yet
    raise RuntimeError("the server did not become healthy in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--grace", type=float, default=60.0, help="time for the last requests to finish")
    parser.add_argument("--model", default=None, help="checkpoint (default: the built-in demo checkpoint)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--speech-seconds", type=float, default=2.0)
    parser.add_argument("--server-log", default=None, help="write the server's log here")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be in 1..{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    try:
        wait_healthy(base, server)
        before = rss_mib(server.pid)
        stats, elapsed = asyncio.run(run_load(base, args))
        after = rss_mib(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    print(f"clients {args.clients}, {elapsed:.1f} s, device {args.device}, model {args.model or 'demo'}")
    print(f"requests/s        {stats.done / elapsed:.2f} ({stats.done} completed)")
    print(f"failed requests   {stats.failed} {stats.errors or ''}")
    print(f"first audio (s)   p50 {percentile(stats.first_audio, 50):.3f}  p95 {percentile(stats.first_audio, 95):.3f}")
    print(f"RTF               p50 {percentile(stats.rtf, 50):.3f}  p95 {percentile(stats.rtf, 95):.3f}")
    print(f"server RSS (MiB)  before {before:.0f}  after {after:.0f}")
    return 1 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(main())
