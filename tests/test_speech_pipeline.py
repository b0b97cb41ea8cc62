"""Text and speech out, streamed, against the reference's generate(return_audio=True) (which does not stream)."""

import gc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from media import noise_image, tone, write_video
from test_multimodal_parity import reference_inputs

from thinktalk import Omni
from thinktalk.events import AudioChunk, TextDelta
from thinktalk.engine.talker_session import TalkerSession
from thinktalk.omni import Done

THINKER_TOKENS, TALKER_TOKENS = 20, 34  # 33 frames: the talker yields one frame fewer than its tokens
GREEDY = dict(max_new_tokens=THINKER_TOKENS, do_sample=False, stop_token_ids=[-1], talker_do_sample=False,
              talker_max_new_tokens=TALKER_TOKENS)


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny):
    """The reference model with its known talker defect worked around (REFERENCE.md): the talker's rope index reads
    `audio_config.n_window`, which the talker config lacks; give that one config instance the value."""
    tiny.reference.talker.config.audio_config = SimpleNamespace(n_window=50)
    return tiny.reference


def reference_speech(reference, prompt, voice: str):
    inputs = reference_inputs(prompt)
    use_audio_in_video = inputs.pop("use_audio_in_video")
    with torch.no_grad():
        sequences, wav = reference.generate(
            **inputs, speaker=voice, use_audio_in_video=use_audio_in_video, thinker_max_new_tokens=THINKER_TOKENS,
            thinker_min_new_tokens=THINKER_TOKENS, thinker_do_sample=False, talker_do_sample=False,
            talker_max_new_tokens=TALKER_TOKENS,
            # Reference defect: use_audio_in_video is not forwarded to the talker's positions; forward it.
            talker_use_audio_in_video=use_audio_in_video)
    return sequences[0, len(prompt.token_ids):].tolist(), wav.reshape(-1).numpy()


def conversation(kind: str, clip) -> tuple[list, bool]:
    parts = {
        "text": [],
        "image": [{"type": "image", "image": noise_image(64, 64, seed=1)}],
        "audio": [{"type": "audio", "audio": (tone(1.3), 16000)}],
        "video with its audio": [{"type": "video", "video": str(clip)}],
    }[kind]
    return [{"role": "user", "content": parts + [{"type": "text", "text": "Say something nice."}]}], \
        kind == "video with its audio"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("speech_media") / "clip.mp4", seconds=2.0, fps=4)


@pytest.mark.parametrize("kind, voice", [("text", "ethan"), ("text", "Chelsie"), ("text", "AIDEN"),
                                         ("image", "ethan"), ("audio", "ethan"), ("video with its audio", "ethan")])
def test_speech_matches_reference(kind, voice, omni, reference, clip):
    messages, use_audio_in_video = conversation(kind, clip)
    prompt = omni.prepare(messages, use_audio_in_video)
    expected_tokens, expected_wave = reference_speech(reference, prompt, voice.lower())
    result = omni.generate(messages, use_audio_in_video=use_audio_in_video, voice=voice, **GREEDY)
    assert result.token_ids == expected_tokens
    assert result.codes.shape[1] >= 32
    # The codes themselves: the reference's own vocoder turns ours into its waveform.
    with torch.no_grad():
        theirs_from_ours = reference.code2wav.chunked_decode(result.codes.unsqueeze(0), 300, 25).reshape(-1)
    np.testing.assert_allclose(theirs_from_ours.numpy(), expected_wave, atol=1e-5, rtol=0)
    assert result.audio.dtype == np.float32 and result.sample_rate == 24000
    np.testing.assert_allclose(result.audio, expected_wave, atol=1e-4, rtol=0)
    assert np.abs(expected_wave).max() > 0.05, "near-silent audio would prove little"


def test_voices_change_the_speech(omni):
    messages, _ = conversation("text", None)
    waves = {v: omni.generate(messages, voice=v, **GREEDY).codes for v in omni.voices}
    assert len(waves) == 3 and not torch.equal(waves["ethan"], waves["chelsie"])


def test_stream_sends_audio_before_the_text_ends_and_adds_up(omni):
    messages, _ = conversation("text", None)
    events = list(omni.stream(messages, return_audio=True, talker={"do_sample": False, "max_new_tokens": 12},
                              max_new_tokens=40, do_sample=False, stop_token_ids=[-1], audio_chunk_frames=2))
    kinds = [type(e) for e in events]
    assert kinds[-1] is Done and AudioChunk in kinds and TextDelta in kinds
    last_text = max(i for i, k in enumerate(kinds) if k is TextDelta)
    assert kinds.index(AudioChunk) < last_text, "speech must start while the thinker is still writing"
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.offset for c in chunks] == list(np.cumsum([0] + [c.audio.size for c in chunks[:-1]]))
    result = events[-1].result
    np.testing.assert_array_equal(np.concatenate([c.audio for c in chunks]), result.audio)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == result.text


def test_streamed_audio_equals_one_shot_for_any_chunk_size(omni):
    messages, _ = conversation("text", None)
    whole = omni.generate(messages, audio_chunk_frames=1, **GREEDY).audio
    for frames in (3, 7, 100):
        np.testing.assert_allclose(omni.generate(messages, audio_chunk_frames=frames, **GREEDY).audio, whole,
                                   atol=1e-5, rtol=0)


def live_sessions() -> int:
    gc.collect()
    return sum(isinstance(o, TalkerSession) for o in gc.get_objects())


def test_stopping_early_leaves_nothing_running(omni):
    messages, _ = conversation("text", None)
    before = live_sessions()
    stream = omni.stream(messages, return_audio=True, talker={"do_sample": False}, max_new_tokens=40)
    for event in stream:
        if isinstance(event, AudioChunk):
            break
    assert live_sessions() == before + 1
    stream.close()
    del stream, event
    assert live_sessions() == before


def test_speech_misuse_is_a_clear_error(omni, tiny, tiny_thinker_only):
    messages, _ = conversation("text", None)
    with pytest.raises(ValueError, match="unknown voice 'nobody'.*chelsie"):
        omni.generate(messages, voice="nobody", max_new_tokens=2)
    thinker_only = Omni.from_pretrained(tiny_thinker_only.path, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="no talker"):
        thinker_only.generate(messages, return_audio=True, max_new_tokens=2)
    assert thinker_only.generate(messages, max_new_tokens=2).audio is None  # text only by default
    text_only = Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)
    assert text_only.model.talker is None and text_only.model.code2wav is None
    with pytest.raises(ValueError, match="audio_output=False"):
        text_only.generate(messages, return_audio=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="audio_chunk_frames"):
        omni.generate(messages, audio_chunk_frames=0, max_new_tokens=2)


def test_stream_takes_talker_keywords_like_generate(omni):
    messages, _ = conversation("text", None)
    thinker = dict(max_new_tokens=THINKER_TOKENS, do_sample=False, stop_token_ids=[-1])
    by_keywords = list(omni.stream(messages, talker_do_sample=False, talker_max_new_tokens=6, **thinker))[-1]
    by_dict = list(omni.stream(messages, talker={"do_sample": False, "max_new_tokens": 6}, **thinker))[-1]
    assert torch.equal(by_keywords.result.codes, by_dict.result.codes)
    assert by_keywords.result.codes.shape[1] <= 5
    with pytest.raises(ValueError, match="unknown talker sampling option"):
        omni.stream(messages, talker={"topk": 3})
