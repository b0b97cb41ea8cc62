"""Code2Wav for every stream with a chunk of frames ready, in as few calls as their states allow: exact per stream.

Each stream keeps its own Code2WavStream (its transformer's sliding keys and values, its convolutions' context, its
frame count), so its samples are those of decoding all its frames at once. Streams that have started (their carried
state has its steady shapes) and feed the same number of frames go through ONE call (models/code2wav.feed_rows);
a stream's first chunk goes alone (its convolutions start from zeros and trim their left edge).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ..models.code2wav import Code2Wav, feed_rows
from .stream import SpeechSide


@torch.inference_mode()
def vocode_batch(code2wav: Code2Wav, speeches: list[SpeechSide]) -> list[np.ndarray]:
    """Every speech's pending frames -> its new samples (float32), the pending frames consumed, in `speeches`'
    order."""
    waves: list[np.ndarray | None] = [None] * len(speeches)
    together: dict[int, list[int]] = defaultdict(list)  # frames fed -> started speeches feeding that many
    for index, speech in enumerate(speeches):
        if speech.vocoder.started:
            together[len(speech.pending)].append(index)
        else:
            waves[index] = _host(speech.vocoder.feed(_take(speech))[0])
    for group in together.values():
        codes = torch.cat([_take(speeches[i]) for i in group])  # (rows, groups, frames)
        out = feed_rows(code2wav, [speeches[i].vocoder for i in group], codes)
        for row, index in enumerate(group):
            waves[index] = _host(out[row])
    return waves


def _take(speech: SpeechSide) -> torch.Tensor:
    codes = torch.stack(speech.pending, dim=-1)  # (1, groups, frames)
    speech.pending.clear()
    return codes


def _host(samples: torch.Tensor) -> np.ndarray:
    return samples.float().cpu().numpy()
