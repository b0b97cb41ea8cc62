"""Qwen2.5-Omni through the public `Omni` object, the CLI and the server, on the tiny random checkpoint of
checkpoints_qwen2_5 (saved by the reference with save_pretrained, plus Qwen2.5-Omni tokenizer files):
greedy text equal to the reference's, a spoken reply whose codec tokens equal the reference talker's and whose
streamed wave equals (or, past Token2Wav's first window, stays within a measured bound of) the one-shot decode from
the same noise, the event order, and the typed errors of bad inputs and of what does not apply to this family yet."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from checkpoints_qwen2_5 import tiny_checkpoint

from thinktalk.config_qwen2_5 import SPEECH_SYSTEM_PROMPT
from thinktalk.config_reader import ConfigError
from thinktalk.errors import RequestError
from thinktalk.events import AudioChunk, Done, TextDelta
from thinktalk.models.qwen2_5.token2wav import BlockNoise
from thinktalk.omni import Omni
from thinktalk.processing.qwen2_5_tokenizer import build_qwen2_5_tokenizer_files
from thinktalk.qwen2_5_omni import Qwen25Omni
from thinktalk.requests import GenerationRequest, SamplingParams, SpeechParams

SEED = 7
MESSAGES = [{"role": "system", "content": SPEECH_SYSTEM_PROMPT},
            {"role": "user", "content": "Tell me a long story about the sea, please."}]
STREAM_WINDOW_TOKENS = 48  # Token2Wav's first window at the tiny sizes: 3 + 1 blocks of 24 mel frames, 2 per code
STREAMED_BOUND = 1e-3  # streamed vs one-shot wave past the first window (measured about 1e-4 on this model)


@pytest.fixture(scope="module")
def ckpt():
    checkpoint = tiny_checkpoint()
    build_qwen2_5_tokenizer_files(checkpoint.path)
    return checkpoint


@pytest.fixture(scope="module")
def omni(ckpt):
    return Omni.from_pretrained(ckpt.path, device="cpu", dtype="float32")


def spoken(tokens: int, seconds: float) -> GenerationRequest:
    return GenerationRequest(MESSAGES, SamplingParams(max_new_tokens=tokens, do_sample=False, seed=SEED),
                             SpeechParams(do_sample=False, repetition_penalty=1.0, max_seconds=seconds))


def reference_generate(reference, ids: list[int], tokens: int, talker_codes: int | None, monkeypatch):
    """The reference's greedy generate -> (reply tokens, talker codes or None); Token2Wav is not run (its parity
    with the same noise is tests/test_qwen2_5_speech_parity.py's)."""
    record = {}
    if talker_codes is not None:
        talker_generate = reference.talker.generate

        def recording(*args, **kwargs):
            out = talker_generate(*args, **kwargs)
            record["codes"] = out[0, kwargs["input_ids"].shape[1]:].tolist()
            raise StopIteration  # the codes are all this test needs

        monkeypatch.setattr(reference.talker, "generate", recording)
    tensor = torch.tensor([ids])
    options = dict(input_ids=tensor, attention_mask=torch.ones_like(tensor), thinker_do_sample=False,
                   thinker_max_new_tokens=tokens)
    with torch.no_grad():
        if talker_codes is None:
            out = reference.generate(**options, generation_mode="text")
            return out[0, len(ids):].tolist(), None
        with pytest.raises(StopIteration):
            reference.generate(**options, speaker="Chelsie", talker_do_sample=False, talker_max_new_tokens=talker_codes,
                               talker_repetition_penalty=1.0, thinker_return_dict_in_generate=True,
                               thinker_output_hidden_states=True)
    return None, record["codes"]


def test_the_family_comes_from_config_json(omni):
    assert isinstance(omni, Qwen25Omni) and omni.voices == ["chelsie", "ethan"] and omni.default_voice == "chelsie"
    assert omni.sample_rate == 24000


