"""bench/gpu_run.py, the device run's one script: every stage on the CPU with the tiny config, RESULT lines in the
stages' priority order, and a stage that overruns its limit stopped, reported, and followed by the next."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_run  # noqa: E402

TIMEOUT_S = 300  # about 25 s on an idle 2-core machine
# Figures in the order the run must print them (the most important first).
FIGURES = ["thinktalk.first_audio_cold_s", "thinktalk.decode_b1_tok_s", "parity_top1", "parity_text",
           "parity_codes", "thinktalk.prefill_tok_s", "thinktalk.decode_b8_tok_s", "thinktalk.decode_b32_tok_s",
           "thinktalk.code2wav_ms_per_frame", "thinktalk.first_audio_c1_cold_s", "thinktalk.first_audio_c1_steady_s",
           "thinktalk.rtf_c16_steady", "reference.decode_b1_tok_s", "reference.talker_steady_frames_s",
           "reference.first_audio_cold_s", "reference.rtf_c16", "peak_memory_gb"]


def results(stdout: str) -> list[tuple[str, str, str]]:
    """(name, value, note) of every RESULT line, in order."""
    lines = [line.split(None, 3)[1:] for line in stdout.splitlines() if line.startswith("RESULT ")]
    return [(parts[0], parts[1], parts[2] if len(parts) > 2 else "") for parts in lines]


def test_tiny_cpu_run_prints_results_in_priority_order_and_stops_an_overrunning_stage(qwen_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    copy = tmp_path / "results.txt"
    done = subprocess.run([sys.executable, str(BENCH / "gpu_run.py"), "--config", "tiny", "--device", "cpu",
                           "--tokenizer", str(qwen_dir), "--limit", "talker=0.001", "--results", str(copy)],
                          capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    found = results(done.stdout)
    assert results(copy.read_text()) == found  # --results holds the same lines
    names = [name for name, _, _ in found]
    stages = [(name.removeprefix("stage."), value) for name, value, _ in found if name.startswith("stage.")]
    assert [name for name, _ in stages] == list(gpu_run.STAGE_NAMES), stages
    assert dict(stages)["talker"] == "TIMEOUT", stages
    assert all(value == "ok" for name, value in stages if name != "talker"), stages  # the rest ran on
    assert "thinktalk.talker_steady_frames_s" not in names  # stopped before its figure
    positions = [names.index(figure) for figure in FIGURES]  # each present ...
    assert positions == sorted(positions), [names[i] for i in sorted(positions)]  # ... in priority order
    values = dict((name, value) for name, value, _ in found)
    for figure in FIGURES:
        if figure.startswith(("thinktalk.", "reference.")):
            assert float(values[figure]) > 0, figure
    assert [values[p] for p in ("parity_top1", "parity_text", "parity_codes")] == ["1", "identical", "identical"]
    assert all(note.startswith("PASS") for name, _, note in found if name.startswith("parity_"))
    assert values["smoke_tiny.thinker"] == values["smoke_released.talker"] == "same"


def test_a_stage_timeout_is_not_swallowed_by_except_exception():
    """The SIGALRM timeout stops a busy loop from the outside, through the `except Exception` a step loop holds."""
    caught = []
    with pytest.raises(gpu_run.StageTimeout):
        with gpu_run.time_limit(0.01):
            try:
                while True:
                    pass
            except Exception as error:  # noqa: BLE001 (what the scheduler does with a stream's failure)
                caught.append(error)
    assert caught == []


def busy(run) -> None:
    while True:
        pass


def test_total_budget_caps_a_stage_and_skips_the_rest(capsys):
    """--total: the overrunning stage gets only what is left of the run, and the stages after it are SKIPPED."""
    stages = [gpu_run.Stage("first", 30, lambda run: gpu_run.emit("figure", 1.0)),
              gpu_run.Stage("overruns", 30, busy), gpu_run.Stage("never", 30, lambda run: gpu_run.emit("late", 2.0))]
    recovered = []
    gpu_run.run_stages(SimpleNamespace(recover=lambda: recovered.append(True)), stages, {}, total=0.2)
    found = [(name, value) for name, value, _ in results(capsys.readouterr().out)]
    assert found == [("figure", "1"), ("stage.first", "ok"), ("stage.overruns", "TIMEOUT"),
                     ("stage.never", "SKIPPED")]
    assert recovered == [True]  # cleaned up after the stopped stage
