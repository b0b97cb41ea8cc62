"""Tool use in Qwen's format: tool definitions in the system turn, `<tool_call>` JSON blocks in replies.

System turn with tools (appended after the caller's system text, if any):

    # Tools

    You may call one or more functions to assist with the user query.

    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {one JSON object per tool, one per line}
    </tools>

    For each function call, return a json object with function name and arguments within <tool_call></tool_call>
    XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

Tool results come back as `role: "tool"` messages, rendered inside a user turn as
`<tool_response>\\n{content}\\n</tool_response>` (consecutive results share one user turn); an assistant turn that
called tools carries its calls as `<tool_call>` blocks after its text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .prompt import PromptError, PromptText

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"  # added tokens of Qwen's tokenizer
CALL_SEPARATORS = (", ", ": ")  # (items, keys) in a call's JSON as the template writes it (json.dumps' defaults)


@dataclass(frozen=True)
class OfferedFunction:
    """One offered tool as a forced call needs it: its name, its parameters' JSON schema, and whether the caller
    marked it strict (the schema must then be enforced in full)."""

    name: str
    parameters: dict | None
    strict: bool


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict  # parsed JSON object
    raw: str  # the block's text as the model wrote it


def render_tools(tools: list, system: PromptText | None) -> PromptText:
    """The system turn's body: the caller's system text (if any), a blank line, then the tool definitions (the
    caller's JSON inside the builder's preamble)."""
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise PromptError(f"tools must be a list of JSON objects, got {tools!r:.80}")
    out = PromptText()
    if system:
        out.add(system).builder("\n\n")
    out.builder(TOOLS_PREAMBLE)
    for index, tool in enumerate(tools):
        out.builder("\n").caller(_json(tool, f"tools[{index}]"))
    return out.builder(TOOLS_POSTAMBLE)


def render_tool_calls(calls: Any, where: str, first_on_new_line: bool = True) -> PromptText:
    """An assistant turn's `tool_calls` (OpenAI form {"function": {"name", "arguments"}} or {"name", "arguments"})
    -> `<tool_call>` blocks, each on its own lines (the first without its leading newline when it opens the turn)."""
    if not isinstance(calls, list):
        raise PromptError(f"{where}: tool_calls must be a list, got {calls!r:.80}")
    blocks = PromptText()
    for index, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise PromptError(f"{where}: each tool call needs a function name, got {call!r:.80}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise PromptError(f"{where}: tool call arguments are not valid JSON: {arguments!r:.80}") from None
        payload = _json({"name": function["name"], "arguments": arguments}, where)
        opening = "\n<tool_call>\n" if index or first_on_new_line else "<tool_call>\n"
        blocks.builder(opening).caller(payload).builder("\n</tool_call>")
    return blocks


def _json(value: Any, where: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as error:  # not JSON data (objects, sets), or circular
        raise PromptError(f"{where}: cannot be written as JSON ({error})") from None


def offered_functions(tools: list) -> list[OfferedFunction]:
    """The functions of `tools` (OpenAI form {"type": "function", "function": {...}} or the bare function object)."""
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        parameters = function.get("parameters") if isinstance(function, dict) else None
        if not isinstance(name, str) or not (parameters is None or isinstance(parameters, dict)):
            raise PromptError(f"tools[{index}]: a forced tool call needs a function with a string name and a JSON "
                              f"object of parameters, got {tool!r:.80}")
        functions.append(OfferedFunction(name, parameters, function.get("strict") is True))
    return functions


def call_schema(function: OfferedFunction) -> dict:
    """The JSON schema of a call's payload as Qwen writes it: {"name": <the name>, "arguments": <its parameters>}
    (properties in that order; arguments an object even when the function declares no parameters)."""
    arguments = function.parameters if function.parameters is not None else {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": function.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def render_tool_response(content: str) -> PromptText:
    return PromptText().builder("<tool_response>\n").caller(content).builder("\n</tool_response>")


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A reply -> (its text without the tool-call blocks, the calls). A block that is not a JSON object with a
    string `name` is left in the text: the model wrote something, but not a call."""
    calls: list[ToolCall] = []

    def take(match: re.Match) -> str:
        try:
            payload = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return match.group(0)
        arguments = payload.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return match.group(0)
        if not isinstance(arguments, dict):
            return match.group(0)
        calls.append(ToolCall(payload["name"], arguments, match.group(1)))
        return ""

    remaining = TOOL_CALL_BLOCK.sub(take, text)
    return remaining.strip() if calls else remaining, calls