def test_greedy_text_equals_the_reference(omni, ckpt, monkeypatch):
    ids = omni.prepare(MESSAGES).token_ids
    assert ids[:3] == [151644, 8948, 198] and ids[-3:] == [151644, 77091, 198]  # ChatML: system ... assistant
    expected, _ = reference_generate(ckpt.reference, ids, 32, None, monkeypatch)
    result = omni.generate(MESSAGES, return_audio=False, max_new_tokens=32, do_sample=False)
    assert result.token_ids == expected and len(set(expected)) > 8
    assert result.audio is None and result.usage.prompt_tokens == len(ids)


def reference_media_kwargs(prompt) -> dict:
    """The reference thinker's inputs for a PreparedPrompt: the same features, patches and grids."""
    ids = torch.tensor([prompt.token_ids])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_audio_in_video=prompt.use_audio_in_video)
    if prompt.audios:
        longest = max(a.features.shape[1] for a in prompt.audios)
        kwargs["input_features"] = torch.stack([torch.nn.functional.pad(a.features, (0, longest - a.features.shape[1]))
                                                for a in prompt.audios])
        kwargs["feature_attention_mask"] = torch.stack([torch.arange(longest) < a.features.shape[1]
                                                        for a in prompt.audios]).long()
    if prompt.images:
        kwargs["pixel_values"] = torch.cat([i.patches for i in prompt.images])
        kwargs["image_grid_thw"] = torch.tensor([i.grid_thw for i in prompt.images])
    if prompt.videos:
        kwargs["pixel_values_videos"] = torch.cat([v.patches for v in prompt.videos])
        kwargs["video_grid_thw"] = torch.tensor([v.grid_thw for v in prompt.videos])
        kwargs["video_second_per_grid"] = torch.tensor([v.seconds_per_grid for v in prompt.videos])
    return kwargs


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_a_prompt_with_media_gives_the_references_greedy_tokens(omni, ckpt, tmp_path, use_audio_in_video):
    """An image, an audio clip and a video (with its sound track when use_audio_in_video) through the family's
    prompt builder and the engine's encoders: the reference thinker, given the same features, picks the same
    16 greedy tokens."""
    from media import noise_image, tone, write_video

    write_video(tmp_path / "clip.mp4", seconds=2.0, fps=4, size=(56, 56))
    messages = [{"role": "user", "content": [
        {"type": "image", "image": noise_image(84, 56)}, {"type": "audio", "audio": (tone(1.5), 16000)},
        {"type": "video", "video": str(tmp_path / "clip.mp4")}, {"type": "text", "text": "What is this?"}]}]
    prompt = omni.prepare(messages, use_audio_in_video)
    layout = omni.cfg.thinker.layout
    assert prompt.images[0].grid_thw == (1, 4, 6) and prompt.token_ids.count(layout.image_token_id) == 6
    assert len(prompt.audios) == (2 if use_audio_in_video else 1)
    assert prompt.token_ids.count(layout.audio_token_id) == sum(a.token_count for a in prompt.audios)
    with torch.no_grad():
        out = ckpt.reference.thinker.generate(**reference_media_kwargs(prompt), max_new_tokens=16, do_sample=False)
    expected = out[0, len(prompt.token_ids):].tolist()
    result = omni.generate(messages, return_audio=False, max_new_tokens=16, do_sample=False,
                           use_audio_in_video=use_audio_in_video)
    assert result.token_ids == expected and len(set(expected)) > 4


def collect(omni, request):
    events = list(omni.stream(request))
    assert isinstance(events[-1], Done)
    return events, events[-1].result


def one_shot(omni, codes: list[int]) -> np.ndarray:
    dit = omni.cfg.token2wav.dit
    noise = BlockNoise(dit.mel_dim, dit.block_size, seed=SEED).frames(0, dit.repeats * len(codes))
    voice = omni._voices.get("Chelsie")
    with torch.no_grad():
        return omni.model.token2wav(torch.tensor([codes]), voice, noise)[0].numpy()


