"""Writing speech to a WAV file as it is made, playable at every moment, and never left half-made after a stop.

The file is written under the requested name from the start (a valid, empty WAV), and after every chunk of samples
the header's sizes are rewritten and the file flushed: a player, or another process copying the file, always sees a
valid WAV of the speech so far (the header may lag the data by at most the chunk being written, never lead it).
If the reply stops before it is complete (an error, Ctrl-C), `abort()` (or leaving the `with` block by an exception)
deletes the file, so an interrupted reply never stays under the requested name looking like a whole one. An earlier
file of that name is replaced when writing starts.
"""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np

PCM16_MAX = 32767
PCM16_BYTES = 2  # sample width of 16-bit PCM


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
    """Mono PCM16 at `sample_rate` into `path`, valid after every `write`; `commit()` keeps it, `abort()` removes it."""

    def __init__(self, path: str | os.PathLike, sample_rate: int):
        self.target = check_writable(path)
        self.handle = open(self.target, "wb")  # noqa: SIM115 (closed in commit/abort)
        self.file = wave.open(self.handle, "wb")
        self.file.setnchannels(1)
        self.file.setsampwidth(PCM16_BYTES)
        self.file.setframerate(sample_rate)
        self.file.writeframes(b"")  # the header, for zero frames: a valid empty WAV from the start
        self.handle.flush()
        self.samples = 0
        self.closed = False

    def write(self, samples: np.ndarray) -> None:
        # samples: (n,) float in [-1, 1]. wave's writeframes appends them, then rewrites the header's sizes (the
        # file is seekable); the flush makes both visible to readers now, not when the buffer fills.
        assert not self.closed, "write after commit/abort"
        self.file.writeframes(to_pcm16(samples))
        self.handle.flush()
        self.samples += samples.size

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.file.close()  # the final header sizes
            self.handle.close()  # wave does not close a file object it was handed

    def commit(self) -> Path:
        self._close()
        return self.target

    def abort(self) -> None:
        self._close()
        self.target.unlink(missing_ok=True)

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.abort()
        else:
            self.commit()
