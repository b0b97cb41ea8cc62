"""The command line on the demo checkpoint and on a tiny checkpoint: output, exit codes, errors without tracebacks."""

import subprocess
import sys

import pytest


def thinktalk(*args: str, env_cache=None) -> subprocess.CompletedProcess:
    env = None
    if env_cache is not None:
        import os
        env = {**os.environ, "THINKTALK_CACHE": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "thinktalk", *args], capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("thinktalk_cache")


def test_demo_builds_its_checkpoint_once_and_streams_a_reply(cache):
    first = thinktalk("demo", "--max-tokens", "12", env_cache=cache)
    assert first.returncode == 0, first.stderr
    assert "RANDOM weights" in first.stderr and "12 tokens" in first.stderr
    assert first.stdout.startswith("user: Hello!") and "assistant: " in first.stdout
    (checkpoint,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    again = thinktalk("demo", "--max-tokens", "12", "--greedy", env_cache=cache)
    assert again.returncode == 0 and list(cache.iterdir()) == [checkpoint]


def test_run_on_a_checkpoint_greedy_is_deterministic(tiny):
    args = ("run", "--model", str(tiny.path), "--text", "hi", "--max-tokens", "8", "--greedy", "--device", "cpu")
    first, second = thinktalk(*args), thinktalk(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_info_describes_the_checkpoint(tiny):
    result = thinktalk("info", "--model", str(tiny.path))
    assert result.returncode == 0, result.stderr
    voices = next(line for line in result.stdout.splitlines() if line.startswith("voices:"))
    assert "Instruct" in result.stdout and sorted(voices.split(":")[1].replace(",", " ").split()) == [
        "aiden", "chelsie", "ethan"]
    assert "8 experts (top 2)" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("run", "--model", "/no/such/dir", "--text", "hi"), "does not exist"),
    (("run", "--model", "Nobody/NotCached-Model", "--text", "hi"), "never downloads"),
    (("run", "--text", "   "), "--text is required"),
    (("run", "--text", "hi", "--max-tokens", "0"), "--max-tokens must be at least 1"),
])
def test_user_mistakes_exit_2_without_a_traceback(args, message, tmp_path):
    result = thinktalk(*args, env_cache=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_broken_checkpoint_is_a_one_line_error(tiny, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny.path, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    result = thinktalk("run", "--model", str(broken), "--text", "hi")
    assert result.returncode == 2 and "model.safetensors" in result.stderr and "Traceback" not in result.stderr