def test_a_long_spoken_reply_streams_and_matches(omni, ckpt, monkeypatch):
    """60 text tokens, at most 80 codec tokens (1.6 s): the talker's greedy codes are the reference talker's, the
    first audio comes before the last text, and the streamed wave stays within STREAMED_BOUND of the one-shot decode
    of the same codes from the same noise (Token2Wav's windows, models/qwen2_5/token2wav.py)."""
    events, result = collect(omni, spoken(60, 1.6))
    codes = result.codes[0].tolist()
    _, reference_codes = reference_generate(ckpt.reference, omni.prepare(MESSAGES).token_ids, 60, 80, monkeypatch)
    assert codes == [c for c in reference_codes if c not in omni.cfg.talker.stop_ids]
    assert len(codes) > STREAM_WINDOW_TOKENS and len(set(codes)) > 8
    kinds = [type(e) for e in events]
    first_audio = kinds.index(AudioChunk)
    last_text = len(kinds) - 1 - kinds[::-1].index(TextDelta)
    assert first_audio < last_text
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) >= 2 and [c.offset for c in chunks] == list(np.cumsum([0] + [c.audio.size for c in chunks])[:-1])
    expected = one_shot(omni, codes)
    assert result.audio.shape == expected.shape and expected.std() > 0.05
    difference = float(np.abs(result.audio - expected).max())
    print(f"\nstreamed vs one-shot, {len(codes)} codes: max |difference| {difference:.2e}")
    assert 0 < difference < STREAMED_BOUND


def test_a_reply_inside_the_first_window_equals_the_one_shot_decode(omni):
    events, result = collect(omni, spoken(60, 0.9))  # 45 codes: one Token2Wav window spans all of them
    codes = result.codes[0].tolist()
    assert len(codes) == 45 and result.speech_finish_reason == "length"
    np.testing.assert_allclose(result.audio, one_shot(omni, codes), atol=1e-5, rtol=0)
    assert np.array_equal(np.concatenate([e.audio for e in events if isinstance(e, AudioChunk)]), result.audio)


# -------------------------------------------------------------------------------------------------- bad input


def test_a_checkpoint_without_its_speaker_file_speaks_only_text(ckpt, tmp_path):
    for item in ckpt.path.iterdir():
        if item.name != "spk_dict.pt":
            (tmp_path / item.name).symlink_to(item)
    omni = Omni.from_pretrained(tmp_path, device="cpu", dtype="float32")
    assert omni.voices == [] and omni.generate(MESSAGES, return_audio=False, max_new_tokens=2).token_ids
    with pytest.raises(RequestError, match=r"spk_dict\.pt: missing"):
        omni.generate(MESSAGES, return_audio=True, max_new_tokens=2)


