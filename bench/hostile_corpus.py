"""Hostile media through the Python API and the server: Pillow's own test images, a generated audio and video corpus.

    python bench/hostile_corpus.py [--model DIR] [--cache DIR] [--hang-seconds 10] [--only image|audio|video]
                                   [--skip-api] [--skip-server] [--limit N] [--threads N]

The media: bench/hostile_corpus_media.py (every file under Pillow's Tests/images, fetched once with pip from the
registry into --cache; tones in every soundfile / PyAV encoding and clips in several codecs, each also truncated
and with flipped header bytes; tests/hostile_media.py's cases). Each case goes
- through the API: `Omni.generate` of a one-part message, one new token, text only, on a thread of its own that is
  waited on for --hang-seconds;
- through the server: `thinktalk serve` in its own process on loopback, one chat completion per case (a data URL
  or input_audio), read with a --hang-seconds timeout; /health after each, and a restart if the server died.
Prints counts per path, media kind and outcome (OK / typed 4xx / raw exception or 5xx / hang / crash), the cases that
were neither OK nor typed, and the peak RSS of this process and of the server. Goal: no raw exception or 5xx, no
hang over --hang-seconds, no crash. Random weights (the demo checkpoint by default): the replies mean nothing.
"""

from __future__ import annotations

import argparse
import base64
import collections
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile_corpus_media import Case, audio_corpus, pillow_images, video_corpus  # noqa: E402

OUTCOMES = ("OK", "typed 4xx", "raw/5xx", "hang", "crash")
HEALTH_TIMEOUT_SECONDS = 300.0  # model load at start and after a crash
SHOWN_FAILURES = 20
FINISH_SECONDS = 600.0  # how long a case that passed --hang-seconds may still run before the next case starts


def api_outcome(omni, case: Case, hang_seconds: float) -> tuple[str, str]:
    from thinktalk.errors import InputError

    result: list = []
    part = {"type": case.kind, case.kind: case.data}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]

    def run() -> None:
        try:
            omni.generate(messages, max_new_tokens=1, return_audio=False)
            result.append(("OK", ""))
        except InputError as error:
            result.append(("typed 4xx", str(error)[:160]))
        except Exception as error:  # noqa: BLE001 (what this bench counts: a raw exception)
            result.append(("raw/5xx", f"{type(error).__name__}: {str(error)[:160]}"))

    start = time.perf_counter()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(hang_seconds)
    if result:
        return result[0]
    worker.join(FINISH_SECONDS)  # a slow case must not run beside the next ones
    ended = f"ended {result[0][0]} after {time.perf_counter() - start:.0f} s" if result else "still running"
    return "hang", f"over {hang_seconds:g} s; {ended}"


def request_body(case: Case) -> dict:
    data = base64.b64encode(case.data).decode()
    if case.kind == "audio":
        part = {"type": "input_audio", "input_audio": {"data": data}}
    else:
        key = "image_url" if case.kind == "image" else "video_url"
        part = {"type": key, key: {"url": f"data:application/octet-stream;base64,{data}"}}
    return {"model": "bench", "messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}],
            "max_tokens": 1}


def server_outcome(base: str, case: Case, hang_seconds: float) -> tuple[str, str]:
    try:
        response = httpx.post(base + "/v1/chat/completions", json=request_body(case), timeout=hang_seconds)
    except httpx.TimeoutException:
        return "hang", f"no answer in {hang_seconds:g} s"
    except httpx.TransportError as error:
        return "crash", type(error).__name__
    if response.status_code == 200:
        return "OK", ""
    try:
        error = response.json()["error"]
        shaped = set(error) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        error, shaped = {"message": response.text[:160]}, False
    if 400 <= response.status_code < 500 and shaped:
        return "typed 4xx", f"{response.status_code} {error['code']}: {error['message'][:140]}"
    return "raw/5xx", f"{response.status_code}: {str(error.get('message'))[:160]}"


