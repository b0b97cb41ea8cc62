"""Continuous batching of the Thinker (engine/thinker_batch.py, driven by engine/scheduler.py): a reply decoded in
a row of the shared batch gets exactly the tokens it gets alone, whoever else joins or leaves, and N concurrent
replies cost one decode step.

Streams are advanced round-robin, one event each per turn; each `next` runs the persistent scheduler until that
stream has an event, which advances every stream. "Alone" is the same request through `Omni.stream` with batching
off (a scheduler of its own, a row of its own): an independent path.
"""

from __future__ import annotations

import threading

import pytest
from media import noise_image, tone

from thinktalk.cli import EXIT_USAGE, build_parser, main
from thinktalk.engine.thinker_batch import ThinkerBatch, step_rows
from thinktalk.omni import Done, Omni
from thinktalk.serve.app import create_app
from thinktalk.serve.local import BackgroundServer
from thinktalk.serve.schemas import ServerLimits

NEVER = [-1]  # a stop id no model produces: replies run to their budget, so step counts are exact
GREEDY = dict(do_sample=False)
SEEDED = dict(do_sample=True, temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.3)


@pytest.fixture(scope="module")
def omni(tiny) -> Omni:
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=True)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# (message, sampling, seed): different prompt lengths, greedy and seeded sampling with a repetition penalty
REQUESTS = [
    ("Hi", GREEDY, None),
    ("Tell me a long story about a lighthouse keeper and the sea, please.", SEEDED, 11),
    ("What is two plus two?", GREEDY, None),
    ("Write a short poem.", SEEDED, 5),
]


def ask(omni: Omni, message: str, sampling: dict, seed: int | None, max_new_tokens: int = 10, **kw):
    return omni.stream(user(message), seed=seed, max_new_tokens=max_new_tokens, return_audio=kw.pop("audio", False),
                       **sampling, **kw)


def drive(streams: list, starts: list[int], batch: ThinkerBatch | None = None) -> tuple[list, int]:
    """Round-robin, one event per stream per turn; stream i joins at turn starts[i]. -> (results, most rows
    leased at once)."""
    results, live, turn, most = [None] * len(streams), {}, 0, 0
    while any(r is None for r in results):
        live.update({i: s for i, s in enumerate(streams) if starts[i] == turn})
        for i, stream in list(live.items()):
            event = next(stream)
            if isinstance(event, Done):
                results[i] = event.result
                del live[i]
            most = max(most, batch.leased if batch is not None else 0)
        turn += 1
    return results, most


def alone(omni: Omni, requests, **kw) -> list:
    omni.disable_batching()
    return [[e for e in ask(omni, *r, **kw)][-1].result for r in requests]


def test_staggered_requests_match_alone(omni):
    expected = alone(omni, REQUESTS)
    batch = omni.enable_batching(rows=4, max_len=64)
    results, most = drive([ask(omni, *r) for r in REQUESTS], starts=[0, 2, 3, 7], batch=batch)
    assert most == 4, "all four requests should have held a row at once"
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    assert [r.text for r in results] == [e.text for e in expected]
    assert batch.leased == 0  # every row was given back
    assert len({tuple(e.token_ids) for e in expected}) == len(REQUESTS), "replies too alike to tell rows apart"


def test_rows_are_reused_after_finishing_and_after_closing(omni):
    expected = alone(omni, REQUESTS[:3])
    batch = omni.enable_batching(rows=1, max_len=64)
    first, _ = drive([ask(omni, *REQUESTS[0])], [0], batch)
    assert batch.leased == 0 and first[0].token_ids == expected[0].token_ids
    closed = ask(omni, *REQUESTS[1])
    next(closed), next(closed)  # Started, the first TextDelta
    assert batch.leased == 1
    closed.close()  # the client went away mid-reply
    assert batch.leased == 0
    again, most = drive([ask(omni, *REQUESTS[2])], [0], batch)
    assert most == 1 and again[0].token_ids == expected[2].token_ids


