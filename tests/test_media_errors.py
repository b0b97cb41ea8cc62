"""Bad media through the public API: each a typed error that names the input, and nothing generated."""

import base64
import struct
import zlib

import numpy as np
import pytest
from media import noise_image, tone, write_video

from thinktalk import Omni
from thinktalk.processing.audio import AudioInputError
from thinktalk.processing.multimodal import MediaFetchError
from thinktalk.processing.prompt import PromptError
from thinktalk.processing.vision import VisionInputError


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but which carries almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def written(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    noise_image(64, 64).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return path


CASES = {
    "missing audio path": (lambda t: user({"type": "audio", "audio": str(t / "nope.wav")}), AudioInputError,
                           "nope.wav"),
    "empty audio file": (lambda t: user({"type": "audio", "audio": written(t / "empty.wav", b"")}),
                         AudioInputError, "empty.wav"),
    "zero-length audio": (lambda t: user({"type": "audio", "audio": (np.zeros(0, np.float32), 16000)}),
                          AudioInputError, "audio array"),
    "one-sample audio": (lambda t: user({"type": "audio", "audio": (np.zeros(1, np.float32), 16000)}),
                         AudioInputError, "audio array"),
    "NaN samples": (lambda t: user({"type": "audio", "audio": (np.full(16000, np.nan, np.float32), 16000)}),
                    AudioInputError, "audio array"),
    "inf samples": (lambda t: user({"type": "audio", "audio": (np.full(16000, np.inf, np.float32), 16000)}),
                    AudioInputError, "audio array"),
    "corrupt audio bytes": (lambda t: user({"type": "audio", "audio": b"RIFF\x00\x01garbage" * 10}),
                            AudioInputError, "audio bytes"),
    "text file as audio": (lambda t: user({"type": "audio", "audio": written(t / "notes.txt", b"hello")}),
                           AudioInputError, "notes.txt"),
    "truncated image": (lambda t: user({"type": "image", "image": str(truncated_png(t))}), VisionInputError,
                        "cut.png"),
    "decompression bomb": (lambda t: user({"type": "image", "image": png_header_claiming(60000, 60000)}),
                           VisionInputError, "60000"),
    "unsupported image": (lambda t: user({"type": "image", "image": b"%PDF-1.4 not an image"}), VisionInputError,
                          "image"),
    "bad image data URL": (lambda t: user({"type": "image", "image": "data:image/png;base64,!!!"}),
                           VisionInputError, "data"),
    "missing video": (lambda t: user({"type": "video", "video": str(t / "none.mp4")}), VisionInputError,
                      "none.mp4"),
    "video with no frames": (lambda t: user({"type": "video", "video": written(
        t / "fake.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)}), VisionInputError, "fake.mp4"),
    "remote URL not allowed": (lambda t: user({"type": "image", "image": "https://example.com/cat.png"}),
                               MediaFetchError, "example.com"),
    "unknown part type": (lambda t: user({"type": "hologram", "hologram": 1}), PromptError, "hologram"),
    "media part without media": (lambda t: user({"type": "image"}), PromptError, "image"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_media_is_a_named_error(name, omni, tmp_path):
    make, error, fragment = CASES[name]
    with pytest.raises(error) as caught:
        omni.generate(make(tmp_path), max_new_tokens=2)
    assert fragment in str(caught.value)


def test_audio_in_video_needs_an_audio_track(omni, tmp_path):
    silent = write_video(tmp_path / "silent.mp4", seconds=2.0, audio_rate=None)
    with pytest.raises(AudioInputError, match="silent.mp4.*no audio stream"):
        omni.generate(user({"type": "video", "video": str(silent)}), use_audio_in_video=True, max_new_tokens=2)
    # The same video without use_audio_in_video is fine.
    assert omni.generate(user({"type": "video", "video": str(silent)}), max_new_tokens=2).token_ids


def test_data_url_audio_is_accepted(omni, tmp_path):
    import soundfile

    path = tmp_path / "a.wav"
    soundfile.write(path, tone(1.0), 16000)
    url = "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()
    by_url = omni.prepare(user({"type": "audio", "audio": url}))
    by_path = omni.prepare(user({"type": "audio", "audio": str(path)}))
    assert by_url.token_ids == by_path.token_ids
