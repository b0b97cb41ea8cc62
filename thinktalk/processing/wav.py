"""Writing speech to a WAV file as it arrives, without ever leaving a partial file under the requested name.

Samples go to a hidden temporary file beside the target; `commit()` renames it into place. If the run stops
before that (an error, Ctrl-C), `abort()` (or leaving the `with` block by an exception) deletes the temporary file.
"""

from __future__ import annotations

import os
import secrets
import wave
from pathlib import Path

import numpy as np

PCM16_MAX = 32767


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before any work if the output cannot be written: a missing or read-only folder, or a folder as path."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ValueError(f"output path {target} is a directory; give a file name such as {target / 'reply.wav'}")
    if not folder.is_dir():
        raise ValueError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output folder {folder} is not writable")
    return target


def to_pcm16(samples: np.ndarray) -> bytes:
    clipped = np.clip(samples.astype(np.float32), -1.0, 1.0)
    return (np.round(clipped * PCM16_MAX).astype("<i2")).tobytes()


class WavWriter:
    def __init__(self, path: str | os.PathLike, sample_rate: int):
        self.target = check_writable(path)
        # A unique hidden name beside the target, created like any new file (so the umask applies).
        self.temp = self.target.with_name(f".{self.target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        self.handle = open(self.temp, "xb")  # noqa: SIM115 (closed in commit/abort)
        self.file = wave.open(self.handle, "wb")
        self.file.setnchannels(1)
        self.file.setsampwidth(2)
        self.file.setframerate(sample_rate)
        self.samples = 0

    def write(self, samples: np.ndarray) -> None:
        self.file.writeframes(to_pcm16(samples))
        self.samples += samples.size

    def _close(self) -> None:
        self.file.close()  # writes the final header sizes
        self.handle.close()  # wave does not close a file object it was handed

    def commit(self) -> Path:
        self._close()
        os.replace(self.temp, self.target)
        return self.target

    def abort(self) -> None:
        self._close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.abort()
        elif self.temp.exists():
            self.commit()