class Server:
    """`thinktalk serve` in its own process; restarted when a case kills it."""

    def __init__(self, model: str | None, threads: int | None):
        self.model, self.threads, self.process = model, threads, None
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.peak_rss_mib = 0.0

    def start(self) -> None:
        command = [sys.executable, "-m", "thinktalk", "serve", "--port", str(self.port), "--served-model-name",
                   "bench"] + (["--model", self.model] if self.model else []) + (
                      ["--threads", str(self.threads)] if self.threads else [])
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.base + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def wait_idle(self) -> None:
        """Until the server runs no request (a case that timed out on the client may still be running there)."""
        deadline = time.monotonic() + FINISH_SECONDS
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=5).json()["active_requests"] == 0:
                    return
            except (httpx.TransportError, ValueError, KeyError):
                return
            time.sleep(0.5)

    def note_rss(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.peak_rss_mib = max(self.peak_rss_mib, _status_mib(self.process.pid, "VmHWM:"))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.note_rss()
            self.process.terminate()
            self.process.wait(60)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def run_api(cases: list[Case], args) -> collections.Counter:
    from thinktalk import Omni
    from thinktalk.demo import ensure_demo_checkpoint

    omni = Omni.from_pretrained(args.model or ensure_demo_checkpoint(), device="cpu", audio_output=False)
    return _run(cases, lambda case: api_outcome(omni, case, args.hang_seconds), "api")


def run_server(cases: list[Case], args) -> tuple[collections.Counter, float]:
    server = Server(args.model, args.threads)
    server.start()

    def one(case: Case) -> tuple[str, str]:
        outcome = server_outcome(server.base, case, args.hang_seconds)
        server.note_rss()
        if outcome[0] != "crash" and not server.healthy():
            outcome = ("crash", f"unhealthy after {outcome[0]}")
        if outcome[0] == "crash":
            server.stop()
            server.start()
        elif outcome[0] == "hang":
            server.wait_idle()
        return outcome

    try:
        return _run(cases, one, "server"), server.peak_rss_mib
    finally:
        server.stop()


def _run(cases: list[Case], outcome_of, path: str) -> collections.Counter:
    counts, failures = collections.Counter(), []
    for case in cases:
        outcome, detail = outcome_of(case)
        counts[(case.kind, outcome)] += 1
        if outcome not in ("OK", "typed 4xx"):
            failures.append(f"  {path} {case.kind} {case.name}: {outcome} ({detail})")
    for line in failures[:SHOWN_FAILURES]:
        print(line)
    if len(failures) > SHOWN_FAILURES:
        print(f"  ... and {len(failures) - SHOWN_FAILURES} more")
    return counts


def print_counts(path: str, counts: collections.Counter) -> None:
    for kind in sorted({kind for kind, _ in counts}):
        row = "  ".join(f"{outcome} {counts[(kind, outcome)]:5d}" for outcome in OUTCOMES)
        print(f"{path:6s} {kind:5s} total {sum(counts[(kind, o)] for o in OUTCOMES):5d}  {row}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the built-in demo checkpoint)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "thinktalk" / "pillow-sdist"))
    parser.add_argument("--hang-seconds", type=float, default=10.0)
    parser.add_argument("--only", choices=["image", "audio", "video"], default=None)
    parser.add_argument("--skip-api", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="the first N cases of each kind")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (both paths)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Pillow warns about most of its own test images
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="thinktalk-corpus-") as folder:
        groups = {"image": lambda: pillow_images(Path(args.cache)), "audio": audio_corpus,
                  "video": lambda: video_corpus(Path(folder))}
        cases = [case for kind, make in groups.items() if args.only in (None, kind)
                 for case in make()[:args.limit]]
    print(f"{len(cases)} cases: " + ", ".join(f"{kind} {sum(c.kind == kind for c in cases)}" for kind in groups))
    api = None if args.skip_api else run_api(cases, args)
    served = None if args.skip_server else run_server(cases, args)
    if api is not None:
        print_counts("api", api)
    if served is not None:
        print_counts("server", served[0])
        print(f"server peak RSS: {served[1]:.0f} MiB")
    print(f"bench (API) peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    bad = sum(n for (_, outcome), n in (api or collections.Counter()).items() if outcome not in ("OK", "typed 4xx"))
    bad += sum(n for (_, o), n in (served[0] if served else collections.Counter()).items() if o not in OUTCOMES[:2])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