def test_requests_that_do_not_fit_fall_back_and_match(omni):
    expected = alone(omni, REQUESTS[:2])
    prompt_len = len(omni.encode_prompt(user(REQUESTS[1][0])))
    batch = omni.enable_batching(rows=1, max_len=prompt_len + 5)  # the short prompt fits, the long one does not
    results, most = drive([ask(omni, *REQUESTS[1]), ask(omni, *REQUESTS[0])], [0, 1], batch)
    assert most == 1
    assert [r.token_ids for r in results] == [e.token_ids for e in expected[::-1]]
    # All rows taken: the second of two concurrent requests waits for the row, then gets the same tokens.
    batch = omni.enable_batching(rows=1, max_len=64)
    results, most = drive([ask(omni, *r) for r in REQUESTS[:2]], [0, 0], batch)
    assert most == 1 and [r.token_ids for r in results] == [e.token_ids for e in expected]


def test_speech_through_a_leased_row_matches(omni):
    speech = dict(audio=True, talker_do_sample=False, talker_max_new_tokens=6)
    expected = alone(omni, [REQUESTS[0]], **speech)[0]
    text_alone = alone(omni, [REQUESTS[1]])[0]
    batch = omni.enable_batching(rows=2, max_len=64)
    results, most = drive([ask(omni, *REQUESTS[0], **speech), ask(omni, *REQUESTS[1])], [0, 1], batch)
    assert most == 2
    spoken, text = results
    assert spoken.token_ids == expected.token_ids and spoken.text == expected.text
    assert spoken.codes is not None and spoken.codes.equal(expected.codes)
    assert spoken.audio.shape == expected.audio.shape
    assert text.token_ids == text_alone.token_ids


def test_image_and_audio_prompts_through_leased_rows_match(omni):
    """Multimodal prefills (deepstack hook, TM-RoPE deltas) join the batch like text ones."""
    picture = [{"type": "image", "image": noise_image(64, 64, seed=1)}, {"type": "text", "text": "What is this?"}]
    sound = [{"type": "audio", "audio": (tone(1.3), 16000)}, {"type": "text", "text": "What do you hear?"}]
    media = [[{"role": "user", "content": picture}], [{"role": "user", "content": sound}]]

    def streams():
        return [omni.stream(m, max_new_tokens=10, return_audio=False, **SEEDED, seed=2) for m in media]

    omni.disable_batching()
    expected = [[e for e in s][-1].result.token_ids for s in streams()]
    batch = omni.enable_batching(rows=3, max_len=128)
    results, most = drive(streams() + [ask(omni, *REQUESTS[0])], [0, 1, 0], batch)
    assert most == 3 and [r.token_ids for r in results[:2]] == expected


def test_concurrent_requests_share_decode_steps(omni):
    budget, n = 8, 4
    requests = [("Count with me", GREEDY, None)] * (n - 1) + [("Count with us", SEEDED, 3)]
    singles = 0
    for request in requests:  # each alone in a one-row batch: every decode step is its own
        batch = omni.enable_batching(rows=1, max_len=64)
        drive([ask(omni, *request, max_new_tokens=budget, stop_token_ids=NEVER)], [0], batch)
        singles += batch.steps
    assert singles == n * (budget - 1)  # the prefill gives the first token
    batch = omni.enable_batching(rows=n, max_len=64)
    results, most = drive([ask(omni, *r, max_new_tokens=budget, stop_token_ids=NEVER) for r in requests], [0] * n,
                          batch)
    assert most == n and all(len(r.token_ids) == budget for r in results)
    # One prefill per scheduler iteration: request i joins i iterations after the first, which decodes meanwhile.
    assert batch.steps == budget - 1 + (n - 1) < singles


def test_idle_rows_stay_in_bounds(omni):
    """A taken row below a stepping one that never decodes (held, as a prefilling row is) takes part in every step;
    parked at its last slot, it never writes past its row however long it idles."""
    budget = 10
    request = ("Hi", GREEDY, None)
    expected = alone(omni, [request], max_new_tokens=budget, stop_token_ids=NEVER)[0]
    max_len = len(omni.encode_prompt(user("Hi"))) + budget
    batch = omni.enable_batching(rows=2, max_len=max_len)
    assert batch.take_row() == 0  # row 0 held and idle
    for _ in range(3):
        results, _ = drive([ask(omni, *request, max_new_tokens=budget, stop_token_ids=NEVER)], [0], batch)
        assert results[0].token_ids == expected.token_ids
    assert batch.steps == 3 * (budget - 1) > max_len  # row 0 idled through more steps than it has slots
    assert batch.rows_stepped == 2 * batch.steps  # row 1 steps, so both rows are covered
    batch.release(0)


