"""The command line on the demo checkpoint and on a tiny checkpoint: output, exit codes, errors without tracebacks."""

import subprocess
import sys

import pytest


def thinktalk(*args: str, env_cache=None, cwd=None) -> subprocess.CompletedProcess:
    """Runs the CLI in a scratch folder (`cwd`: in that folder instead)."""
    import os
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest
    if env_cache is not None:
        env["THINKTALK_CACHE"] = str(env_cache)
    with tempfile.TemporaryDirectory() as scratch:
        return subprocess.run([sys.executable, "-m", "thinktalk", *args], capture_output=True, text=True,
                              timeout=600, env=env, cwd=cwd or scratch)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("thinktalk_cache")


def test_demo_builds_its_checkpoint_once_and_streams_a_reply(cache):
    first = thinktalk("demo", "--max-tokens", "12", "--max-speech-seconds", "1", env_cache=cache)
    assert first.returncode == 0, first.stderr
    assert "RANDOM weights" in first.stderr and "12 tokens" in first.stderr
    assert first.stdout.startswith("user: [a 2-second tone]") and "assistant: " in first.stdout
    (checkpoint,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    again = thinktalk("demo", "--max-tokens", "12", "--greedy", "--max-speech-seconds", "1", env_cache=cache)
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
    (("run", "--text", "   "), "give a message"),
    (("run", "--text", "hi", "--audio", "/no/such.wav"), "--audio /no/such.wav: no such file"),
    (("run", "--text", "hi", "--threads", "0"), "--threads must be at least 1"),
    (("run", "--text", "hi", "--max-tokens", "0"), "--max-tokens must be at least 1"),
    (("run", "--text", "hi", "--audio", "/"), "--audio /: is a directory"),
    (("run", "--text", "hi", "--voice", "bob"), "--voice bob: speech is written only with --out"),
    (("chat", "--voice", "bob"), "--voice bob: speech is written only with --out-dir"),
    (("serve", "--port", "99999"), "99999 is not a TCP port"),
    (("serve", "--port", "http"), "'http' is not a port number"),
])
def test_user_mistakes_exit_2_without_a_traceback(args, message, tmp_path):
    result = thinktalk(*args, env_cache=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_file_as_model_or_an_audio_file_as_video_is_named(tiny, tmp_path):
    import soundfile
    from media import tone

    audio = tmp_path / "q.wav"
    soundfile.write(audio, tone(0.5), 16000)
    for args, message in [(("run", "--model", str(audio), "--text", "hi"), "is a file, not a checkpoint directory"),
                          (("serve", "--model", str(audio)), "is a file, not a checkpoint directory"),
                          (("run", "--model", str(tiny.path), "--video", str(audio), "--text", "hi"),
                           "no video frames")]:
        result = thinktalk(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and "index out of range" not in result.stderr


def test_version_and_serve_help():
    version = thinktalk("--version")
    assert version.returncode == 0 and version.stdout.startswith("thinktalk 0.")
    serve = thinktalk("serve", "--help")
    assert serve.returncode == 0
    for mention in ("/v1/realtime", "/v1/chat/completions", "page", "127.0.0.1", "8000", "demo checkpoint"):
        assert mention in serve.stdout, mention


def test_terminal_defaults_are_bounded():
    """A reply in the terminal stops after a few paragraphs by default, the demo's after a few seconds."""
    from thinktalk.cli import build_parser
    from thinktalk.cli_reply import TERMINAL_MAX_TOKENS
    from thinktalk.demo import DEMO_MAX_TOKENS, DEMO_SPEECH_SECONDS

    parser = build_parser()
    for command in ("run", "chat"):
        args = parser.parse_args([command])
        assert args.max_tokens == TERMINAL_MAX_TOKENS <= 1024 and args.max_speech_seconds is None  # the guard
    demo = parser.parse_args(["demo"])
    assert demo.max_tokens == DEMO_MAX_TOKENS <= 64 and demo.max_speech_seconds == DEMO_SPEECH_SECONDS <= 10
    assert demo.out is None  # the demo writes a file only when asked


def test_demo_writes_nothing_in_the_working_directory_unless_asked(cache, tmp_path):
    result = thinktalk("demo", "--max-tokens", "4", "--max-speech-seconds", "0.5", env_cache=cache, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "s of speech (--out FILE writes it)" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_broken_checkpoint_is_a_one_line_error(tiny, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny.path, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    result = thinktalk("run", "--model", str(broken), "--text", "hi")
    assert result.returncode == 2 and "model.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_demo_speaks_into_a_wav(cache, tmp_path):
    out = tmp_path / "reply.wav"
    result = thinktalk("demo", "--max-tokens", "8", "--max-speech-seconds", "1.5", "--out", str(out), env_cache=cache)
    assert result.returncode == 0, result.stderr
    assert "What do you hear and see?" in result.stdout and "s of speech ->" in result.stderr
    import soundfile
    samples, rate = soundfile.read(out)
    assert rate == 24000 and 0 < samples.size <= 1.5 * 24000 and 0.01 < abs(samples).max() < 0.5  # a murmur


def test_run_with_media_and_speech(tiny, tmp_path):
    import soundfile
    from media import noise_image, tone

    audio, image, out = tmp_path / "q.wav", tmp_path / "p.png", tmp_path / "a.wav"
    soundfile.write(audio, tone(1.0), 16000)
    noise_image(48, 48).save(image)
    result = thinktalk("run", "--model", str(tiny.path), "--audio", str(audio), "--image", str(image), "--text",
                       "what?", "--voice", "Chelsie", "--max-tokens", "6", "--max-speech-seconds", "1", "--out",
                       str(out), "--greedy", "--talker-greedy", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert soundfile.read(out)[0].size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_chat_keeps_the_conversation_and_speaks_each_turn(tiny, tmp_path):
    from media import noise_image

    noise_image(32, 32).save(tmp_path / "pic.png")
    script = f"hello\n/image {tmp_path / 'pic.png'}\n/image {tmp_path / 'missing.png'}\nand this?\n/quit\n"
    result = subprocess.run([sys.executable, "-m", "thinktalk", "chat", "--model", str(tiny.path), "--out-dir",
                             str(tmp_path), "--max-tokens", "5", "--max-speech-seconds", "0.5", "--threads", "1"],
                            input=script, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant: ") == 2 and "image attached" in result.stderr
    assert "missing.png" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "turn-1.wav").is_file() and (tmp_path / "turn-2.wav").is_file()


@pytest.mark.parametrize("out, message", [("/no/such/folder/x.wav", "does not exist"), (".", "is a directory")])
def test_unwritable_output_fails_before_any_work(out, message, tiny):
    result = thinktalk("run", "--model", str(tiny.path), "--text", "hi", "--out", out)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_speech_from_a_thinker_only_checkpoint_is_an_error(tiny_thinker_only, tmp_path):
    result = thinktalk("run", "--model", str(tiny_thinker_only.path), "--text", "hi", "--out", str(tmp_path / "a.wav"))
    assert result.returncode == 2 and "no talker" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_speech_is_playable_under_its_name_while_made_and_ctrl_c_leaves_no_partial_wav(tiny, tmp_path):
    import signal
    import time

    import soundfile

    out = tmp_path / "long.wav"
    process = subprocess.Popen([sys.executable, "-m", "thinktalk", "run", "--model", str(tiny.path), "--text", "hi",
                                "--out", str(out), "--max-tokens", "2000", "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, frames = time.time() + 300, 0
    while frames == 0 and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        frames = soundfile.info(out).frames if out.is_file() else 0  # a valid WAV of the speech so far
    assert frames > 0, "the run never wrote playable speech under the requested name"
    assert [p.name for p in tmp_path.iterdir()] == ["long.wav"]  # no hidden partial file beside it
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in stderr
    assert list(tmp_path.iterdir()) == []  # the interrupted reply does not stay under the requested name
