"""The scheduler (engine/scheduler.py) as the one owner of the step loop: prefill interleaved with decode, cancellation
between units, failures confined to their stream, the runaway-speech guard, and conversation prefixes reused
across turns. Assertions read the scheduler's own step log and counters, never the clock."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from media import noise_image

from thinktalk import Omni
from thinktalk.engine.encoding import PromptEncoding
from thinktalk.events import Done, Failed, Started, TextDelta
from thinktalk.requests import guard_frames

NEVER = [-1]  # a stop id no model produces: replies run to their budget
CHUNK = 16  # prompt positions per prefill unit in these tests


@pytest.fixture(scope="module")
def omni(tiny) -> Omni:
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


LONG = user(" ".join(f"word{i}" for i in range(60)) + " Tell me everything about them.")


def text_request(omni: Omni, messages, tokens: int, **kw):
    return omni.request(messages, max_new_tokens=tokens, do_sample=False, stop_token_ids=NEVER, return_audio=False,
                        **kw)


def solo(omni: Omni, request):
    omni.disable_batching()
    return omni.generate(request)


def run(omni: Omni, submissions: dict[int, object], until_done: bool = True) -> dict[int, list]:
    """Submits request r at iteration `at` for each (at -> r); iterates until every stream is done."""
    events: dict[int, list] = {at: [] for at in submissions}
    streams = {}
    iteration = 0
    while True:
        for at, request in submissions.items():
            if at == iteration:
                streams[at] = omni.submit(request, events[at].append)
        omni.iterate()
        iteration += 1
        if len(streams) == len(submissions) and all(e and isinstance(e[-1], (Done, Failed)) for e in events.values()):
            return events


def result(events: list):
    assert isinstance(events[-1], Done), events[-1]
    return events[-1].result


def test_a_long_prompt_is_prefilled_a_chunk_at_a_time_between_decode_steps(omni):
    short, long = text_request(omni, user("Hi"), 24), text_request(omni, LONG, 6)
    expected = [solo(omni, r).token_ids for r in (short, long)]
    omni.enable_batching(rows=2, max_len=512, prefill_chunk=CHUNK)
    scheduler = omni.scheduler
    events = run(omni, {0: short, 3: long})
    assert [result(events[k]).token_ids for k in (0, 3)] == expected  # each as it is alone
    first, second = (next(e for e in events[k] if isinstance(e, Started)) for k in (0, 3))
    assert second.prompt_tokens > 4 * CHUNK, "the long prompt should take several chunks"
    log = list(scheduler.log)
    short_id = log[0].streams[0]
    decodes = [i for i, record in enumerate(log) if record.kind == "decode" and short_id in record.streams]
    prefills = [i for i, record in enumerate(log) if record.kind == "prefill" and short_id not in record.streams]
    assert len(prefills) >= 5
    gaps = [sum(1 for p in prefills if a < p < b) for a, b in zip(decodes, decodes[1:])]
    assert max(gaps) == 1, f"the short stream waited for {max(gaps)} prefill chunks between two of its steps"
    assert all(record.positions <= CHUNK for record in log if record.kind == "prefill")
    assert omni.batching.leased == 0


def test_cancelling_mid_prefill_frees_the_row_at_once(omni):
    waiting = text_request(omni, user("Hello"), 4)
    expected = solo(omni, waiting).token_ids
    omni.enable_batching(rows=1, max_len=512, prefill_chunk=CHUNK)
    scheduler = omni.scheduler
    cancelled, follow = [], []
    stream = omni.submit(text_request(omni, LONG, 4), cancelled.append)
    for _ in range(3):
        omni.iterate()
    assert scheduler.prefilled_positions == 3 * CHUNK and omni.batching.leased == 1
    omni.submit(waiting, follow.append)
    omni.iterate()  # the only row is taken: the new request waits while the long prefill goes on
    assert not follow and scheduler.prefilled_positions == 4 * CHUNK
    stream.cancel()
    omni.iterate()  # the cancelled stream leaves first; the waiting one takes its row and prefills this iteration
    assert isinstance(follow[0], Started) and scheduler.log[-2].kind == "prefill"
    while not isinstance(follow[-1], Done):
        omni.iterate()
    assert follow[-1].result.token_ids == expected
    assert not cancelled, "a cancelled stream's consumer is gone: it gets no events"
    assert omni.batching.leased == 0


def test_an_engine_bug_fails_its_stream_only(omni, monkeypatch, caplog):
    original = PromptEncoding.run_one

    def broken(self):
        if self.prompt.images:
            raise RuntimeError("injected encoder bug")
        return original(self)

    monkeypatch.setattr(PromptEncoding, "run_one", broken)
    omni.enable_batching(rows=2, max_len=256, prefill_chunk=CHUNK)
    picture = [{"role": "user", "content": [{"type": "image", "image": noise_image(32, 32, seed=1)},
                                            {"type": "text", "text": "What is it?"}]}]
    text = text_request(omni, user("Hi"), 8)
    with caplog.at_level(logging.ERROR, logger="thinktalk.engine"):
        events = run(omni, {0: text, 1: text_request(omni, picture, 8)})
    assert isinstance(events[1][-1], Failed) and isinstance(events[1][-1].error, RuntimeError)
    assert len(result(events[0]).token_ids) == 8
    assert any("failed inside the engine" in r.message and r.exc_info for r in caplog.records)
    assert omni.batching.leased == 0


def test_the_runaway_speech_guard_bounds_a_talker_that_never_stops(omni):
    omni.disable_batching()
    tokens = 3
    reply = omni.generate(user("Hi"), max_new_tokens=tokens, stop_token_ids=NEVER, talker_do_sample=False)
    assert reply.speech_finish_reason == "length"  # random weights never say codec EOS
    assert reply.codes.shape[1] == guard_frames(tokens) < omni.cfg.talker_sampling.max_new_tokens - 1
    bounded = omni.generate(user("Hi"), max_new_tokens=tokens, stop_token_ids=NEVER, talker_do_sample=False,
                            talker_max_new_tokens=11)  # an explicit budget replaces the guard
    assert bounded.codes.shape[1] == 10
    request = omni.request(user("Hi"), max_new_tokens=tokens, stop_token_ids=NEVER, talker_do_sample=False)
    ceiling = dataclasses.replace(request, speech=dataclasses.replace(request.speech, ceiling_seconds=0.4))
    assert omni.generate(ceiling).codes.shape[1] == 5  # a server's cap: min(guard, 0.4 s), the guard kept on
    roomy = dataclasses.replace(request, speech=dataclasses.replace(request.speech, ceiling_seconds=600.0))
    assert omni.generate(roomy).codes.shape[1] == guard_frames(tokens)  # a cap past the guard changes nothing


def conversation_turns(omni: Omni, turns: int, speak: bool):
    messages, replies, counters = [], [], []
    for turn in range(turns):
        messages = messages + user(f"Turn {turn}: tell me more about item {turn}.")
        scheduler = omni.scheduler
        before = (scheduler.prefilled_positions, scheduler.cached_positions) if scheduler else (0, 0)
        kw = dict(talker_do_sample=False, talker_max_new_tokens=6) if speak else dict(return_audio=False)
        reply = omni.generate(messages, max_new_tokens=6, do_sample=False, **kw)
        if scheduler:
            counters.append((scheduler.prefilled_positions - before[0], scheduler.cached_positions - before[1]))
        replies.append(reply)
        messages = messages + [{"role": "assistant", "content": reply.text}]
    return replies, counters


@pytest.mark.parametrize("speak", [False, True], ids=["text", "spoken"])
def test_a_conversation_prefills_only_each_turns_new_tokens(omni, speak):
    turns = 6 if speak else 10
    omni.disable_batching()
    cold, _ = conversation_turns(omni, turns, speak)
    omni.enable_batching(rows=2, max_len=1024, prefix_cache_bytes=64 * 2**20)
    warm, counters = conversation_turns(omni, turns, speak)
    for turn, (hot, fresh) in enumerate(zip(warm, cold)):
        assert hot.token_ids == fresh.token_ids, f"turn {turn}"
        if speak:
            assert hot.codes.equal(fresh.codes), f"turn {turn}"
        prefilled, cached = counters[turn]
        assert prefilled + cached == hot.usage.prompt_tokens and cached == hot.usage.cached_tokens
        if turn:
            previous = warm[turn - 1].usage.prompt_tokens
            assert cached >= previous, f"turn {turn} re-read {previous - cached} tokens of the last turn's prompt"
            assert prefilled < hot.usage.prompt_tokens - previous + len(warm[turn - 1].token_ids) + 8
    assert omni.scheduler.prefix_cache.hits == turns - 1


def test_media_in_a_cached_prefix_is_not_encoded_again(omni):
    omni.enable_batching(rows=1, max_len=1024, prefix_cache_bytes=64 * 2**20)
    scheduler = omni.scheduler
    first = [{"role": "user", "content": [{"type": "image", "image": noise_image(64, 64, seed=2)},
                                          {"type": "text", "text": "What is this?"}]}]
    reply = omni.generate(first, max_new_tokens=4, do_sample=False, return_audio=False)
    assert scheduler.encoded_items == 1
    second = first + [{"role": "assistant", "content": reply.text}] + user("And now?")
    again = omni.generate(second, max_new_tokens=4, do_sample=False, return_audio=False)
    assert scheduler.encoded_items == 1  # the image lies in the cached prefix
    omni.disable_batching()
    assert again.token_ids == omni.generate(second, max_new_tokens=4, do_sample=False, return_audio=False).token_ids


def test_text_deltas_and_started_come_in_order(omni):
    omni.disable_batching()
    events = list(omni.stream(user("Hi"), max_new_tokens=5, return_audio=False, do_sample=False))
    assert isinstance(events[0], Started) and isinstance(events[-1], Done)
    assert all(isinstance(e, TextDelta) for e in events[1:-1])


def test_an_engine_bug_is_a_logged_500_on_the_server_not_a_silent_400(omni, monkeypatch, caplog):
    """A ValueError from a bug in the engine is the engine's fault: 500 with its traceback in the log (before, every
    ValueError became a 400 and was never logged); the next request is served as usual."""
    fastapi = pytest.importorskip("fastapi")  # noqa: F841
    from fastapi.testclient import TestClient

    from thinktalk.serve.app import create_app
    from thinktalk.serve.schemas import ServerLimits

    original = PromptEncoding.run_one

    def broken(self):
        if self.prompt.images:
            raise ValueError("injected bug: not the request's fault")
        return original(self)

    monkeypatch.setattr(PromptEncoding, "run_one", broken)
    import base64
    import io

    buffer = io.BytesIO()
    noise_image(32, 32, seed=3).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    picture = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": "What is it?"}]}]
    app = create_app(omni, "tiny", limits=ServerLimits(max_active=2))
    with TestClient(app) as client, caplog.at_level(logging.ERROR):
        failed = client.post("/v1/chat/completions", json={"model": "tiny", "messages": picture, "max_tokens": 4})
        served = client.post("/v1/chat/completions", json={"model": "tiny", "messages": user("Hi"), "max_tokens": 4})
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
    assert "injected" not in failed.text  # internals stay in the log
    assert any(r.exc_info and "injected bug" in str(r.exc_info[1]) for r in caplog.records)
    assert served.status_code == 200 and served.json()["choices"][0]["message"]["content"] is not None
    omni.disable_batching()