def test_steps_cover_only_the_rows_in_use(omni):
    """Leases take the lowest free row and a step covers the rows up to the highest stepping one, rounded up to a
    power of two: one request in an 8-row batch steps one row, three step four."""
    assert [step_rows(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [step_rows(n, 6) for n in (3, 5, 6)] == [4, 6, 6]
    budget = 6
    batch = omni.enable_batching(rows=8, max_len=64)
    drive([ask(omni, "Hi", GREEDY, None, max_new_tokens=budget, stop_token_ids=NEVER)], [0], batch)
    assert (batch.steps, batch.rows_stepped) == (budget - 1, budget - 1)
    batch = omni.enable_batching(rows=8, max_len=64)
    drive([ask(omni, *r, max_new_tokens=budget, stop_token_ids=NEVER) for r in REQUESTS[:3]], [0] * 3, batch)
    # Rows 0, 1, 2 join at successive iterations: steps cover 1, then 2, then 4 rows (never all 8).
    assert batch.steps == budget - 1 + 2
    assert batch.rows_stepped == 1 + 2 + 4 * (batch.steps - 2)


def test_bad_batching_arguments_are_named(omni):
    with pytest.raises(ValueError, match="rows must be an integer >= 1, got 0"):
        omni.enable_batching(rows=0, max_len=64)
    with pytest.raises(ValueError, match="max_len must be an integer >= 2.*got 1"):
        omni.enable_batching(rows=2, max_len=1)


@pytest.mark.parametrize("flags, named", [(["--batch-rows", "-1"], "--batch-rows must be >= 0"),
                                          (["--batch-max-len", "1"], "--batch-max-len must be at least 2")])
def test_serve_rejects_bad_batch_flags_before_loading(tiny, capsys, flags, named):
    assert main(["serve", "--model", str(tiny.path / "no-such-dir"), *flags]) == EXIT_USAGE  # no load attempted
    assert named in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--batch-rows", "3", "--batch-max-len", "512", "--compile"])
    assert (args.batch_rows, args.batch_max_len, args.compile) == (3, 512, True)


def test_the_server_plans_its_rows_from_free_memory_and_runs_that_many_at_once(omni, monkeypatch):
    assert omni.planned_rows(128) == 32  # the tiny model's cache is small: the cap, not memory, decides
    assert omni.planned_rows(2**40) == 1  # rows too long for any memory: one row still
    monkeypatch.setattr(omni, "planned_rows", lambda max_len: {128: 3}[max_len])
    app = create_app(omni, "tiny", batch_max_len=128)
    assert omni.batching.rows == 3 and app.state.server.worker.max_active == 3
    app = create_app(omni, "tiny", limits=ServerLimits(max_active=2), batch_max_len=128)
    assert omni.batching.rows == 2 and app.state.server.worker.max_active == 2
    omni.disable_batching()


def test_server_with_batching_answers_concurrent_requests(omni):
    openai = pytest.importorskip("openai")
    asks = [dict(messages=user(m), max_tokens=8, temperature=0) for m in ("Hi", "Tell me about the sea.", "Why?")]
    asks += [dict(messages=user("A poem"), max_tokens=8, temperature=1.0, top_p=0.9, seed=4)]
    omni.disable_batching()
    expected = [omni.generate(a["messages"], max_new_tokens=8, return_audio=False,
                              **({"do_sample": True, "top_p": 0.9, "seed": 4} if "seed" in a else GREEDY)).text
                for a in asks]
    app = create_app(omni, "tiny", limits=ServerLimits(max_active=4), batch_max_len=128)
    batch = omni.batching
    assert batch is not None and batch.rows == 4
    answers: list[str | None] = [None] * len(asks)
    errors: list[BaseException] = []
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def run(i: int) -> None:
            try:
                answers[i] = client.chat.completions.create(model="tiny", **asks[i]).choices[0].message.content
            except BaseException as error:  # re-raised in the test thread below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    if errors:
        raise errors[0]
    assert answers == expected
    assert batch.steps > 0 and batch.leased == 0
    assert batch.steps < sum(8 - 1 for _ in asks), "the requests never shared a decode step"
