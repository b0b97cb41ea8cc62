"""Continuous batching of the Talker (engine/talker_batch.py, driven by engine/speech.py): a spoken reply whose talker
runs in a row of the shared talker batch gets exactly the codes, audio and text it gets alone, and N concurrent
replies share each talker step and code-predictor pass.

Streams are advanced round-robin, one event each per turn (`drive`): each `next` runs the persistent scheduler
until that stream has an event. "Alone" is the same request through `Omni.stream` with batching off (a scheduler
of its own, a private batch-1 TalkerSession): an independent path.
"""

from __future__ import annotations

import pytest
from test_decode_batch import drive, user

from thinktalk.events import AudioChunk
from thinktalk.omni import Omni

NEVER = [-1]  # a stop id no model produces: the text runs to its budget
FRAMES = 8  # the talker's frame budget per reply: short replies, fast tests
GREEDY_TALKER = dict(talker_do_sample=False)
SEEDED_TALKER = dict(talker_do_sample=True, talker_temperature=1.0, talker_top_k=30, talker_repetition_penalty=1.3)
# Different prompt lengths; the thinker greedy or seeded. Every reply has a seed: a seeded talker draws with it.
MESSAGES = [("Hi", 3, dict(do_sample=False)),
            ("Tell me a long story about a lighthouse keeper and the sea, please.", 11,
             dict(do_sample=True, temperature=1.0, top_k=40)),
            ("What is two plus two?", 5, dict(do_sample=False))]


@pytest.fixture(scope="module")
def omni(tiny) -> Omni:
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=True)


def speak(omni: Omni, message: str, seed: int | None, thinker: dict, talker: dict, **kw):
    options = dict(max_new_tokens=6, talker_max_new_tokens=FRAMES)
    options.update(kw)
    return omni.stream(user(message), seed=seed, return_audio=True, **thinker, **talker, **options)


def alone(omni: Omni, requests: list, talker: dict, **kw) -> list:
    omni.disable_batching()
    return [[e for e in speak(omni, *r, talker, **kw)][-1].result for r in requests]


def assert_same(results: list, expected: list) -> None:
    for got, want in zip(results, expected, strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.codes is not None and got.codes.equal(want.codes)
        assert got.audio.shape == want.audio.shape


@pytest.mark.parametrize("talker", [GREEDY_TALKER, SEEDED_TALKER], ids=["greedy", "seeded"])
def test_concurrent_spoken_replies_match_alone(omni, talker):
    expected = alone(omni, MESSAGES, talker)
    omni.enable_batching(rows=4, max_len=64, talker_max_len=128)
    shared = omni.talker_batching
    results, most = drive([speak(omni, *r, talker) for r in MESSAGES], starts=[0, 2, 5], batch=shared)
    assert_same(results, expected)
    assert most == 3, "all three replies should have held a talker row at once"
    assert shared.leased == 0  # every row was given back
    frames = sum(e.codes.shape[-1] for e in expected)
    assert shared.passes < frames, "no code-predictor pass was shared"
    assert len({tuple(e.codes.flatten().tolist()) for e in expected}) == len(MESSAGES), "replies too alike"


def test_rows_are_reused_after_finishing_and_after_closing(omni):
    expected = alone(omni, MESSAGES, SEEDED_TALKER)
    omni.enable_batching(rows=1, max_len=64, talker_max_len=128)
    shared = omni.talker_batching
    first, _ = drive([speak(omni, *MESSAGES[0], SEEDED_TALKER)], [0], shared)
    assert shared.leased == 0
    closed = speak(omni, *MESSAGES[1], SEEDED_TALKER)
    while not isinstance(next(closed), AudioChunk):  # the reply speaks from a leased row
        pass
    assert shared.leased == 1
    closed.close()  # the client went away mid-reply
    assert shared.leased == 0
    passes = shared.passes
    again, most = drive([speak(omni, *MESSAGES[2], SEEDED_TALKER)], [0], shared)
    assert most == 1 and shared.passes > passes  # the third reply spoke from the freed row
    assert_same(first + again, [expected[0], expected[2]])


def test_replies_that_do_not_fit_fall_back_and_match(omni):
    expected = alone(omni, MESSAGES[:2], GREEDY_TALKER)
    short = len(omni.encode_prompt(user(MESSAGES[0][0])))
    # A talker row holds the short prompt's talker prompt (a few tokens longer than its thinker prompt) and the frame
    # budget, not the long one's.
    omni.enable_batching(rows=2, max_len=64, talker_max_len=short + 2 * FRAMES)
    shared = omni.talker_batching
    results, most = drive([speak(omni, *MESSAGES[1], GREEDY_TALKER), speak(omni, *MESSAGES[0], GREEDY_TALKER)],
                          [0, 1], shared)
    assert most == 1 and shared.passes > 0
    assert_same(results, expected[::-1])
    # All rows taken: the second of two concurrent replies speaks from a private session.
    omni.enable_batching(rows=1, max_len=64, talker_max_len=128)
    shared = omni.talker_batching
    results, most = drive([speak(omni, *r, GREEDY_TALKER) for r in MESSAGES[:2]], [0, 0], shared)
    assert most == 1
    assert_same(results, expected)


def test_concurrent_replies_share_steps_and_passes(omni):
    """N equal replies (text budget 1, so every frame after the first reads tts_pad or tts_eos: no thinker events
    between frames) cost about 1/N of the talker steps and code-predictor passes they cost alone."""
    n = 3
    request = ("Count with me", None, dict(do_sample=False))
    kw = dict(max_new_tokens=2, stop_token_ids=NEVER)
    omni.enable_batching(rows=1, max_len=64, talker_max_len=128)
    single = omni.talker_batching
    results, _ = drive([speak(omni, *request, GREEDY_TALKER, **kw)], [0], single)
    frames = results[0].codes.shape[-1]
    assert frames == FRAMES - 1, "the reply should run to its frame budget"  # the last code0 gets no frame
    assert (single.steps, single.passes) == (frames - 1, frames)  # frame 0's code0 comes from the prefill
    omni.enable_batching(rows=n, max_len=64, talker_max_len=128)
    shared = omni.talker_batching
    results, most = drive([speak(omni, *request, GREEDY_TALKER, **kw) for _ in range(n)], [0] * n, shared)
    assert most == n and all(r.codes.shape[-1] == frames for r in results)
    # The replies join at successive iterations (one prefill per iteration), so the first ones speak a frame or
    # two alone; after that every step and every pass serves all n. Alone: n * (frames - 1) steps, n * frames
    # passes.
    assert shared.steps <= frames - 1 + n - 1 < n * (frames - 1)
    assert shared.passes <= frames + n - 1 < n * frames
    assert shared.rows_stepped <= n * shared.steps and shared.rows_passed < n * shared.passes
