"""Forced tool calls: tool_choice "required" or a named function constrains decoding to Qwen's `<tool_call>` block
with an offered name and arguments matching its parameters, so even the tiny random model makes a parsed call."""

import jsonschema_rs
import pytest

from thinktalk import Omni
from thinktalk.errors import RequestError
from thinktalk.requests import GenerationRequest, SamplingParams, ToolChoice


def tool(name: str, properties: dict) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": f"{name} of a place",
        "parameters": {"type": "object", "properties": properties, "required": sorted(properties),
                       "additionalProperties": False}}}


WEATHER = tool("get_weather", {"city": {"type": "string", "maxLength": 10},
                               "unit": {"enum": ["celsius", "fahrenheit"]}})
TIME = tool("get_time", {"zone": {"type": "integer", "minimum": -12, "maximum": 14}})
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
BUDGET = 96


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


def parameters(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def test_auto_lets_the_random_model_ramble(omni):
    """Without a forced call the random model makes none (so the checks below are meaningful)."""
    assert omni.generate(ASK, tools=TOOLS, max_new_tokens=32).tool_calls == ()


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_function_is_called(omni, name):
    reply = omni.generate(ASK, tools=TOOLS, tool_choice=name, max_new_tokens=BUDGET)
    assert reply.finish_reason == "stop"
    assert [call.name for call in reply.tool_calls] == [name]
    jsonschema_rs.validate(parameters(name), reply.tool_calls[0].arguments)
    assert reply.text == ""
    assert reply.token_ids[0] == omni.tokenizer.token_to_id("<tool_call>")


@pytest.mark.parametrize("seed", [0, 1])
def test_required_calls_an_offered_tool(omni, seed):
    request = GenerationRequest(ASK, SamplingParams(max_new_tokens=BUDGET * 2, do_sample=True, seed=seed),
                                tools=TOOLS, tool_choice=ToolChoice("required"))
    reply = omni.generate(request)
    assert reply.tool_calls, reply.text
    for call in reply.tool_calls:
        jsonschema_rs.validate(parameters(call.name), call.arguments)


def test_single_call_when_parallel_calls_are_off(omni):
    request = GenerationRequest(ASK, SamplingParams(max_new_tokens=BUDGET), tools=TOOLS,
                                tool_choice=ToolChoice("required", parallel=False))
    reply = omni.generate(request)
    assert reply.finish_reason == "stop" and len(reply.tool_calls) == 1


def test_forced_and_free_rows_batched_keep_their_solo_replies(omni):
    requests = [GenerationRequest(ASK, SamplingParams(max_new_tokens=BUDGET), tools=TOOLS,
                                  tool_choice=ToolChoice(function="get_time")),
                GenerationRequest(ASK, SamplingParams(max_new_tokens=20), tools=TOOLS)]
    solo = [omni.generate(r).token_ids for r in requests]
    assert [r.token_ids for r in omni.generate(requests)] == solo


@pytest.mark.parametrize("keywords", [
    {"tools": TOOLS, "tool_choice": "get_date"},
    {"tools": None, "tool_choice": "required"},
    {"tools": TOOLS, "tool_choice": 3},
    {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
])
def test_bad_choices_are_request_errors(omni, keywords):
    with pytest.raises(RequestError):
        omni.generate(ASK, max_new_tokens=4, **keywords)
