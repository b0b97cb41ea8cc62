"""The device run as one script: the model built once, then stages in priority order, each under its own time
limit, every figure printed as a `RESULT name value [note]` line the moment it is measured.

    python bench/gpu_run.py [--config full|tiny] [--device cuda|cpu] [--limit STAGE=SECONDS ...] [--stages A,B]
                            [--total SECONDS] [--results FILE]

Stages, most important first (default limit in seconds; STAGES below):
    smoke_tiny, smoke_released   bf16 capture smoke test (bench/capture_smoke.py) at the tiny widths and at the
                                 run's widths with one layer per stack; if a capture raises, the rest of the run
                                 uses eager steps (RESULT step_mode eager, with the error)
    build                        the model with random weights and the reference tied to its tensors
    first_audio_cold             thinktalk's first request after start-up: a 5-second audio question, spoken reply
    decode_b1                    thinker decode tok/s at batch 1
    talker                       talker frames/s, cold (a new session's first frames) and steady (the same session)
    parity_top1, parity_text, parity_codes   tests/test_gpu_parity.py's checks (bench/parity_checks.py)
    then the remaining bench/gpu.py rows: prefill, decode at batch 8 and 32, Code2Wav, first audio and RTF at
    each concurrency (cold, steady), and the reference's figures, then peak memory
Each stage prints `RESULT stage.NAME ok|TIMEOUT|FAILED|SKIPPED seconds [error]` when it ends; a stage that overruns
is stopped and reported and the next one runs; a failed build ends the run. `--total` bounds the whole run: a stage
gets at most what is left of it, and once it is spent the remaining stages are SKIPPED. `--results FILE` also
appends every RESULT line to FILE as it is printed (e.g. under the device run's $OUT, so that no figure is lost
from a long output's tail).

How a stage is bounded: a SIGALRM timer (signal.setitimer) whose handler raises StageTimeout in the main thread.
Python runs the handler between bytecodes, i.e. between kernel launches and between steps, so it stops our loops
and the reference's generate() alike, with no cooperation from the code it stops; StageTimeout is a BaseException,
so that no `except Exception` on the way (the scheduler turns those into a stream's failure) swallows it. Queued GPU
work is then drained (torch.cuda.synchronize) and the persistent scheduler dropped, so the next stage starts clean.
The alternative, a subprocess per stage, could be killed anywhere but would rebuild the 70.5 GB model each time
(minutes of the 15); a stop flag checked between steps could not stop the reference's generate(). The timer cannot
cut one long kernel short (the handler runs when it returns); no kernel here lasts more than a fraction of a second.

On the device (after `bash bench/gpu_carry.sh` here, with .gpucarry carried):
    source .gpucarry/setup.sh && python3 bench/gpu_run.py --config full --tokenizer .gpucarry/tokenizer \
        --results $OUT/results.txt --total 500
`--config tiny --device cpu` runs every stage in seconds (tests/test_bench_gpu_run.py runs it).
"""

from __future__ import annotations

import contextlib
import gc
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import capture_smoke  # noqa: E402
import gpu  # noqa: E402
import gpu_common as common  # noqa: E402
import parity_checks  # noqa: E402
from checkpoints import tiny_config_dict  # noqa: E402  (gpu_common put tests/ on sys.path)

from thinktalk.engine.graphs import StepMode  # noqa: E402
from thinktalk.engine.thinker_batch import PrivateRows  # noqa: E402
from thinktalk.processing.tokenizer import build_qwen_tokenizer_files  # noqa: E402

SMOKE_DTYPE = torch.bfloat16


class StageTimeout(BaseException):
    """A stage ran past its limit (raised by the SIGALRM handler; see the module doc)."""


RESULTS_FILES: list[Path] = []  # --results: where RESULT lines are also appended


def emit(name: str, value, note: str = "") -> None:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    line = f"RESULT {name} {text}{'  ' + note if note else ''}"
    print(line, flush=True)
    for path in RESULTS_FILES:
        with path.open("a") as out:
            out.write(line + "\n")