def test_an_unknown_voice_lists_the_available_ones(omni):
    with pytest.raises(RequestError, match="unknown voice 'Aiden'; available voices: Chelsie, Ethan") as error:
        omni.generate(MESSAGES, voice="Aiden", max_new_tokens=2)
    assert error.value.param == "voice"


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, r"model_type.*'llama'.*'qwen3_omni_moe' \(Qwen3-Omni\), 'qwen2_5_omni' \(Qwen2\.5"),
    ({"model_type": "qwen3_omni_moe"}, r"token2wav_config.*model_type is 'qwen3_omni_moe'"),
    ({"code2wav_config": {}}, r"code2wav_config.*Qwen3-Omni's vocoder section"),
])
def test_a_mixed_or_unknown_config_names_what_is_supported(ckpt, tmp_path, change, message):
    config = json.loads((ckpt.path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=message):
        Omni.from_pretrained(tmp_path, device="cpu")


def test_what_does_not_apply_yet_is_a_typed_error(omni, ckpt):
    with pytest.raises(RequestError, match="batching does not apply to Qwen2.5-Omni"):
        omni.enable_batching(4)
    with pytest.raises(RequestError, match="quantization does not apply to Qwen2.5-Omni"):
        Omni.from_pretrained(ckpt.path, device="cpu", quantize="int8")


def test_talker_max_new_tokens_counts_codec_tokens(omni):
    result = omni.generate(MESSAGES, max_new_tokens=8, do_sample=False, talker_do_sample=False,
                           talker_max_new_tokens=7)
    assert result.codes.shape == (1, 7) and result.audio.size == 7 * 480
    with pytest.raises(RequestError, match="talker max_new_tokens must be an integer >= 1"):
        omni.request(MESSAGES, talker={"max_new_tokens": 0})


def test_speech_gets_the_talkers_system_prompt(omni, caplog):
    user = [{"role": "user", "content": "hi"}]
    assert omni.request(user, return_audio=True).messages[0] == {"role": "system", "content": SPEECH_SYSTEM_PROMPT}
    assert omni.request(user, return_audio=False).messages == user
    with caplog.at_level(logging.WARNING, logger="thinktalk"):
        other = [{"role": "system", "content": "Be brief."}] + user
        assert omni.request(other, return_audio=True).messages == other
    assert "audio output may not work as expected" in caplog.text


# -------------------------------------------------------------------------------------------------- CLI, server


def thinktalk(*args: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "THINKTALK_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "thinktalk", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cache)


def test_cli_demo_then_run_on_its_checkpoint(tmp_path):
    demo = thinktalk("demo", "--family", "qwen2.5", "--max-tokens", "6", "--max-speech-seconds", "0.5",
                     cache=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "Qwen2.5-Omni structure with RANDOM weights" in demo.stderr and "0.50 s of speech" in demo.stderr
    (checkpoint,) = [p for p in tmp_path.iterdir() if p.name.startswith("demo-qwen2.5")]
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "spk_dict.pt", "tokenizer.json"} <= files
    run = thinktalk("run", "--model", str(checkpoint), "--text", "hi", "--max-tokens", "5", "--greedy",
                    "--voice", "ethan", "--max-speech-seconds", "0.3", "--out", str(tmp_path / "reply.wav"),
                    cache=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and (tmp_path / "reply.wav").stat().st_size > 44
    info = thinktalk("info", "--model", str(checkpoint), cache=tmp_path)
    assert info.returncode == 0 and "Qwen2.5-Omni" in info.stdout and "voices:      chelsie, ethan" in info.stdout


@pytest.fixture(scope="module")
def server(ckpt):
    from thinktalk.serve.app import create_app
    from thinktalk.serve.local import BackgroundServer
    from thinktalk.serve.schemas import ServerLimits

    omni = Omni.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    with BackgroundServer(create_app(omni, "tiny-qwen2.5", limits=ServerLimits(default_max_tokens=6))) as url:
        yield url


def test_server_chat_completions_text_and_audio(server):
    body = {"model": "tiny-qwen2.5", "messages": [{"role": "user", "content": "Hello!"}], "temperature": 0}
    text = httpx.post(server + "/v1/chat/completions", json=body, timeout=120).json()
    assert text["choices"][0]["message"]["content"] and text["usage"]["completion_tokens"] == 6
    spoken = httpx.post(server + "/v1/chat/completions", timeout=120, json={
        **body, "modalities": ["text", "audio"], "audio": {"voice": "ethan", "format": "pcm16", "max_seconds": 0.4}})
    assert spoken.status_code == 200, spoken.text
    audio = spoken.json()["choices"][0]["message"]["audio"]
    samples = len(__import__("base64").b64decode(audio["data"])) // 2
    assert samples == 20 * 480  # 0.4 s: 20 codec tokens of 2 mel frames, 240 samples each
    bad = httpx.post(server + "/v1/chat/completions", timeout=120, json={
        **body, "modalities": ["text", "audio"], "audio": {"voice": "aiden", "format": "wav"}})
    assert bad.status_code == 400 and "chelsie, ethan" in bad.text


def test_realtime_socket_speaks_a_text_turn(omni):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from thinktalk.serve.realtime import realtime_router

    app = FastAPI()
    app.include_router(realtime_router(omni, defaults={"max_output_tokens": 6, "talker_max_new_tokens": 6, "seed": 0}))
    with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
        created = json.loads(ws.receive_text())
        assert created["type"] == "session.created" and created["session"]["audio"]["output"]["voice"] == "chelsie"
        ws.send_text(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["audio"], "audio": {"input": {"turn_detection": None},
                                                                          "output": {"voice": "ethan"}}}}))
        assert json.loads(ws.receive_text())["type"] == "session.updated"
        ws.send_text(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}}))
        assert json.loads(ws.receive_text())["type"] == "conversation.item.created"
        ws.send_text(json.dumps({"type": "response.create"}))
        events = []
        while not events or events[-1]["type"] != "response.done":
            events.append(json.loads(ws.receive_text()))
            assert events[-1]["type"] != "error", events[-1]
    audio = [e for e in events if e["type"] == "response.output_audio.delta"]
    samples = sum(len(__import__("base64").b64decode(e["delta"])) // 2 for e in audio)
    assert events[-1]["response"]["status"] == "completed" and samples == 6 * 480  # talker_max_new_tokens 6 codes


def test_a_thinker_only_config_loads_without_the_speech_side(ckpt, tmp_path):
    for item in ckpt.path.iterdir():
        if item.name != "config.json":
            (tmp_path / item.name).symlink_to(item)
    config = json.loads((ckpt.path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "enable_audio_output": False}))
    omni = Omni.from_pretrained(tmp_path, device="cpu", dtype="float32")
    assert omni.model.talker is None and omni.model.token2wav is None and omni.voices == []
    assert omni.generate(MESSAGES, max_new_tokens=3).audio is None  # text by default
    with pytest.raises(RequestError, match="no talker"):
        omni.generate(MESSAGES, return_audio=True, max_new_tokens=3)
    muted = Omni.from_pretrained(ckpt.path, device="cpu", dtype="float32", audio_output=False)
    with pytest.raises(RequestError, match="loaded with audio_output=False"):
        muted.generate(MESSAGES, return_audio=True, max_new_tokens=3)


