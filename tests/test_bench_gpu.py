"""bench/gpu.py runs every section on the CPU with the tiny config and prints each row with both engines' figures
(a cold row, thinktalk's first run of a new object, has thinktalk's only)."""

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
ROWS = [
    "thinker prefill tok/s",
    "thinker decode tok/s, batch 1",
    "thinker decode tok/s, batch 8",
    "thinker decode tok/s, batch 32",
    "talker frames/s, steady",
    "code2wav ms per frame",
    "first audio s, 5-s audio question, cold (first request)",
    "first audio s, 1 concurrent (mean), steady",
    "first audio s, 4 concurrent (mean), steady",
    "first audio s, 8 concurrent (mean), steady",
    "RTF, 1 concurrent (mean), steady",
    "RTF, 16 concurrent (mean), steady",
]
COLD_ROWS = [  # thinktalk only
    "talker frames/s, cold",
    "first audio s, 1 concurrent (mean), cold",
    "first audio s, 4 concurrent (mean), cold",
    "first audio s, 8 concurrent (mean), cold",
    "RTF, 1 concurrent (mean), cold",
    "RTF, 16 concurrent (mean), cold",
]
TIMEOUT_S = 300  # about 20 s on an idle 2-core machine


def test_tiny_cpu_run_prints_every_row(qwen_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH), "--config", "tiny", "--device", "cpu",
                           "--tokenizer", str(qwen_dir)], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("command: ") for line in lines) and any("torch " in line for line in lines)
    for label in ROWS:
        rows = [line for line in lines if line.startswith(label)]
        assert len(rows) == 1, f"row {label!r} missing or repeated in:\n{done.stdout}"
        _, ours, theirs, ratio = (cell.strip() for cell in rows[0].split("|"))
        assert float(ours) > 0 and float(theirs) > 0, rows[0]
        assert ratio.split()[0].endswith("x") and float(ratio.split()[0][:-1]) > 0, rows[0]
    for label in COLD_ROWS:
        rows = [line for line in lines if line.startswith(label)]
        assert len(rows) == 1, f"row {label!r} missing or repeated in:\n{done.stdout}"
        _, ours, theirs, _ = (cell.strip() for cell in rows[0].split("|"))
        assert float(ours) > 0 and theirs == "n/a", rows[0]
    memory = next(line for line in lines if line.startswith("peak GPU memory"))
    assert [cell.strip() for cell in memory.split("|")[1:3]] == ["n/a", "n/a"]  # no GPU on the CPU run
    assert "first audio packet is its whole reply" in done.stdout
