"""Server VAD (thinktalk/serve/vad.py): Silero VAD on noisy speech against the energy fallback, its settings with
OpenAI's meaning, and the fallback when silero-vad is not installed. The speech is espeak-ng's when installed,
else a synthetic voiced signal (tests/speech.py); run with -s to see the detection rates per SNR."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("silero_vad")
pytest.importorskip("soxr")

import speech  # noqa: E402

from thinktalk.serve import vad  # noqa: E402
from thinktalk.serve.vad import EnergyVad, InputBuffer, SileroVad, VadSettings  # noqa: E402

RATE = speech.RATE
TRIALS = 3


def test_silero_finds_speech_in_noise_where_the_energy_detector_fails():
    rates = {(kind, snr): speech.detection_rate(kind, snr, TRIALS)
             for kind in ("silero", "energy") for snr in (None, 20, 10, 5)}
    print(f"\nspeech: {speech.source()}; detection rate over {TRIALS} utterances")
    for snr in (None, 20, 10, 5):
        print(f"  SNR {'clean' if snr is None else snr:>5}: silero {rates['silero', snr]:.2f}  "
              f"energy {rates['energy', snr]:.2f}")
    assert rates["silero", None] == rates["energy", None] == 1.0  # both hear clean speech
    assert rates["silero", 10] == rates["silero", 5] == 1.0
    assert rates["energy", 10] == rates["energy", 5] == 0.0  # the noise alone is over the energy threshold


def test_silero_hears_no_speech_in_noise_or_tones():
    rng = np.random.default_rng(0)
    t = np.arange(3 * RATE) / RATE
    for clip in (0.05 * rng.standard_normal(3 * RATE), 0.3 * np.sin(2 * np.pi * 440 * t)):
        assert speech.turns_in(clip.astype(np.float32), "silero") == []
        assert speech.turns_in(clip.astype(np.float32), "energy") != []  # loud enough for the energy detector


def two_utterances(gap_s: float) -> tuple[np.ndarray, int]:
    """Two utterances `gap_s` apart (silence between), 1 s of silence around; and where the first one starts."""
    first, second = speech.utterance(0), speech.utterance(1)
    edges = [np.abs(u) > 0.02 for u in (first, second)]
    first = first[:np.flatnonzero(edges[0])[-1] + 1]  # espeak pads its output with silence: trim it
    second = second[np.flatnonzero(edges[1])[0]:]
    lead = np.zeros(RATE, np.float32)
    gap = np.zeros(int(gap_s * RATE), np.float32)
    start = len(lead) + np.flatnonzero(edges[0])[0]
    return np.concatenate([lead, first, gap, second, lead]), start


def test_silence_duration_splits_turns_and_prefix_padding_keeps_audio_before_the_start():
    clip, start = two_utterances(0.7)
    assert len(speech.turns_in(clip, "silero", VadSettings(0.5, 300, 1200))) == 1
    assert len(speech.turns_in(clip, "silero", VadSettings(0.5, 300, 300))) == 2
    for padding_ms in (0, 300):
        buffer = InputBuffer(RATE, "silero")
        buffer.detect(VadSettings(0.5, padding_ms, 300))
        turns = [t for i in range(0, len(clip), 2400) for t in buffer.append(clip[i:i + 2400])]
        begun, ended = turns[0], turns[1]
        assert abs(begun.ms - start * 1000 // RATE) <= 100
        assert abs(len(ended.audio) / RATE * 1000 - (ended.ms - begun.ms + padding_ms)) <= 40


def test_a_higher_threshold_is_less_sensitive():
    clip, span = speech.with_noise(speech.utterance(0), 0, seed=0)
    probabilities = []
    for threshold in (0.3, 0.5, 0.7, 0.9, 0.99):
        spans = speech.turns_in(clip, "silero", VadSettings(threshold, 300, 500))
        probabilities.append(sum(b - a for a, b in spans))
    assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] > probabilities[-1]


def test_falls_back_to_the_energy_detector_when_silero_vad_is_missing(monkeypatch, caplog):
    vad.silero_loader.cache_clear()
    monkeypatch.setitem(sys.modules, "silero_vad", None)  # `import silero_vad` now raises ImportError
    try:
        with caplog.at_level(logging.WARNING, logger="thinktalk.serve.vad"):
            buffer = InputBuffer(RATE, "silero")
            buffer.detect(VadSettings())
        assert isinstance(buffer.vad, EnergyVad)
        assert "silero-vad is not installed" in caplog.text
    finally:
        vad.silero_loader.cache_clear()
    monkeypatch.undo()
    buffer = InputBuffer(RATE, "silero")
    buffer.detect(VadSettings())
    assert isinstance(buffer.vad, SileroVad)
    with pytest.raises(ValueError, match="unknown VAD detector"):
        InputBuffer(RATE, "webrtc").detect(VadSettings())


def test_loading_silero_keeps_torchs_thread_count():
    vad.silero_loader.cache_clear()
    for name in [m for m in sys.modules if m == "silero_vad" or m.startswith("silero_vad.")]:
        del sys.modules[name]  # imported afresh: the package sets torch's threads to 1 at import
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert vad.silero_loader() is not None
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
