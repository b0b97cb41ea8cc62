"""`thinktalk chat` as a user drives it: commands, a bad attachment, Ctrl-C in a reply, a missing --out-dir."""

import signal
import subprocess
import sys
import threading
import time

CHAT_OPTIONS = ("--max-tokens", "5", "--max-speech-seconds", "0.5", "--threads", "1", "--greedy")


def chat(tiny, script: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thinktalk", "chat", "--model", str(tiny.path), *options],
                          input=script, capture_output=True, text=True, timeout=600)


def test_help_lists_the_commands_and_an_unknown_command_is_not_sent(tiny):
    result = chat(tiny, "/help\n/imgae x.png\n//etc is a folder\n/quit\n", *CHAT_OPTIONS)
    assert result.returncode == 0, result.stderr
    for command in ("/image", "/audio", "/video", "/help", "/quit"):
        assert command in result.stderr, command
    assert "unknown command /imgae" in result.stderr
    assert result.stdout.count("assistant: ") == 1  # only the // line went to the model


def test_a_bad_attachment_fails_its_turn_and_the_chat_goes_on(tiny, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    out = tmp_path / "turns" / "deeper"  # created, with its parent
    script = f"/image {tmp_path / 'bad.png'}\nwhat is this?\n/audio {tmp_path}\nhello\n/quit\n"
    result = chat(tiny, script, "--out-dir", str(out), *CHAT_OPTIONS)
    assert result.returncode == 0, result.stderr
    assert "bad.png" in result.stderr and "this turn is not kept" in result.stderr
    assert "is a directory" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.count("assistant: ") == 2  # the failed turn and the good one
    assert sorted(p.name for p in out.iterdir()) == ["turn-1.wav"]  # the good reply, numbered first


def test_ctrl_c_stops_the_reply_not_the_chat(tiny, tmp_path):
    import soundfile

    process = subprocess.Popen([sys.executable, "-m", "thinktalk", "chat", "--model", str(tiny.path), "--out-dir",
                                str(tmp_path), "--max-tokens", "2000", "--threads", "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
    reader.start()
    process.stdin.write("tell me a long story\n")
    process.stdin.flush()
    wav, deadline, frames = tmp_path / "turn-1.wav", time.time() + 300, 0
    while frames == 0 and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        frames = soundfile.info(wav).frames if wav.is_file() else 0
    assert frames > 0, "the reply never started speaking"
    process.send_signal(signal.SIGINT)
    interrupted = lambda: any("reply interrupted" in line for line in stderr)  # noqa: E731
    while not interrupted() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.stdin.write("/help\n/quit\n")  # still listening after the interrupt
    process.stdin.flush()
    process.stdin.close()
    assert process.wait(timeout=120) == 0
    reader.join(timeout=10)
    text = "".join(stderr)
    assert "reply interrupted" in text and "/help" in text and "commands:" in text
    assert list(tmp_path.iterdir()) == []  # the interrupted reply's WAV is removed