def test_a_cancelled_stream_is_dropped_and_the_next_one_runs(ckpt):
    omni = Omni.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    omni.enable_scheduler(1)  # one stream at a time
    first_events, second_events = [], []
    first = omni.submit(spoken(40, 1.0), first_events.append)
    omni.submit(GenerationRequest(MESSAGES, SamplingParams(max_new_tokens=4, do_sample=False)), second_events.append)
    while not any(isinstance(e, AudioChunk) for e in first_events) and omni.iterate():
        pass
    assert not second_events  # one stream at a time: the second waits for the first
    first.cancel()
    while omni.iterate():
        pass
    assert not omni.busy and not isinstance(first_events[-1], Done)
    assert isinstance(second_events[-1], Done) and len(second_events[-1].result.token_ids) == 4


def test_concurrent_streams_interleave_and_each_equals_its_solo_run(ckpt, omni):
    """Two spoken requests on the persistent scheduler: both are under way before either ends, and each gets the
    tokens, codes and wave it gets alone."""
    requests = [spoken(30, 0.6), GenerationRequest([{"role": "user", "content": "Another question entirely."}],
                                                   SamplingParams(max_new_tokens=20, do_sample=False, seed=3),
                                                   SpeechParams(do_sample=False, max_seconds=0.5))]
    alone = [omni.generate(r) for r in requests]
    shared = Omni.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    shared.enable_scheduler(2)
    logs = [[], []]
    streams = [shared.submit(request, log.append) for request, log in zip(requests, logs)]
    while shared.iterate():
        pass
    assert not shared.busy and all(isinstance(log[-1], Done) for log in logs)
    for log, solo in zip(logs, alone):
        result = log[-1].result
        assert result.token_ids == solo.token_ids and torch.equal(result.codes, solo.codes)
        np.testing.assert_array_equal(result.audio, solo.audio)
    served = [{r.iteration for r in shared.scheduler.log if r.streams == (s.id,)} for s in streams]
    assert len(served[0] & served[1]) > 10  # the same iterations advanced both streams


def test_in_bfloat16_token2wav_stays_float32(ckpt):
    omni = Omni.from_pretrained(ckpt.path, device="cpu", dtype="bfloat16")
    assert omni.dtype == torch.bfloat16 and omni.model.talker.codec_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in omni.model.token2wav.parameters()} == {torch.float32}
    result = omni.generate(MESSAGES, max_new_tokens=6, do_sample=False, talker_do_sample=False,
                           talker_max_new_tokens=30)
    assert result.audio.dtype == np.float32 and result.audio.size == result.codes.shape[1] * 480 > 0
