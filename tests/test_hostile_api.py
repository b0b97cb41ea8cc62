"""The hostile corpus (tests/hostile_media.py) through the Python API: every case is a typed InputError naming the
input and the part it sits in, never a raw library exception, and every limit is checked before the work it
guards (the resampler, the decoder, the cache) starts."""

import base64

import numpy as np
import pytest
import torch
from hostile_media import AUDIO, IMAGES, LONE_SURROGATE, VIDEOS, video_bytes, wav_with_header
from PIL import Image

from thinktalk import Omni
from thinktalk.errors import InputError, MediaError
from thinktalk.processing import audio as audio_module
from thinktalk.processing.audio import AudioInputError, AudioTooLong, load_audio
from thinktalk.processing.multimodal import MediaOptions, audio_seconds_limit
from thinktalk.processing.vision import VisionInputError

TYPED_OK = {"wav_truncated"}  # a header and a few samples: short, but decodable


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


@pytest.fixture
def no_resampling(monkeypatch):
    """Fails any test that lets audio reach the resampler (what a limit must prevent)."""
    def refuse(*args):
        raise AssertionError("the audio was resampled before its limits were checked")
    monkeypatch.setattr(audio_module, "resample", refuse)


def user(*parts):
    return [{"role": "user", "content": [{"type": "text", "text": "look:"}, *parts]}]


def prepared_error(omni, messages, error_type=InputError, **options) -> InputError:
    with pytest.raises(error_type) as caught:
        omni.prepare(messages, **options)
    return caught.value


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hostile_image_is_a_typed_error(omni, name):
    error = prepared_error(omni, user({"type": "image", "image": IMAGES[name]()}), VisionInputError)
    assert error.location == (0, 1) and "bytes>" in str(error)


@pytest.mark.parametrize("name", sorted(set(AUDIO) - TYPED_OK))
def test_hostile_audio_is_a_typed_error(omni, name, no_resampling):
    error = prepared_error(omni, user({"type": "audio", "audio": AUDIO[name]()}), AudioInputError)
    assert error.location == (0, 1) and "audio bytes" in str(error)


@pytest.mark.parametrize("rate", [1, 500, 2**31 - 1])
def test_absurd_sample_rates_are_refused_from_the_header(rate, no_resampling):
    with pytest.raises(AudioInputError, match=f"sample rate of {rate} Hz is outside"):
        load_audio(wav_with_header(rate))


@pytest.mark.parametrize("source, match", [
    ((np.zeros(100, np.float32), 16000, "extra"), "must be \\(array, sample_rate\\)"),
    ((np.zeros(100, np.float32), "16000"), "must be an integer"),
    ((np.zeros(100, np.float32), 16000.5), "must be an integer"),
    ((np.zeros(100, np.float32), 10**12), "outside the accepted range"),
    ((np.zeros((2, 2, 2), np.float32), 16000), "1-D or 2-D"),
    ((np.zeros(100, np.complex64), 16000), "unsupported sample type"),
    (([[0.0, 1.0], [0.0]], 16000), "not an array of samples"),
    ((np.zeros(100, bool), 16000), "unsupported sample type"),
])
def test_bad_audio_arrays_are_typed_errors(omni, source, match, no_resampling):
    error = prepared_error(omni, user({"type": "audio", "audio": source}), AudioInputError)
    assert error.location == (0, 1)
    with pytest.raises(AudioInputError, match=match):
        load_audio(source)


def test_a_bfloat16_tensor_is_audio():
    wave = load_audio((torch.zeros(1600, dtype=torch.bfloat16), 16000))
    assert wave.dtype == np.float32 and wave.size == 1600


def test_audio_is_refused_from_its_header_before_decoding(monkeypatch):
    import soundfile

    def refuse(*args, **kwargs):
        raise AssertionError("the samples were decoded before the length was checked")
    monkeypatch.setattr(soundfile.SoundFile, "read", refuse)
    with pytest.raises(AudioTooLong, match="4.0 s of audio \\(as its header declares\\) is over the limit of 3 s"):
        load_audio(wav_with_header(16000, seconds_of_data=4.0), max_seconds=3.0)


def test_the_api_bounds_audio_by_the_context(omni, monkeypatch, no_resampling):
    """Without a configured limit, audio is bounded by what the context holds; a configured limit is checked from
    the header."""
    cfg = omni.cfg.thinker
    limit = audio_seconds_limit(MediaOptions(omni.media.audio, omni.media.vision), cfg)
    assert limit == pytest.approx(cfg.text.max_position_embeddings / 13)  # 13 tokens per second of audio
    long = wav_with_header(16000, seconds_of_data=2.0)
    monkeypatch.setattr(omni, "media", MediaOptions(omni.media.audio, omni.media.vision, max_audio_seconds=1.0))
    error = prepared_error(omni, user({"type": "audio", "audio": long}), AudioTooLong)
    assert error.location == (0, 1)


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_hostile_video_is_a_typed_error(omni, name, tmp_path):
    error = prepared_error(omni, user({"type": "video", "video": VIDEOS[name](tmp_path)}), VisionInputError)
    assert error.location == (0, 1)


def test_video_bytes_and_data_urls_are_videos(omni, tmp_path):
    data = video_bytes(tmp_path, seconds=1.0)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    by_path = omni.prepare(user({"type": "video", "video": str(path)}), use_audio_in_video=True)
    by_bytes = omni.prepare(user({"type": "video", "video": data}), use_audio_in_video=True)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    by_url = omni.prepare(user({"type": "video", "video": url}), use_audio_in_video=True)
    assert by_path.token_ids == by_bytes.token_ids == by_url.token_ids
    assert torch.equal(by_path.videos[0].patches, by_bytes.videos[0].patches)


def test_a_video_over_its_limit_is_refused_before_decoding(omni, tmp_path, monkeypatch):
    monkeypatch.setattr(omni, "media", MediaOptions(omni.media.audio, omni.media.vision, max_video_seconds=0.5))
    error = prepared_error(omni, user({"type": "video", "video": video_bytes(tmp_path)}), VisionInputError)
    assert "1.0 s of video is over the limit of 0.5 s" in str(error)


def test_an_la_image_is_a_typed_error(omni):
    error = prepared_error(omni, user({"type": "image", "image": Image.new("La", (64, 64))}), VisionInputError)
    assert "La" in str(error)


@pytest.mark.parametrize("url", ["file:///tmp/a\0b.png", "file:///" + "x" * 5000 + ".png"])
def test_bad_paths_are_typed_errors(omni, url):
    for kind in ("image", "audio", "video"):
        error = prepared_error(omni, user({"type": kind, kind: url}), MediaError)
        assert error.location == (0, 1)


def test_a_url_urllib_cannot_parse_is_a_typed_error(tiny):
    remote = Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False,
                                  allow_remote_media=True)
    error = prepared_error(remote, user({"type": "image", "image": "http://[::1/a.png"}))
    assert error.location == (0, 1) and "could not fetch" in str(error)


def test_lone_surrogates_are_typed_errors(omni):
    error = prepared_error(omni, user({"type": "text", "text": LONE_SURROGATE}))
    assert error.location == (0, 1)
