"""Server voice activity detection for the Realtime socket: an energy detector with hysteresis in time.

The audio is cut into 20 ms frames; a frame is "loud" when its RMS level, in dB relative to full scale, is above

    level(threshold) = -60 dBFS + 50 dB * threshold          (threshold 0..1; the default 0.5 gives -35 dBFS)

so `threshold` keeps the meaning of OpenAI's setting (higher = less sensitive) without a neural model. Speech starts
at the first loud frame after silence and stops once `silence_duration_ms` of consecutive quiet frames have passed;
the stop is reported at the end of the last loud frame. `prefix_padding_ms` is how much audio before the start the
caller keeps when it commits the turn. A noise floor is not estimated: in a noisy room raise the
threshold. `InputBuffer` keeps the socket's uncommitted audio and cuts the turns the detector finds out of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_MS = 20
FLOOR_DBFS = -60.0
RANGE_DB = 50.0


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
    sample: int  # index (since the detector was reset) of the first sample of the first loud frame


@dataclass(frozen=True)
class SpeechStopped:
    sample: int  # index just past the last loud frame


class EnergyVad:
    """Feed float32 mono samples at `sample_rate`; get SpeechStarted / SpeechStopped events in order."""

    def __init__(self, settings: VadSettings, sample_rate: int):
        self.settings, self.sample_rate = settings, sample_rate
        self.frame = sample_rate * FRAME_MS // 1000
        self.level = 10.0 ** (threshold_dbfs(settings.threshold) / 20.0)  # linear RMS
        self.silence_frames = max(1, -(-settings.silence_duration_ms // FRAME_MS))
        self.reset()

    def reset(self, position: int = 0) -> None:
        """Forget any speech in progress; the next sample fed is sample `position`."""
        self.position = position  # samples consumed into whole frames
        self.pending = np.zeros(0, dtype=np.float32)
        self.speaking = False
        self.last_loud_end = 0
        self.quiet = 0

    def feed(self, samples: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        data = np.concatenate([self.pending, np.asarray(samples, dtype=np.float32)])
        whole = len(data) // self.frame * self.frame
        self.pending = data[whole:]
        events: list[SpeechStarted | SpeechStopped] = []
        if whole == 0:
            return events
        frames = data[:whole].reshape(-1, self.frame).astype(np.float64)
        loud = np.sqrt(np.mean(frames * frames, axis=1)) > self.level
        for is_loud in loud:
            start, self.position = self.position, self.position + self.frame
            if is_loud:
                if not self.speaking:
                    self.speaking = True
                    events.append(SpeechStarted(start))
                self.last_loud_end, self.quiet = self.position, 0
            elif self.speaking:
                self.quiet += 1
                if self.quiet >= self.silence_frames:
                    self.speaking = False
                    events.append(SpeechStopped(self.last_loud_end))
        return events


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

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.audio = np.zeros(0, dtype=np.float32)
        self.origin = 0  # session sample index of audio[0]
        self.vad: EnergyVad | None = None
        self.speech_start: int | None = None

    def detect(self, settings: VadSettings | None) -> None:
        """Turns detection on (or re-tunes it) or off; the same settings keep a turn in progress."""
        if settings is None:
            self.vad = None
        elif self.vad is None or self.vad.settings != settings:
            self.vad = EnergyVad(settings, self.sample_rate)
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
