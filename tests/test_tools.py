"""Tool use in Qwen's format: rendering definitions, calls and results into ChatML; parsing calls out of replies."""

import json

import pytest

from thinktalk import Omni
from thinktalk.processing.prompt import PromptError
from thinktalk.processing.tools import parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER) + "\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
)


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


def text_of(omni, messages, tools=None) -> str:
    return omni.tokenizer.decode(omni.encode_prompt(messages, tools=tools))


def test_tools_are_rendered_into_a_new_system_turn(omni):
    rendered = text_of(omni, [{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    assert rendered == (f"<|im_start|>system\n{TOOLS_BLOCK}<|im_end|>\n"
                        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_tools_follow_the_callers_system_text(omni):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    rendered = text_of(omni, messages, tools=[WEATHER])
    assert rendered.startswith(f"<|im_start|>system\nBe terse.\n\n{TOOLS_BLOCK}<|im_end|>\n")


def test_calls_and_results_round_trip_in_history(omni):
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "24C"},
    ]
    rendered = text_of(omni, messages, tools=[WEATHER])
    assert ("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"
            "\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n"
            "</tool_call><|im_end|>\n") in rendered
    assert ("<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n24C\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in rendered


def test_parse_tool_calls_from_a_reply():
    reply = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
             '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>')
    text, calls = parse_tool_calls(reply)
    assert text == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "CET"})]


@pytest.mark.parametrize("block", ["<tool_call>not json</tool_call>", "<tool_call>[1, 2]</tool_call>",
                                  '<tool_call>{"arguments": {}}</tool_call>'])
def test_malformed_calls_stay_in_the_text(block):
    text, calls = parse_tool_calls("ok " + block)
    assert calls == [] and text == "ok " + block


def test_bad_tool_inputs_are_errors(omni):
    with pytest.raises(PromptError, match="tools must be a list"):
        omni.encode_prompt([{"role": "user", "content": "x"}], tools={"name": "f"})
    with pytest.raises(PromptError, match="not valid JSON"):
        omni.encode_prompt([{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": "{oops"}}]}], tools=[WEATHER])
    with pytest.raises(PromptError, match="tool message needs string content"):
        omni.encode_prompt([{"role": "tool", "content": 5}])


def test_generate_with_tools_returns_parsed_calls_field(omni):
    result = omni.generate([{"role": "user", "content": "Weather?"}], tools=[WEATHER], max_new_tokens=4,
                           do_sample=False)
    assert isinstance(result.tool_calls, tuple)
