"""The resampler (thinktalk/processing/resample.py, soxr): lengths, pitch and level kept, rates checked before any
work, and working memory bounded whatever the rates (a fresh process's peak RSS)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest

from thinktalk.processing.resample import MAX_RATE, resample

PEAK_MIB_ALLOWED = 24  # working memory beyond the input and output arrays


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 1001, 48_000])
@pytest.mark.parametrize("orig, target", [(44_100, 16_000), (16_000, 24_000), (24_000, 16_000), (44_101, 16_000),
                                          (1_000, 384_000), (384_000, 16_000)])
def test_length_is_rounded_input_time(n, orig, target):
    out = resample(np.random.default_rng(n).standard_normal(n).astype(np.float32), orig, target)
    assert out.dtype == np.float32 and out.shape == (round(Fraction(n * target, orig)),)


def test_a_tone_keeps_its_pitch_level_and_timing_across_coprime_rates():
    orig, target, hz = 44_101, 16_000, 1234.0
    t = np.arange(orig) / orig
    out = resample((0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32), orig, target)
    expected = 0.5 * np.sin(2 * np.pi * hz * np.arange(len(out)) / target)  # output k at time k / target
    middle = slice(len(out) // 4, 3 * len(out) // 4)
    assert np.abs(out[middle] - expected[middle]).max() < 0.01


@pytest.mark.parametrize("orig, target", [(0, 16_000), (16_000, -1), (MAX_RATE + 1, 16_000), (16_000, 10**9),
                                          (16_000.0, 24_000), (True, 16_000)])
def test_rates_are_checked_before_any_work(orig, target):
    with pytest.raises(ValueError, match="rate"):
        resample(np.zeros(10, np.float32), orig, target)


@pytest.mark.parametrize("orig, target", [(384_000, 16_000), (44_101, 16_000), (16_000, 44_101)])
def test_working_memory_is_bounded_for_any_rates(orig, target):
    """20 s at a high or a coprime rate: a fresh process's peak grows by the output array only."""
    script = textwrap.dedent(f"""
        import resource, numpy as np
        from thinktalk.processing.resample import resample
        x = np.random.default_rng(0).standard_normal({orig} * 20).astype(np.float32)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        y = resample(x, {orig}, {target})
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before - y.nbytes // 1024) // 1024)
        """)
    grown = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert int(grown) < PEAK_MIB_ALLOWED
