"""Server voice activity detection for the Realtime socket: Silero VAD (the `silero-vad` package's model, on torch),
or an energy detector when that package is not installed (the log says so).

Both score fixed frames and share one hysteresis in time. Silero scores each 32 ms window (512 samples at 16 kHz,
the input resampled by soxr) with a speech probability; `threshold` is that probability, as in OpenAI's setting
(higher = less sensitive). A frame starts speech at `threshold` and, once speaking, keeps it down to
`threshold - KEEP_MARGIN` (Silero's own recommendation). The energy detector scores 20 ms frames by RMS level:

    level(threshold) = -60 dBFS + 50 dB * threshold          (threshold 0..1; the default 0.5 gives -35 dBFS)

without a noise floor (in a noisy room it hears noise as speech; raise the threshold). Speech starts at the first
speech frame and stops once `silence_duration_ms` of consecutive other frames have passed; the stop is reported at
the end of the last speech frame. `prefix_padding_ms` is how much audio before the start the caller keeps when it
commits the turn. `InputBuffer` keeps the socket's uncommitted audio and cuts the turns the detector finds out of it.
"""

from __future__ import annotations

import abc
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

log = logging.getLogger("thinktalk.serve.vad")
FRAME_MS = 20  # the energy detector's frame
FLOOR_DBFS = -60.0
RANGE_DB = 50.0
SILERO_RATE = 16_000  # the rate Silero's 16 kHz model takes
SILERO_WINDOW = 512  # samples per scored window at 16 kHz (32 ms): the model's fixed input size
KEEP_MARGIN = 0.15  # speech continues while the probability stays above threshold - KEEP_MARGIN ...
KEEP_FLOOR = 0.5  # ... but never below half the threshold (a low threshold would otherwise never end speech)
DETECTORS = ("silero", "energy")  # "silero" falls back to "energy" when silero-vad is not installed


def threshold_dbfs(threshold: float) -> float:
    return FLOOR_DBFS + RANGE_DB * threshold


@dataclass(frozen=True)
class VadSettings:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if self.prefix_padding_ms < 0 or self.silence_duration_ms < 0:
            raise ValueError("prefix_padding_ms and silence_duration_ms must not be negative")


@dataclass(frozen=True)
class SpeechStarted:
    sample: int  # index (since the detector was reset) of the first sample of the first speech frame


@dataclass(frozen=True)
class SpeechStopped:
    sample: int  # index just past the last speech frame