def emit_row(row: common.Row, engines: tuple[str, ...] = ("thinktalk", "reference")) -> None:
    for engine, value in (("thinktalk", row.ours), ("reference", row.theirs)):
        if engine in engines and value is not None:
            emit(f"{engine}.{row.key}", value, row.note)


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise StageTimeout(f"past its limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class DeviceRun:
    """What the stages share: options, the step mode (eager after a failed capture), the built Setup."""

    def __init__(self, args, config: dict, budgets: common.Budgets, tokenizer_dir: Path):
        self.args, self.config, self.budgets, self.tokenizer_dir = args, config, budgets, tokenizer_dir
        self.device = torch.device(args.device)
        default = "graph" if self.device.type == "cuda" else "eager"
        self.mode = StepMode(args.step_mode or default)
        self.setup: common.Setup | None = None
        self.cold_ours: gpu.Reply | None = None

    # -- before the build ----------------------------------------------------------------------------------------

    def smoke(self, name: str, config: dict) -> None:
        try:
            results = capture_smoke.smoke(config, self.device, SMOKE_DTYPE, self.mode)
        except StageTimeout:
            raise
        except Exception as error:  # noqa: BLE001 (reported, and the run goes on with eager steps)
            traceback.print_exc()
            emit(f"{name}.capture", "FAILED", f"{type(error).__name__}: {error}")
            if self.mode is not StepMode.EAGER:
                self.mode = StepMode.EAGER
                emit("step_mode", "eager", f"(fallback: capture failed in {name}; for the bench's own runners "
                                           "and the Omni's private thinker rows: its shared rows and private talker "
                                           "sessions keep the device default)")
            return
        for result in results:
            emit(f"{name}.{result.name}", "same" if result.same else "DIFFERENT",
                 f"captured={'yes' if result.captured else 'no'}; {result.detail}")

    def smoke_tiny(self) -> None:
        self.smoke("smoke_tiny", tiny_config_dict())

    def smoke_released(self) -> None:
        self.smoke("smoke_released", capture_smoke.one_layer(self.config))

    def build(self) -> None:
        self.args.step_mode = self.mode.value
        self.setup, weights = common.build(self.args, self.config, self.budgets, self.tokenizer_dir)
        if self.mode is StepMode.EAGER:  # the Omni's private thinker rows too (its default is a graph on CUDA)
            self.setup.omni.private_rows = PrivateRows(self.setup.omni.model.thinker, mode=self.mode)
        emit("step_mode", self.mode.value)
        emit("build", weights)

    # -- after it --------------------------------------------------------------------------------------------------

    def first_audio_cold(self) -> None:
        self.cold_ours = gpu.cold_first_audio(self.setup)
        emit("thinktalk.first_audio_cold_s", self.cold_ours.first_audio, "(5-s audio question, first request)")

    def decode(self, batch: int) -> None:
        emit_row(gpu.decode_row(self.setup, batch, reference=False))

    def reference_decode(self) -> None:
        s = self.setup
        for batch in gpu.DECODE_BATCHES:
            vocab = s.omni.cfg.thinker.text.vocab_size
            prompts = common.random_prompts(batch, s.budgets.decode_prompt, vocab, batch)
            seconds = gpu.reference_decode_seconds(s, prompts)
            emit(f"reference.decode_b{batch}_tok_s", batch * s.budgets.new_tokens / seconds)

    def talker(self) -> None:
        for row in gpu.talker_rows(self.setup, reference=False):
            emit_row(row)

    def parity(self, check: Callable) -> None:
        omni = self.setup.omni
        omni.disable_batching()  # the test's conditions: private rows and captured talker sessions
        exact = self.setup.omni.dtype == torch.float32
        result = check(omni, self.setup.reference, self.device, exact)
        emit(result.name, result.value, f"{'PASS' if result.passed else 'FAIL'} ({result.detail})")

    def rows(self, make: Callable[[common.Setup], list[common.Row]]) -> None:
        for row in make(self.setup):
            emit_row(row)

    def speech_level(self, n: int) -> None:
        for row in gpu.level_rows(self.setup, n, reference=False):
            emit_row(row, ("thinktalk",))

    def reference_speech(self) -> None:
        s = self.setup
        cold, _ = gpu.reference_replies(s, 1)
        emit("reference.first_audio_cold_s", cold.first_audio, "(its whole reply: it cannot stream)")
        for n in gpu.SPEECH_LEVELS:
            reply, note = gpu.reference_replies(s, n)
            if n in gpu.TTFA_CONCURRENCY:
                emit(f"reference.first_audio_c{n}_s", reply.first_audio, note)
            if n in gpu.RTF_CONCURRENCY:
                emit(f"reference.rtf_c{n}", reply.total / reply.audio, note)

    def reference_talker(self) -> None:
        emit("reference.talker_steady_frames_s", gpu.reference_talker_rate(self.setup))

    def memory(self) -> None:
        row = common.memory_row(self.setup)
        if row.ours is None:
            emit("peak_memory_gb", "n/a", "(no GPU)")
        emit_row(row)

    def recover(self) -> None:
        """After a stopped or failed stage: drain the GPU's queue, drop half-run streams and their caches."""
        if self.setup is not None:
            self.setup.omni.disable_batching()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Stage:
    name: str
    limit: float  # seconds
    run: Callable[[DeviceRun], None]


PARITY_STAGES = ("parity_top1", "parity_text", "parity_codes")  # parity_checks.CHECKS, in their order
STAGES = (
    Stage("smoke_tiny", 60, DeviceRun.smoke_tiny),
    Stage("smoke_released", 120, DeviceRun.smoke_released),
    Stage("build", 300, DeviceRun.build),
    Stage("first_audio_cold", 90, DeviceRun.first_audio_cold),
    Stage("decode_b1", 60, lambda r: r.decode(1)),
    Stage("talker", 60, DeviceRun.talker),
    *(Stage(name, 90, lambda r, c=c: r.parity(c)) for name, c in zip(PARITY_STAGES, parity_checks.CHECKS)),
    Stage("prefill", 60, lambda r: r.rows(lambda s: [gpu.prefill_row(s)])),
    *(Stage(f"decode_b{b}", 60, lambda r, b=b: r.decode(b)) for b in gpu.DECODE_BATCHES[1:]),
    Stage("code2wav", 60, lambda r: r.rows(gpu.code2wav_rows)),
    # a minute, and 5 s more per concurrent reply
    *(Stage(f"speech_c{n}", 60 + 5 * n, lambda r, n=n: r.speech_level(n)) for n in gpu.SPEECH_LEVELS),
    Stage("reference_decode", 120, DeviceRun.reference_decode),
    Stage("reference_talker", 90, DeviceRun.reference_talker),
    Stage("reference_speech", 240, DeviceRun.reference_speech),
    Stage("memory", 10, DeviceRun.memory),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def parse_limits(items: list[str], parser) -> dict[str, float]:
    limits = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in STAGE_NAMES:
            parser.error(f"--limit {item!r}: unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
        try:
            limits[name] = float(seconds)
        except ValueError:
            parser.error(f"--limit {item!r}: seconds must be a number")
        if not limits[name] > 0:
            parser.error(f"--limit {item!r}: seconds must be > 0")
    return limits


def run_stages(run: DeviceRun, stages: list[Stage], limits: dict[str, float], total: float | None = None) -> None:
    deadline = None if total is None else time.perf_counter() + total
    for stage in stages:
        limit = limits.get(stage.name, stage.limit)
        if deadline is not None:
            limit = min(limit, deadline - time.perf_counter())
            if limit <= 0:
                emit(f"stage.{stage.name}", "SKIPPED", f"(--total {total:g} s spent)")
                continue
        start, status, error = time.perf_counter(), "ok", ""
        try:
            with time_limit(limit):
                stage.run(run)
        except StageTimeout as stop:
            status, error = "TIMEOUT", str(stop)
        except Exception as failure:  # noqa: BLE001 (reported; the next stage runs)
            status, error = "FAILED", f"{type(failure).__name__}: {failure}"
            traceback.print_exc()
        emit(f"stage.{stage.name}", status, f"{time.perf_counter() - start:.1f} s {error}".rstrip())
        if status != "ok":
            run.recover()
            if stage.name == "build":
                emit("run", "ABORTED", "(no model: the later stages need it)")
                return


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="a stage's time limit (repeatable)")
    parser.add_argument("--stages", default=None, help="comma-separated stages to run (build is always run)")
    parser.add_argument("--total", type=float, default=None, help="seconds for the whole run (default: no bound)")
    parser.add_argument("--results", type=Path, default=None, help="also append the RESULT lines to this file")
    args = parser.parse_args()
    limits = parse_limits(args.limit, parser)
    if args.total is not None and not args.total > 0:
        parser.error(f"--total must be > 0, got {args.total}")
    if args.results is not None:
        RESULTS_FILES.append(args.results)
    chosen = STAGES
    if args.stages:
        names = set(args.stages.split(",")) | {"build"}
        if unknown := sorted(names - set(STAGE_NAMES)):
            parser.error(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_NAMES)}")
        chosen = tuple(stage for stage in STAGES if stage.name in names)
    config, budgets = common.resolve(args)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    emit("device", f"{name}; torch {torch.__version__}; {args.dtype}; config {args.config}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = args.tokenizer or build_qwen_tokenizer_files(Path(tmp))
        run_stages(DeviceRun(args, config, budgets, tokenizer_dir), list(chosen), limits, args.total)


if __name__ == "__main__":
    main()
