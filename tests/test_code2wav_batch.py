"""Batched Code2Wav (models/code2wav.feed_rows): several streams at different points of their speech, decoded in one
call, each get exactly the samples of their own one-shot decode (within float rounding: <= 1e-5)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import tiny_config_dict

from thinktalk.models.code2wav import Code2WavStream, feed_rows
from thinktalk.random_weights import random_model


@pytest.fixture(scope="module")
def code2wav():
    return random_model(tiny_config_dict(), "cpu", torch.float32, seed=4).code2wav


@pytest.mark.parametrize("streams", [1, 2, 5, 8])
def test_batched_streams_equal_their_solo_decodes(code2wav, streams):
    cfg = code2wav.cfg
    gen = torch.Generator().manual_seed(streams)
    lengths = [int(n) for n in torch.randint(4, 2 * cfg.sliding_window, (streams,), generator=gen)]
    codes = [torch.randint(0, cfg.codebook_size, (1, cfg.num_quantizers, n), generator=gen) for n in lengths]
    with torch.no_grad():
        solo = [code2wav.decode(c)[0] for c in codes]
    states = [Code2WavStream(code2wav) for _ in codes]
    pieces = [[s.feed(c[..., :1])[0]] for s, c in zip(states, codes)]  # a first chunk goes alone
    done, calls = [1] * streams, 0
    while any(d < n for d, n in zip(done, lengths)):
        frames = 1 + calls % 3  # chunks of 1, 2, 3 frames
        group = [i for i in range(streams) if done[i] + frames <= lengths[i]] or \
            [i for i in range(streams) if done[i] < lengths[i]][:1]
        frames = min(frames, lengths[group[0]] - done[group[0]])
        out = feed_rows(code2wav, [states[i] for i in group],
                        torch.cat([codes[i][..., done[i]:done[i] + frames] for i in group]))
        for row, i in enumerate(group):
            pieces[i].append(out[row])
            done[i] += frames
        calls += 1
    assert calls < sum(lengths), "no call served several streams"
    for got, want in zip(pieces, solo):
        torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=0)
    assert max(w.abs().max().item() for w in solo) > 0.05, "near-silent audio would prove little"
