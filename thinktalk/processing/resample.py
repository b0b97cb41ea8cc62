"""Band-limited resampling (Kaiser-windowed sinc, polyphase) in working memory bounded whatever the two rates.

For rates orig -> target with g = gcd, the filter has up = target / g phases of 2 * half taps each, half growing
with orig / target when downsampling. Neither the phase table nor the strided windows are ever built whole: phases
are made PHASES_PER_BLOCK at a time, and output rows run in blocks whose windows hold at most WINDOW_ELEMENTS
values. So a coprime pair of rates (up = 16000) or a high input rate costs time, never memory; the input rate
itself is bounded by the decoders' sanity range (processing/audio.py).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

# Taps span this many zero crossings on each side of the sinc.
SINC_ZERO_CROSSINGS = 16
SINC_ROLLOFF = 0.945  # cutoff as a fraction of the lower Nyquist frequency, leaves room for the transition band
KAISER_BETA = 8.6
MAX_ROWS_PER_BLOCK = 1 << 16  # output rows (of `up` samples each) per block at most
# Windows of one block at most (float32 values: 16 MiB); a block of rows shrinks as the filter grows.
WINDOW_ELEMENTS = 1 << 22
PHASES_PER_BLOCK = 256  # filter phases computed at once: (256, 2 * half) float64, under 2 MiB at 384 kHz -> 16 kHz


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """A 1-D float32 waveform at `orig_rate` -> the same sound at `target_rate`: round(len * target / orig) samples;
    output sample k sits at input time k * orig_rate / target_rate."""
    common = math.gcd(orig_rate, target_rate)
    up, down = target_rate // common, orig_rate // common
    if up == down:
        return np.array(waveform, dtype=np.float32)
    out_len = round(Fraction(len(waveform) * up, down))
    cutoff = SINC_ROLLOFF * min(1.0, up / down)  # as a fraction of the input's Nyquist frequency
    half = math.ceil(SINC_ZERO_CROSSINGS / cutoff)
    rows = -(-out_len // up)  # output sample k = row * up + phase index r
    rows_per_block = max(1, min(MAX_ROWS_PER_BLOCK, WINDOW_ELEMENTS // (2 * half)))
    signal = torch.from_numpy(np.pad(np.asarray(waveform, dtype=np.float32), (half, half + 2 * down + 1)))
    out = np.empty(rows * up, dtype=np.float32)
    for first_phase in range(0, up, PHASES_PER_BLOCK):
        indices = np.arange(first_phase, min(first_phase + PHASES_PER_BLOCK, up))  # output phase indices r
        table = phase_taps((indices * down) % up, up, half, cutoff)
        for first in range(0, rows, rows_per_block):
            count = min(rows_per_block, rows - first)
            for r, taps in zip(indices.tolist(), table):
                # outputs r, r + up, ... start at input r * down // up and advance by `down`
                start = first * down + r * down // up + 1  # first tap of the first row (signal padded by `half`)
                windows = signal[start:start + (count - 1) * down + 2 * half].unfold(0, 2 * half, down)
                out[first * up + r:(first + count) * up:up] = (windows @ taps).numpy()
    return out[:out_len]


def phase_taps(phases: np.ndarray, up: int, half: int, cutoff: float) -> torch.Tensor:
    """Filter taps for the given fractional phases (of `up`): (len(phases), 2 * half) float32, rows summing to 1."""
    offsets = np.arange(-half + 1, half + 1, dtype=np.float64)[None, :]
    distance = offsets - (phases.astype(np.float64) / up)[:, None]  # tap time minus output time
    ratio = np.clip(distance / half, -1.0, 1.0)
    window = np.i0(KAISER_BETA * np.sqrt(1.0 - ratio**2)) / np.i0(KAISER_BETA)
    table = cutoff * np.sinc(cutoff * distance) * window
    table /= table.sum(axis=1, keepdims=True)  # exact unit gain at DC for every phase
    return torch.from_numpy(table.astype(np.float32))
