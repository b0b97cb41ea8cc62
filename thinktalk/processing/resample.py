"""Band-limited resampling with soxr (libsoxr, what Qwen's own input helper gets through librosa's `soxr_hq`).

soxr streams the input through its filter internally, so its working memory stays bounded (a few MiB) whatever
the two rates, coprime ones and 384 kHz included; what grows with the input is only the output array itself. The
rates are checked before any work: both within [1, MAX_RATE] Hz (the decoders already refuse a source rate outside
their sanity range, processing/audio_decode.py).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import soxr

from .audio_decode import MAX_SOURCE_RATE

MAX_RATE = MAX_SOURCE_RATE  # Hz, for either side: the highest rate audio hardware records
QUALITY = "HQ"  # librosa's default (res_type="soxr_hq")


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """A 1-D float32 waveform at `orig_rate` -> the same sound at `target_rate`: round(len * target / orig) samples;
    output sample k sits at input time k * orig_rate / target_rate."""
    for name, rate in (("orig_rate", orig_rate), ("target_rate", target_rate)):
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 1 <= rate <= MAX_RATE:
            raise ValueError(f"resample: {name} must be an integer in [1, {MAX_RATE}] Hz, got {rate!r}")
    samples = np.ascontiguousarray(waveform, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"resample: expected a 1-D waveform, got shape {samples.shape}")
    if orig_rate == target_rate:
        return samples.copy()
    out_len = round(Fraction(len(samples) * int(target_rate), int(orig_rate)))
    if out_len == 0:
        return np.zeros(0, dtype=np.float32)
    out = soxr.resample(samples, int(orig_rate), int(target_rate), quality=QUALITY)
    # soxr rounds a length ending in exactly .5 up, Python's round() to even: at most one sample apart
    assert abs(len(out) - out_len) <= 1, (len(out), out_len)
    return np.pad(out[:out_len], (0, out_len - min(len(out), out_len))).astype(np.float32, copy=False)
