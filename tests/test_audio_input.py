"""Audio input: decoding (soundfile and PyAV formats, bytes, data URLs, arrays), resampling, log-mel parity."""

from __future__ import annotations

import base64
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from thinktalk.processing.audio import (
    AudioFeatureConfig,
    AudioInputError,
    load_audio,
    log_mel_features,
    resample,
)

RATE = AudioFeatureConfig().sampling_rate


def tone(n: int, rate: int, hz: float = 440.0, amplitude: float = 0.5, seed: int = 0) -> np.ndarray:
    """A tone plus a weaker second tone and a little noise, so every mel bin carries energy."""
    t = np.arange(n) / rate
    noise = np.random.default_rng(seed).standard_normal(n)
    wave = amplitude * np.sin(2 * np.pi * hz * t) + 0.1 * np.sin(2 * np.pi * 3150.0 * t) + 0.02 * noise
    return wave.astype(np.float32)


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


# ---------------------------------------------------------------------------------------------- log-mel parity


@pytest.fixture(scope="module")
def reference_extractor():
    """The feature extractor as the Qwen3-Omni processor uses it: Whisper's with 128 mel bins, called with the
    processor's audio kwargs (padding=True, i.e. longest, so one clip is not padded; truncation=False)."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                        padding_value=0.0, return_attention_mask=True)

    def extract(wave: np.ndarray) -> tuple[np.ndarray, int]:
        out = extractor(wave, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
                        return_tensors="np")
        return out["input_features"][0], int(out["attention_mask"].sum())

    return extract


@pytest.mark.parametrize("n", [16000, 59200, 496000, 24001], ids=["1s", "3.7s", "31s", "odd"])
def test_log_mel_matches_reference(reference_extractor, n):
    wave = tone(n, RATE, seed=n)
    reference, valid = reference_extractor(wave)
    ours = log_mel_features(wave)
    assert ours.dtype == torch.float32
    assert ours.shape == (128, valid) == (128, n // 160)
    assert np.abs(ours.numpy() - reference[:, :valid]).max() < 1e-5


def test_log_mel_chunked_stft_equals_one_shot_and_accepts_tensors():
    wave = tone(20000, RATE)
    whole = log_mel_features(wave, frames_per_chunk=10_000)
    assert torch.allclose(log_mel_features(torch.from_numpy(wave), frames_per_chunk=7), whole, rtol=0, atol=1e-6)


def test_log_mel_rejects_too_short_and_multichannel():
    with pytest.raises(AudioInputError, match="200 samples"):
        log_mel_features(np.zeros(200, np.float32))
    with pytest.raises(AudioInputError, match="shape"):
        log_mel_features(np.zeros((2, 1000), np.float32))


def test_feature_config_from_dir(tmp_path):
    assert AudioFeatureConfig.from_dir(tmp_path) == AudioFeatureConfig()
    fields = {"feature_size": 80, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "padding_value": 0.0,
              "chunk_length": 300, "feature_extractor_type": "WhisperFeatureExtractor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(fields))
    assert AudioFeatureConfig.from_dir(tmp_path).feature_size == 80
    assert log_mel_features(tone(1600, RATE), AudioFeatureConfig.from_dir(tmp_path)).shape == (80, 10)


# ---------------------------------------------------------------------------------------------------- resampling


def test_resampling_16k_input_is_identity():
    wave = tone(12345, RATE)
    out = load_audio((wave, RATE))
    assert out.dtype == np.float32 and np.array_equal(out, wave)


@pytest.mark.parametrize("rate, hz", [(44100, 1000.0), (8000, 440.0), (22050, 3000.0)])
def test_resampling_preserves_frequency_and_amplitude(rate, hz):
    n = rate * 2 + 7
    wave = (0.5 * np.sin(2 * np.pi * hz * np.arange(n) / rate)).astype(np.float32)
    out = load_audio((wave, rate))
    assert len(out) == round(Fraction(n * RATE, rate)) == round(n * RATE / rate)
    assert abs(peak_hz(out, RATE) - hz) < 1.0
    middle = out[len(out) // 4: 3 * len(out) // 4]
    assert abs(np.sqrt(2 * np.mean(middle.astype(np.float64) ** 2)) - 0.5) < 0.005


def test_downsampling_removes_frequencies_above_the_new_nyquist():
    rate = 44100
    alias = (0.5 * np.sin(2 * np.pi * 12000.0 * np.arange(rate) / rate)).astype(np.float32)
    out = resample(alias, rate, RATE)
    assert np.abs(out[200:-200]).max() < 0.005  # 12 kHz would alias to 4 kHz without the low-pass


# ------------------------------------------------------------------------------------------------------ decoding


def write_soundfile(path: Path, wave: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    import soundfile as sf

    sf.write(str(path), wave, rate, subtype=subtype)
    return path


@pytest.mark.parametrize("name, subtype, tolerance", [("a.wav", "PCM_16", 1e-4), ("b.wav", "FLOAT", 0.0),
                                                      ("c.flac", "PCM_24", 1e-6), ("d.ogg", "VORBIS", None)])
def test_decodes_soundfile_formats(tmp_path, name, subtype, tolerance):
    wave = tone(RATE, RATE)
    out = load_audio(write_soundfile(tmp_path / name, wave, RATE, subtype))
    assert out.dtype == np.float32 and out.ndim == 1
    if tolerance is None:  # lossy: same length, same pitch
        assert len(out) == len(wave) and abs(peak_hz(out, RATE) - 440.0) < 1.0
    else:
        assert np.abs(out - wave).max() <= tolerance


def test_decodes_path_bytes_and_data_url_alike_and_resamples(tmp_path):
    path = write_soundfile(tmp_path / "x.wav", tone(44100, 44100), 44100, "FLOAT")
    data = path.read_bytes()
    url = "data:audio/wav;base64," + base64.b64encode(data).decode()
    from_path = load_audio(path)
    assert len(from_path) == RATE and abs(peak_hz(from_path, RATE) - 440.0) < 1.0
    assert np.array_equal(load_audio(str(path)), from_path)
    assert np.array_equal(load_audio(data), from_path)
    assert np.array_equal(load_audio(url), from_path)


def encoder_samples(wave: np.ndarray, sample_format: str) -> np.ndarray:
    """Float samples in the encoder's sample format (mono, so packed and planar layouts coincide)."""
    kind = sample_format.rstrip("p")
    if kind in ("flt", "dbl"):
        return wave.astype(np.float32 if kind == "flt" else np.float64)
    bits = {"s16": 16, "s32": 32}[kind]
    return np.round(wave.astype(np.float64) * (2 ** (bits - 1) - 1)).astype(np.int16 if bits == 16 else np.int32)


