"""Speech made for the VAD tests and bench: espeak-ng's voice when it is installed, else a synthetic voiced signal
(a glottal pulse train through formant resonances, with syllable-rate loudness), and noise mixed in at an SNR."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave

import numpy as np
import soxr

RATE = 24_000  # the Realtime socket's rate
# The synthetic voice: a pitch contour around 120 Hz, vowels as (F1, F2, F3) formants in Hz, 4 syllables a second.
PITCH_HZ = 120.0
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (570, 840, 2410), (300, 870, 2240))
SYLLABLES_PER_SECOND = 4.0
FORMANT_BANDWIDTH_HZ = 90.0
SENTENCES = ("Hello, could you tell me what the weather is like today?",
             "I would like to book a table for two people tonight.",
             "Please read the last message again, a little more slowly.")
SHORT = ("Hello there.", "Good morning.", "Thank you.")


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def source() -> str:
    return "espeak-ng" if espeak_available() else "synthetic voiced signal (espeak-ng not installed)"


def espeak(text: str) -> np.ndarray:
    """espeak-ng's rendering of `text`: float32 mono at RATE."""
    wav = subprocess.run(["espeak-ng", "--stdout", "-s", "150", text], check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav)) as reader:
        rate, pcm = reader.getframerate(), reader.readframes(reader.getnframes())
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    return soxr.resample(samples, rate, RATE).astype(np.float32)


def synthetic(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, speech-like signal: float32 mono at RATE, peak about 0.5."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    pitch = PITCH_HZ * (1.0 + 0.15 * np.sin(2 * np.pi * 0.7 * t) + 0.05 * rng.standard_normal() * np.sin(5 * t))
    phase = np.cumsum(pitch) / RATE
    pulses = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)  # one pulse per pitch period
    out = np.zeros(n)
    syllable = int(RATE / SYLLABLES_PER_SECOND)
    for start in range(0, n, syllable):
        piece = pulses[start:start + syllable]
        vowel = VOWELS[rng.integers(len(VOWELS))]
        voiced = sum(resonate(piece, f) for f in vowel)
        envelope = np.sin(np.pi * np.arange(len(piece)) / syllable) ** 2  # loud in the middle of each syllable
        out[start:start + len(piece)] = voiced * envelope
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def resonate(pulses: np.ndarray, hz: float) -> np.ndarray:
    """`pulses` through a two-pole resonance at `hz` (a formant)."""
    r = np.exp(-np.pi * FORMANT_BANDWIDTH_HZ / RATE)
    a1, a2 = 2 * r * np.cos(2 * np.pi * hz / RATE), -r * r
    y = np.zeros(len(pulses))
    for i in range(len(pulses)):
        y[i] = pulses[i] + a1 * (y[i - 1] if i else 0.0) + a2 * (y[i - 2] if i > 1 else 0.0)
    return y


def utterance(index: int) -> np.ndarray:
    """The index-th test utterance (about 2-4 s)."""
    if espeak_available():
        return espeak(SENTENCES[index % len(SENTENCES)])
    return synthetic(2.5, seed=index)


def spoken_turn(index: int = 0, lead: float = 0.2, tail: float = 0.8) -> np.ndarray:
    """A short utterance (about 1 s, trimmed of espeak's own silence) with `lead` and `tail` seconds of silence."""
    if espeak_available():
        voice = espeak(SHORT[index % len(SHORT)])
        loud = np.flatnonzero(np.abs(voice) > 0.02)
        voice = voice[loud[0]:loud[-1] + 1]
    else:
        voice = synthetic(1.0, seed=index)
    return np.concatenate([np.zeros(int(lead * RATE), np.float32), voice, np.zeros(int(tail * RATE), np.float32)])


def with_noise(speech: np.ndarray, snr_db: float | None, seed: int, lead: float = 1.0,
               tail: float = 1.5) -> tuple[np.ndarray, tuple[int, int]]:
    """`lead` s of noise, the speech, `tail` s of noise, with white + low-frequency noise at `snr_db` (speech power
    over noise power; None: no noise); and the speech's (first, last) sample."""
    rng = np.random.default_rng(seed)
    first = int(lead * RATE)
    clip = np.concatenate([np.zeros(first), speech, np.zeros(int(tail * RATE))])
    active = np.abs(speech) > 0.01 * np.abs(speech).max()
    voiced = speech[active].astype(np.float64)
    if snr_db is not None:
        white = rng.standard_normal(len(clip))
        hum = np.cumsum(rng.standard_normal(len(clip)))  # brown noise: a room's rumble
        hum = (hum - np.convolve(hum, np.ones(400) / 400, mode="same")) * 0.1
        noise = white + hum
        noise *= np.sqrt(np.mean(voiced**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
        clip = clip + noise
    return clip.astype(np.float32), (first, first + len(speech))


def turns_in(clip: np.ndarray, detector: str, settings=None, chunk_ms: int = 100) -> list[tuple[int, int]]:
    """The (start, stop) sample spans an InputBuffer with `detector` finds in `clip`, fed in socket-sized appends; a
    turn still open at the end counts as running to the end."""
    from thinktalk.serve.vad import InputBuffer, TurnEnded, TurnStarted, VadSettings

    buffer = InputBuffer(RATE, detector)
    buffer.detect(settings or VadSettings(0.5, 300, 500))
    spans, start = [], None
    step = RATE * chunk_ms // 1000
    for first in range(0, len(clip), step):
        for turn in buffer.append(clip[first:first + step]):
            sample = turn.ms * RATE // 1000
            if isinstance(turn, TurnStarted):
                start = sample
            elif isinstance(turn, TurnEnded):
                spans.append((start if start is not None else 0, sample))
                start = None
    if start is not None:
        spans.append((start, len(clip)))
    return spans


def detected(spans: list[tuple[int, int]], speech: tuple[int, int], clip_len: int,
             tolerance_ms: int = 250) -> bool:
    """One turn, starting within `tolerance_ms` of the speech's start and stopping before the clip's end (the
    noise after the speech was heard as silence)."""
    tolerance = RATE * tolerance_ms // 1000
    return (len(spans) == 1 and abs(spans[0][0] - speech[0]) <= tolerance
            and speech[0] < spans[0][1] < clip_len)


def detection_rate(detector: str, snr_db: float | None, trials: int) -> float:
    """The fraction of `trials` utterances (each with its own noise) that `detected` finds."""
    hits = 0
    for trial in range(trials):
        clip, span = with_noise(utterance(trial), snr_db, seed=trial)
        hits += detected(turns_in(clip, detector), span, len(clip))
    return hits / trials
