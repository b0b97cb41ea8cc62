"""Log-probabilities of the reply's tokens: the thinker's raw distribution (before penalty, mask, temperature,
top-k/p), each equal to log_softmax of the reference model's logits at that position in one forward pass."""

import pytest
import torch

from thinktalk import Omni
from thinktalk.errors import RequestError
from thinktalk.events import Done, TextDelta
from thinktalk.requests import GenerationRequest, SamplingParams

ASK = [{"role": "user", "content": "Say something."}]
ATOL = 1e-4


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


def reference_logprobs(tiny, ids: list[int]) -> torch.Tensor:
    tensor = torch.tensor([ids])
    with torch.no_grad():
        logits = tiny.reference.thinker(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits[0]
    return logits.float().log_softmax(dim=-1)  # (len, vocab): row i predicts ids[i + 1]


def check_against_reference(tiny, omni, reply, top: int) -> None:
    prompt = omni.encode_prompt(ASK)
    expected = reference_logprobs(tiny, prompt + reply.token_ids)
    content = [t for t in reply.token_ids if t not in omni.cfg.stop_token_ids]
    assert [entry.token_id for entry in reply.logprobs] == content
    for index, entry in enumerate(reply.logprobs):
        row = expected[len(prompt) - 1 + index]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=ATOL)
        values, ids = row.topk(top)
        assert [i for i, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=ATOL)


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "seed": 2},
                                     {"repetition_penalty": 1.3}])
def test_logprobs_are_the_models_raw_log_softmax(tiny, omni, options):
    reply = omni.generate(ASK, max_new_tokens=12, logprobs=3, **options)
    check_against_reference(tiny, omni, reply, 3)


def test_grammar_rows_report_the_raw_logprobs_of_what_they_chose(tiny, omni):
    reply = omni.generate(ASK, max_new_tokens=12, logprobs=2, response_format={"type": "json_object"})
    assert reply.text.startswith("{")
    check_against_reference(tiny, omni, reply, 2)


def test_logprobs_leave_the_tokens_unchanged(omni):
    plain = omni.generate(ASK, max_new_tokens=12)
    assert plain.logprobs is None
    assert omni.generate(ASK, max_new_tokens=12, logprobs=0).token_ids == plain.token_ids


def test_stream_carries_every_tokens_logprob_once(omni):
    request = GenerationRequest(ASK, SamplingParams(max_new_tokens=12, logprobs=1))
    events = list(omni.stream(request))
    streamed = [entry for e in events if isinstance(e, TextDelta) for entry in e.logprobs]
    result = next(e for e in events if isinstance(e, Done)).result
    assert streamed == list(result.logprobs) and len(streamed) >= 1
    assert all(len(entry.top) == 1 for entry in streamed)


def test_batched_rows_with_and_without_logprobs_keep_their_solo_replies(omni):
    requests = [GenerationRequest(ASK, SamplingParams(max_new_tokens=10, logprobs=2)),
                GenerationRequest(ASK, SamplingParams(max_new_tokens=10)),
                GenerationRequest(ASK, SamplingParams(max_new_tokens=10, do_sample=True, seed=4, logprobs=0))]
    solo = [omni.generate(r) for r in requests]
    together = omni.generate(requests)
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]
    for mine, alone in zip(together, solo):
        if alone.logprobs is None:
            assert mine.logprobs is None
            continue
        assert [e.token_id for e in mine.logprobs] == [e.token_id for e in alone.logprobs]
        assert [e.logprob for e in mine.logprobs] == pytest.approx([e.logprob for e in alone.logprobs], abs=ATOL)


@pytest.mark.parametrize("value", [-1, 21, 2.5, True])
def test_bad_top_logprobs_is_a_request_error(omni, value):
    with pytest.raises(RequestError):
        omni.generate(ASK, max_new_tokens=2, logprobs=value)


def test_a_top_p_below_float32s_range_keeps_the_most_likely_token():
    """top_p 5e-324 is 0 in float32: every token compared as past the mass, and the draw got no candidate."""
    import dataclasses

    from thinktalk.config import SamplingConfig
    from thinktalk.layers.sampler import Sampler

    params = dataclasses.replace(SamplingConfig(), do_sample=True, temperature=1.0, top_p=5e-324)
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    assert Sampler(params, 1, 1000, torch.device("cpu"), seed=0)(logits).tolist() == [int(logits.argmax())]