def write_with_pyav(path: Path, codec: str, wave: np.ndarray, rate: int, video: bool = False) -> Path:
    av = pytest.importorskip("av")
    try:
        av.codec.Codec(codec, "w")
    except av.codec.codec.UnknownCodecError:
        pytest.skip(f"PyAV has no {codec} encoder")
    with av.open(str(path), mode="w") as container:
        picture = container.add_stream("mpeg4", rate=10) if video else None
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frames = []
        if picture is not None:  # a one-second 32x32 clip next to the audio track
            picture.width, picture.height, picture.pix_fmt = 32, 32, "yuv420p"
            for index in range(10):
                image = av.VideoFrame.from_ndarray(np.full((32, 32, 3), index * 20, np.uint8), format="rgb24")
                image.pts, image.time_base = index, Fraction(1, 10)
                frames.append((picture, image))
            frames.append((picture, None))
        size = stream.codec_context.frame_size or 1024
        sample_format = stream.codec_context.format.name
        planar = encoder_samples(wave, sample_format)[None, :]
        for start in range(0, len(wave), size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start:start + size]),
                                               format=sample_format, layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            frames.append((stream, frame))
        frames.append((stream, None))
        for target, frame in frames:
            container.mux(target.encode(frame))
    return path


@pytest.mark.parametrize("name, codec, video", [("a.mp3", "mp3", False), ("b.m4a", "aac", False),
                                                ("c.mp4", "aac", True)], ids=["mp3", "m4a", "video-mp4"])
def test_decodes_pyav_formats(tmp_path, name, codec, video):
    wave = tone(44100, 44100)
    out = load_audio(write_with_pyav(tmp_path / name, codec, wave, 44100, video))
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - RATE) < 0.1 * RATE  # encoder delay and padding add a few frames
    assert abs(peak_hz(out, RATE) - 440.0) < 2.0


def test_stereo_mixes_to_mono(tmp_path):
    left, right = tone(4000, RATE), tone(4000, RATE, hz=1000.0, seed=1)
    mean = (left + right) / 2
    assert np.allclose(load_audio((np.stack([left, right], axis=1), RATE)), mean, atol=1e-7)  # channels-last
    assert np.allclose(load_audio((torch.from_numpy(np.stack([left, right])), RATE)), mean, atol=1e-7)
    path = write_soundfile(tmp_path / "s.wav", np.stack([left, right], axis=1), RATE, "FLOAT")
    assert np.allclose(load_audio(path), mean, atol=1e-7)


def test_integer_arrays_are_scaled():
    pcm = (tone(1000, RATE) * 32767).astype(np.int16)
    assert np.allclose(load_audio((pcm, RATE)), pcm / 32768.0, atol=1e-7)


# -------------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_input(tmp_path):
    missing = tmp_path / "nope.wav"
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    broken_wav = tmp_path / "broken.wav"
    broken_wav.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not audio\n" * 20)
    cases = [
        (missing, str(missing), "no such file"),
        (str(missing), str(missing), "no such file"),
        (tmp_path, str(tmp_path), "not a regular file"),
        (empty, str(empty), "empty"),
        (garbage, str(garbage), "cannot decode"),
        (broken_wav, str(broken_wav), "soundfile"),
        (text, str(text), "no audio stream"),  # FFmpeg opens plain text as a (tty) container without audio
        (b"", "0 bytes", "no data"),
        (b"not audio at all" * 10, "160 bytes", "cannot decode"),
        ("data:audio/wav;base64", "data:audio/wav;base64", "malformed"),
        ("data:audio/wav;base64,@@@not-base64@@@", "data:audio/wav;base64,@@@", "base64"),
        ("data:audio/wav;base64,AAAA", "data:audio/wav;base64,AAAA", "cannot decode"),
        ((np.zeros(0, np.float32), RATE), "shape (0,)", "0 sample"),
        ((np.zeros(1, np.float32), RATE), "shape (1,)", "1 sample"),
        ((np.array([0.0, np.nan, 0.1], np.float32), RATE), "shape (3,)", "NaN or infinite"),
        ((np.array([0.0, np.inf, 0.1]), RATE), "shape (3,)", "NaN or infinite"),
        ((np.zeros((2, 2)), RATE), "shape (2, 2)", "ambiguous"),
        ((np.zeros((2, 3, 4)), RATE), "shape (2, 3, 4)", "3-D"),
        ((np.zeros(100), 0), "at 0 Hz", "sample rate"),
        ((np.array(["a", "b"]), RATE), "shape (2,)", "sample type"),
        (12345, "type int", "unsupported audio source"),
    ]
    for source, named, problem in cases:
        with pytest.raises(AudioInputError) as caught:
            load_audio(source)
        message = str(caught.value)
        assert isinstance(caught.value, ValueError)
        assert named in message and problem in message, (source, message)
