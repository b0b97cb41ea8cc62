"""The demo checkpoint: random weights, but its speech is a quiet signal well inside [-1, 1], not clipped noise."""

import numpy as np
import pytest

from thinktalk import Omni
from thinktalk.demo import DEMO_SPEECH_RMS, demo_messages, ensure_demo_checkpoint
from thinktalk.requests import GenerationRequest, SamplingParams, SpeechParams

SPEECH_SECONDS = 2.0
# "Well inside [-1, 1]": no sample near full scale, and not silence either.
MOST_PEAK, LEAST_RMS = 0.5, 0.01


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return Omni.from_pretrained(ensure_demo_checkpoint(tmp_path_factory.mktemp("demo_cache")), device="cpu",
                                dtype="float32")


def test_demo_speech_is_a_quiet_murmur_not_clipping(demo):
    request = GenerationRequest(demo_messages(), SamplingParams(max_new_tokens=8, seed=0),
                                SpeechParams(max_seconds=SPEECH_SECONDS))
    reply = demo.generate(request)
    audio = reply.audio
    assert audio.size >= reply.sample_rate  # at least a second of speech to measure
    peak, rms = float(np.abs(audio).max()), float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    assert peak < MOST_PEAK, f"peak {peak}: the demo's speech clips"
    assert LEAST_RMS < rms < 2 * DEMO_SPEECH_RMS, f"RMS {rms}"
    assert abs(float(audio.mean())) < rms / 4  # no DC offset passing for a signal
