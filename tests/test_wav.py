"""The incremental WAV writer: a valid, playable file under the requested name after every chunk; gone on abort."""

import numpy as np
import pytest
import soundfile

from thinktalk.processing.wav import PCM16_MAX, WavWriter

RATE = 24000
CHUNK = 1920  # one codec frame of samples at 24 kHz


def chunk(i: int) -> np.ndarray:
    return (0.3 * np.sin(np.arange(CHUNK) * (i + 1) / 50)).astype(np.float32)


def test_file_is_a_valid_wav_of_what_was_written_after_every_chunk(tmp_path):
    out = tmp_path / "reply.wav"
    writer = WavWriter(out, RATE)
    assert soundfile.info(out).frames == 0  # valid (and empty) before any audio
    written = []
    for i in range(4):
        writer.write(chunk(i))
        written.append(chunk(i))
        samples, rate = soundfile.read(out, dtype="float32")  # read by another handle while still open
        expected = np.concatenate(written)
        assert rate == RATE and samples.size == expected.size
        assert np.abs(samples - expected).max() <= 1 / PCM16_MAX
    assert writer.commit() == out
    assert soundfile.info(out).frames == 4 * CHUNK
    assert [p.name for p in tmp_path.iterdir()] == ["reply.wav"]  # no hidden partial beside it


def test_abort_leaves_nothing_under_the_requested_name(tmp_path):
    out = tmp_path / "reply.wav"
    out.write_bytes(b"an earlier reply")
    writer = WavWriter(out, RATE)
    writer.write(chunk(0))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_leaving_the_block_by_an_exception_aborts(tmp_path):
    out = tmp_path / "reply.wav"
    with pytest.raises(KeyboardInterrupt), WavWriter(out, RATE) as writer:
        writer.write(chunk(0))
        raise KeyboardInterrupt
    assert not out.exists()
    with WavWriter(out, RATE) as writer:
        writer.write(chunk(1))
    assert soundfile.info(out).frames == CHUNK