class FrameVad(abc.ABC):
    """Feed float32 mono samples at `sample_rate`; get SpeechStarted / SpeechStopped events in order. Subclasses
    score frames (`_scores`: one score per whole frame fed, and each frame's end sample); this class holds the
    hysteresis: start at a score >= `start_level`, keep speaking while >= `keep_level`."""

    start_level: float
    keep_level: float

    def __init__(self, settings: VadSettings, sample_rate: int, frame_ms: float):
        self.settings, self.sample_rate = settings, sample_rate
        self.silence_frames = max(1, -(-settings.silence_duration_ms // frame_ms))
        self.reset()

    def reset(self, position: int = 0) -> None:
        """Forget any speech in progress; the next sample fed is sample `position`."""
        self.origin = position  # frames are counted from here
        self.frames = 0  # frames scored since the reset
        self.speaking = False
        self.last_speech_end = 0
        self.quiet = 0

    @abc.abstractmethod
    def frame_end(self, frame: int) -> int:
        """The sample just past frame `frame` (counted since the reset)."""

    @abc.abstractmethod
    def _scores(self, samples: np.ndarray) -> np.ndarray:
        """One score per whole frame in `samples` (a partial frame waits for the next call)."""

    def feed(self, samples: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        events: list[SpeechStarted | SpeechStopped] = []
        for score in self._scores(np.asarray(samples, dtype=np.float32)).tolist():
            start, end = self.frame_end(self.frames - 1) if self.frames else self.origin, self.frame_end(self.frames)
            self.frames += 1
            if score >= (self.keep_level if self.speaking else self.start_level):
                if not self.speaking:
                    self.speaking = True
                    events.append(SpeechStarted(start))
                self.last_speech_end, self.quiet = end, 0
            elif self.speaking:
                self.quiet += 1
                if self.quiet >= self.silence_frames:
                    self.speaking = False
                    events.append(SpeechStopped(self.last_speech_end))
        return events


class EnergyVad(FrameVad):
    """20 ms frames scored by RMS level (linear), against the threshold's level in dBFS."""

    def __init__(self, settings: VadSettings, sample_rate: int):
        self.frame = sample_rate * FRAME_MS // 1000
        self.start_level = self.keep_level = 10.0 ** (threshold_dbfs(settings.threshold) / 20.0)
        super().__init__(settings, sample_rate, FRAME_MS)

    def reset(self, position: int = 0) -> None:
        super().reset(position)
        self.pending = np.zeros(0, dtype=np.float32)

    def frame_end(self, frame: int) -> int:
        return self.origin + (frame + 1) * self.frame

    def _scores(self, samples: np.ndarray) -> np.ndarray:
        data = np.concatenate([self.pending, samples])
        whole = len(data) // self.frame * self.frame
        self.pending = data[whole:]
        frames = data[:whole].reshape(-1, self.frame).astype(np.float64)
        return np.sqrt(np.mean(frames * frames, axis=1))


class SileroVad(FrameVad):
    """Silero's speech probability per 32 ms window; the input is resampled to 16 kHz as it streams (soxr). Each
    detector holds its own model (the model keeps its recurrent state between windows)."""

    def __init__(self, settings: VadSettings, sample_rate: int, model: torch.nn.Module):
        import soxr

        self.model, self.soxr = model, soxr
        self.start_level = settings.threshold
        self.keep_level = max(settings.threshold - KEEP_MARGIN, KEEP_FLOOR * settings.threshold)
        self.window = Fraction(SILERO_WINDOW * sample_rate, SILERO_RATE)  # input samples per window
        super().__init__(settings, sample_rate, 1000 * SILERO_WINDOW / SILERO_RATE)

    def reset(self, position: int = 0) -> None:
        super().reset(position)
        self.model.reset_states()
        self.stream = self.soxr.ResampleStream(self.sample_rate, SILERO_RATE, 1, dtype="float32")
        self.pending = np.zeros(0, dtype=np.float32)  # resampled samples short of a window

    def frame_end(self, frame: int) -> int:
        return self.origin + round((frame + 1) * self.window)

    def _scores(self, samples: np.ndarray) -> np.ndarray:
        data = np.concatenate([self.pending, self.stream.resample_chunk(samples)])
        whole = len(data) // SILERO_WINDOW * SILERO_WINDOW
        self.pending = data[whole:]
        windows = torch.from_numpy(data[:whole].copy()).view(-1, SILERO_WINDOW)
        with torch.inference_mode():
            return np.array([float(self.model(window, SILERO_RATE)) for window in windows])


@functools.cache
def silero_loader() -> Callable[[], torch.nn.Module] | None:
    """silero-vad's model loader, or None (logged once) when the package is not installed. Importing the package
    sets torch's thread count to 1 for the whole process; the server's own setting is put back."""
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad
    except ImportError:
        log.warning("silero-vad is not installed: server VAD falls back to the energy detector "
                    "(pip install silero-vad)")
        return None
    finally:
        torch.set_num_threads(threads)
    return load_silero_vad


def detector_model(kind: str) -> torch.nn.Module | None:
    """A fresh Silero model for kind "silero" (None if silero-vad is missing), None for kind "energy"."""
    if kind not in DETECTORS:
        raise ValueError(f"unknown VAD detector {kind!r}; choose one of {', '.join(DETECTORS)}")
    loader = silero_loader() if kind == "silero" else None
    return None if loader is None else loader()


@dataclass(frozen=True)
class TurnStarted:
    ms: int  # session time of the start


@dataclass(frozen=True)
class TurnEnded:
    ms: int  # session time of the stop
    audio: np.ndarray  # the turn, from `prefix_padding_ms` before its start to its stop (empty if already taken)


class InputBuffer:
    """The input audio not yet committed, on the session's clock (samples since the socket opened); with VAD settings
    it also finds turns: each stop hands over the turn's audio and drops everything up to the stop."""

    def __init__(self, sample_rate: int, detector: str = "silero"):
        self.sample_rate = sample_rate
        self.audio = np.zeros(0, dtype=np.float32)
        self.origin = 0  # session sample index of audio[0]
        self.detector = detector
        self.model: torch.nn.Module | None = None  # Silero's, loaded on the first detect()
        self.vad: FrameVad | None = None
        self.speech_start: int | None = None

    def detect(self, settings: VadSettings | None) -> None:
        """Turns detection on (or re-tunes it) or off; the same settings keep a turn in progress."""
        if settings is None:
            self.vad = None
        elif self.vad is None or self.vad.settings != settings:
            if self.model is None:
                self.model = detector_model(self.detector)
            self.vad = (EnergyVad(settings, self.sample_rate) if self.model is None
                        else SileroVad(settings, self.sample_rate, self.model))
            self._restart()

    def ms(self, sample: int) -> int:
        return sample * 1000 // self.sample_rate

    def append(self, samples: np.ndarray) -> list[TurnStarted | TurnEnded]:
        self.audio = np.concatenate([self.audio, np.asarray(samples, dtype=np.float32)])
        if self.vad is None:
            return []
        turns: list[TurnStarted | TurnEnded] = []
        for change in self.vad.feed(samples):
            if isinstance(change, SpeechStarted):
                self.speech_start = change.sample
                turns.append(TurnStarted(self.ms(change.sample)))
                continue
            started = self.speech_start if self.speech_start is not None else self.origin
            pad = self.vad.settings.prefix_padding_ms * self.sample_rate // 1000
            first, end = max(started - pad, self.origin) - self.origin, max(change.sample - self.origin, 0)
            turns.append(TurnEnded(self.ms(change.sample), self.audio[first:end].copy()))
            self._drop(end)
            self.speech_start = None
        return turns

    def take(self) -> np.ndarray:
        """All of the buffer (a manual commit or a clear); a turn in progress starts over."""
        audio = self.audio
        self._drop(len(audio))
        self._restart()
        return audio

    def _drop(self, samples: int) -> None:
        self.audio = self.audio[samples:]
        self.origin += samples

    def _restart(self) -> None:
        self.speech_start = None
        if self.vad is not None:
            self.vad.reset(self.origin + len(self.audio))
