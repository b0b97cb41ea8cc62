"""Structured output: response_format json_object / json_schema constrain decoding with a grammar (llguidance), so
even the tiny random model writes JSON that parses and validates; rows without a constraint keep their own tokens."""

import json

import jsonschema_rs
import pytest

from thinktalk import Omni
from thinktalk.errors import RequestError
from thinktalk.requests import GenerationRequest, ResponseFormat, SamplingParams

# Every field bounded, so a complete reply fits the budget whatever the random weights prefer.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "unit", "flags"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14},
                         "unit": {"enum": ["celsius", "fahrenheit"]},
                         "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}
ASK = [{"role": "user", "content": "Weather for the week, as JSON."}]
BUDGET = 96


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


def schema_format(schema=SCHEMA, strict=True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": strict}}


def test_unconstrained_reply_is_not_json(omni):
    """The check below is meaningful: without the grammar the random model writes no JSON."""
    reply = omni.generate(ASK, max_new_tokens=BUDGET)
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.text)


@pytest.mark.parametrize("sample", [False, True])
def test_json_schema_reply_validates(omni, sample):
    options = {"do_sample": True, "temperature": 1.0, "seed": 7} if sample else {}
    reply = omni.generate(ASK, max_new_tokens=BUDGET, response_format=schema_format(), **options)
    assert reply.finish_reason == "stop", reply.text
    jsonschema_rs.validate(SCHEMA, json.loads(reply.text))


def test_json_object_replies_parse(omni):
    """Any JSON object: the random model's keys are random strings that seldom end, so sample a few replies; every
    one that ends is an object, every one cut by the budget is one so far, and some end."""
    replies = [omni.generate(ASK, max_new_tokens=48, response_format={"type": "json_object"}, do_sample=True,
                             temperature=2.0, seed=seed) for seed in range(4)]
    finished = [r for r in replies if r.finish_reason == "stop"]
    assert finished, [r.text for r in replies]
    for reply in finished:
        assert isinstance(json.loads(reply.text), dict), reply.text
    for reply in replies:
        assert reply.text.startswith("{"), reply.text


def test_typed_request_and_stream(omni):
    request = GenerationRequest(ASK, SamplingParams(max_new_tokens=BUDGET),
                                response_format=ResponseFormat("json_schema", SCHEMA, strict=True))
    pieces = [e.text for e in omni.stream(request) if type(e).__name__ == "TextDelta"]
    jsonschema_rs.validate(SCHEMA, json.loads("".join(pieces)))


def test_constrained_and_free_rows_together_give_their_solo_replies(omni):
    free = GenerationRequest(ASK, SamplingParams(max_new_tokens=24))
    sampled = GenerationRequest(ASK, SamplingParams(max_new_tokens=24, do_sample=True, temperature=0.9, seed=5))
    shaped = GenerationRequest(ASK, SamplingParams(max_new_tokens=BUDGET),
                               response_format=ResponseFormat("json_schema", SCHEMA))
    solo = [omni.generate(r).token_ids for r in (free, sampled, shaped)]
    together = [r.token_ids for r in omni.generate([free, sampled, shaped])]
    assert together == solo
    jsonschema_rs.validate(SCHEMA, json.loads(omni.tokenizer.decode(solo[2][:-1])))


@pytest.mark.parametrize("response_format, param", [
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "strnig"}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "nonsense"}, "strict": True}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "response_format.json_schema.schema"),
])
def test_bad_formats_are_request_errors_naming_the_field(omni, response_format, param):
    with pytest.raises(RequestError) as caught:
        omni.generate(ASK, max_new_tokens=4, response_format=response_format)
    assert caught.value.param == param


def test_unknown_keywords_of_a_lenient_schema_are_skipped(omni):
    schema = {"type": "object", "additionalProperties": False, "required": ["unit"],
              "properties": {"unit": {"enum": ["celsius", "fahrenheit"], "format": "nonsense"}}}
    reply = omni.generate(ASK, max_new_tokens=BUDGET, response_format=schema_format(schema, strict=False))
    assert json.loads(reply.text)["unit"] in ("celsius", "fahrenheit")
