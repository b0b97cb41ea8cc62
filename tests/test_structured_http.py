"""Structured output, forced tool calls and logprobs over HTTP with the official `openai` client (streamed and not),
and every OpenAI field the server does not implement refused by name (400), never silently dropped."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import pytest
import torch

from thinktalk.omni import Omni
from thinktalk.serve.app import create_app
from thinktalk.serve.local import BackgroundServer
from thinktalk.serve.schemas import ServerLimits

openai = pytest.importorskip("openai")

MODEL = "tiny-omni"
ASK = [{"role": "user", "content": "Weather for the week, as JSON."}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "unit"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14},
                         "unit": {"enum": ["celsius", "fahrenheit"]}}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                                          "properties": {"city": {"type": "string", "maxLength": 10}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "required": ["zone"], "additionalProperties": False,
                                       "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}}}
BUDGET = 96


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


@pytest.fixture(scope="module")
def server(omni):
    app = create_app(omni, MODEL, limits=ServerLimits(default_max_tokens=8))
    with BackgroundServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def streamed(client, **request) -> tuple[str, list, list]:
    """-> (the content, the logprobs entries, the tool-call deltas) of a streamed reply."""
    text, entries, calls = "", [], []
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **request):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            if choice.logprobs is not None:
                entries += choice.logprobs.content or []
    return text, entries, calls


def test_json_schema_reply_validates(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=BUDGET,
                                           response_format=SCHEMA_FORMAT)
    jsonschema_rs.validate(SCHEMA, json.loads(reply.choices[0].message.content))
    assert reply.choices[0].finish_reason == "stop"


def test_json_schema_reply_streamed_validates(client):
    text, _, _ = streamed(client, messages=ASK, max_tokens=BUDGET, response_format=SCHEMA_FORMAT, seed=3,
                          temperature=1.0)
    jsonschema_rs.validate(SCHEMA, json.loads(text))


def test_json_object_reply_starts_an_object(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].message.content.startswith('{"')


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_calls_it(client, stream):
    request = dict(messages=[{"role": "user", "content": "Time?"}], tools=[WEATHER, CLOCK], max_tokens=BUDGET,
                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    if stream:
        _, _, deltas = streamed(client, **request)
        calls = [(d.function.name, d.function.arguments) for d in deltas]
    else:
        message = client.chat.completions.create(model=MODEL, **request).choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls]
    assert len(calls) == 1 and calls[0][0] == "get_time"
    jsonschema_rs.validate(CLOCK["function"]["parameters"], json.loads(calls[0][1]))


def test_required_tool_choice_calls_an_offered_tool(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], max_tokens=BUDGET,
                                           tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    tool = next(t for t in (WEATHER, CLOCK) if t["function"]["name"] == call.function.name)
    jsonschema_rs.validate(tool["function"]["parameters"], json.loads(call.function.arguments))


def reference_logprobs(omni, tokens: list[int]) -> torch.Tensor:
    """The thinker's log_softmax over prompt + reply in one forward pass (no cache)."""
    ids = torch.tensor([omni.encode_prompt(ASK) + tokens])
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        logits, _, _ = omni.model.thinker(omni.model.thinker.embed(ids), positions)
    return logits[0].float().log_softmax(dim=-1)[-len(tokens) - 1:-1]


@pytest.fixture(scope="module")
def id_of_bytes(omni) -> dict[bytes, int]:
    """Byte-level BPE: each ordinary token's bytes name it."""
    special = omni.tokenizer.added_ids
    return {omni.tokenizer.token_bytes(i): i for i in range(omni.tokenizer.vocab_size) if i not in special}


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_in_openai_shape_match_the_model(client, omni, id_of_bytes, stream):
    request = dict(messages=ASK, max_tokens=6, logprobs=True, top_logprobs=3)
    if stream:
        text, entries, _ = streamed(client, **request)
    else:
        choice = client.chat.completions.create(model=MODEL, **request).choices[0]
        text, entries = choice.message.content, choice.logprobs.content
    assert len(entries) == 6
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace") == text
    ids = [id_of_bytes[bytes(e.bytes)] for e in entries]
    expected = reference_logprobs(omni, ids)
    for index, entry in enumerate(entries):
        assert entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")
        assert entry.logprob == pytest.approx(float(expected[index, ids[index]]), abs=1e-4)
        values, top_ids = expected[index].topk(3)
        assert [id_of_bytes[bytes(t.bytes)] for t in entry.top_logprobs] == top_ids.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)


def test_top_logprobs_needs_logprobs(server):
    body = {"model": MODEL, "messages": ASK, "top_logprobs": 2}
    answer = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "top_logprobs"


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("logit_bias", {"42": 5}), ("frequency_penalty", 0.5), ("presence_penalty", -1.0),
    ("reasoning_effort", "high"), ("store", True), ("service_tier", "flex"), ("verbosity", "low"),
    ("prediction", {"type": "content", "content": "x"}), ("functions", [{"name": "f"}]),
    ("web_search_options", {}), ("top_k", 5), ("min_p", 0.1), ("guided_json", {"type": "object"}),
])
def test_unsupported_fields_are_400s_naming_them(server, field, value):
    body = {"model": MODEL, "messages": ASK, field: value}
    answer = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field, answer.json()


@pytest.mark.parametrize("field, value", [("n", 1), ("frequency_penalty", 0), ("logit_bias", {}),
                                          ("store", False), ("user", "u-1"), ("parallel_tool_calls", True),
                                          ("response_format", {"type": "text"})])
def test_no_op_values_are_accepted(server, field, value):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2, field: value}
    answer = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text


def test_a_bad_schema_is_a_400_naming_it(server):
    body = {"model": MODEL, "messages": ASK, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}}
    answer = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "response_format.json_schema.schema"
