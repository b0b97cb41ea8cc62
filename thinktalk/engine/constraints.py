"""Grammar constraints on a reply: JSON (any object, or one matching a schema) and forced tool calls, compiled by
llguidance over the thinker's tokenizer and applied as a token mask before each pick (layers/sampler.py's
TokenConstraint).

    constraint = build_constraint(tokenizer, vocab, stops, response_format, tools, tool_choice)   None: free text
    constraint.allowed()    (vocab,) bool on the host: the ids the grammar allows next (a stop id once it is complete)
    constraint.accept(id)   the matcher moves past the chosen token

A forced call is the text Qwen's template teaches (processing/tools.py): `<tool_call>` (the added token), a newline,
{"name": <an offered function>, "arguments": <its parameters' schema>}, a newline, `</tool_call>`; with parallel
calls allowed, more blocks may follow, one per line. JSON is written in one layout (JSON_LAYOUT): the separators
json.dumps and the template use, and no other whitespace, so that a reply cannot wander off into blank space.

Costs: the grammar tokenizer is built once per (tokenizer, vocab, stop ids) and cached (about 1 s for Qwen's
152,064 ids); a grammar compiles in about a millisecond; a mask is computed on the host between steps, from the
tokens the previous step's sync delivered (0.1-5 ms).
"""

from __future__ import annotations

import json
import threading
import weakref

import llguidance
import numpy as np
import torch

from ..errors import RequestError
from ..processing.prompt import PromptError
from ..processing.tokenizer import Tokenizer
from ..processing.tools import (CALL_SEPARATORS, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, OfferedFunction, call_schema,
                                offered_functions)
from ..requests import ResponseFormat, ToolChoice

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
TOOL_CHOICE_MODES = ("auto", "required")
# llguidance's JSON compiler options: items and keys separated as json.dumps (and the chat template) writes them,
# no other whitespace. (Its default, any whitespace anywhere, lets a weak model fill its budget with blank lines.)
JSON_LAYOUT = {"item_separator": CALL_SEPARATORS[0], "key_separator": CALL_SEPARATORS[1],
               "whitespace_flexible": False}

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> {(vocab, stops): LLTokenizer}
_tokenizers_lock = threading.Lock()


class GrammarConstraint:
    """One reply's grammar matcher (llguidance.LLMatcher): a TokenConstraint for layers/sampler.Sampler."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int):
        self.matcher, self.vocab = matcher, vocab

    def allowed(self) -> torch.Tensor:
        # An error state means a token the mask did not allow was accepted, or the library failed: an engine bug.
        assert not self.matcher.is_error(), f"grammar matcher failed: {self.matcher.get_error()}"
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)  # one bit per id, lowest id first
        bits = np.unpackbits(words, bitorder="little")[:self.vocab]
        return torch.from_numpy(bits.view(np.bool_))

    def accept(self, token: int) -> None:
        accepted = self.matcher.consume_token(token)
        assert accepted, f"the grammar refused token {token}, which its mask allowed: {self.matcher.get_error()}"


def build_constraint(tokenizer: Tokenizer, vocab: int, stops: frozenset[int], response_format: ResponseFormat | None,
                     tools: list | None, tool_choice: ToolChoice | None) -> GrammarConstraint | None:
    """The request's grammar, or None when its reply is free text. RequestError names a bad option or schema."""
    grammar, param = _grammar(tokenizer, response_format, tools, tool_choice)
    if grammar is None:
        return None
    grammar_tokenizer = _grammar_tokenizer(tokenizer, vocab, stops)
    problem = llguidance.LLMatcher.validate_grammar(grammar, grammar_tokenizer)
    if problem:
        raise RequestError(f"{param}: the grammar compiler refused it: {problem[:500]}", param=param)
    matcher = llguidance.LLMatcher(grammar_tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise RequestError(f"{param}: the grammar compiler refused it: {matcher.get_error()[:500]}", param=param)
    return GrammarConstraint(matcher, vocab)


def _grammar(tokenizer: Tokenizer, response_format: ResponseFormat | None, tools: list | None,
             tool_choice: ToolChoice | None) -> tuple[str | None, str]:
    """-> (the llguidance grammar, the request field it comes from), or (None, "") for free text."""
    forced = _forced_functions(tools, tool_choice)
    kind = "text" if response_format is None else response_format.type
    if kind not in RESPONSE_FORMATS:
        raise RequestError(f"response_format type must be one of {list(RESPONSE_FORMATS)}, got {kind!r}",
                           param="response_format.type")
    if forced and kind != "text":
        raise RequestError("a forced tool call (tool_choice) and a JSON response_format cannot both constrain "
                           "one reply", param="response_format")
    if forced:  # a named function is called once (as OpenAI and vLLM do); "required" may call several
        parallel = tool_choice.parallel and tool_choice.function is None
        return _tool_call_grammar(tokenizer, forced, parallel), "tool_choice"
    if kind == "json_object":
        return _json_grammar({"type": "object"}, strict=False, param="response_format"), "response_format"
    if kind == "json_schema":
        param = "response_format.json_schema.schema"
        if not isinstance(response_format.schema, dict):
            raise RequestError(f"{param} must be a JSON object, got {response_format.schema!r:.80}", param=param)
        return _json_grammar(response_format.schema, response_format.strict, param), param
    return None, ""


def _forced_functions(tools: list | None, choice: ToolChoice | None) -> list[OfferedFunction]:
    """The functions one of which the reply must call, or [] when nothing is forced."""
    if choice is None or (choice.mode == "auto" and choice.function is None):
        return []
    if choice.mode not in TOOL_CHOICE_MODES:
        raise RequestError(f"tool_choice must be one of {list(TOOL_CHOICE_MODES)} or a function's name, got "
                           f"{choice.mode!r}", param="tool_choice")
    if not tools:
        raise RequestError("tool_choice forces a tool call, but no tools were offered", param="tool_choice")
    try:
        functions = offered_functions(tools)
    except PromptError as error:
        raise RequestError(str(error), param="tools") from None
    if choice.function is not None:
        functions = [f for f in functions if f.name == choice.function]
        if not functions:
            raise RequestError(f"tool_choice names {choice.function[:64]!r}, which is not among the tools",
                               param="tool_choice")
    return functions


def _json_grammar(schema: dict, strict: bool, param: str) -> str:
    # lenient: keywords the compiler does not implement are skipped (a non-strict schema is enforced as far as it
    # can be); strict, they are an error.
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={**JSON_LAYOUT, "lenient": not strict})
    except ValueError as error:  # not a JSON object, or not serialisable
        raise RequestError(f"{param}: not a usable JSON schema ({error})", param=param) from None


def _tool_call_grammar(tokenizer: Tokenizer, functions: list[OfferedFunction], parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect: `%json` embeds a JSON schema, `<[id]>` is one token) of the calls."""
    payloads = []
    for function in functions:
        schema = dict(call_schema(function), **{"x-guidance": {**JSON_LAYOUT, "lenient": not function.strict}})
        payloads.append(f"%json {json.dumps(schema)}")
    rules = [
        "start: call" + (' ("\\n" call)*' if parallel else ""),
        f'call: {_token(tokenizer, TOOL_CALL_OPEN)} "\\n" payload "\\n" {_token(tokenizer, TOOL_CALL_CLOSE)}',
        "payload: " + " | ".join(payloads),
    ]
    return llguidance.LLMatcher.grammar_from_lark("\n".join(rules))


def _token(tokenizer: Tokenizer, text: str) -> str:
    """The added token spelling `text`, as one token of the grammar (its text when the tokenizer has no such)."""
    try:
        return f"<[{tokenizer.token_to_id(text)}]>"
    except KeyError:
        return json.dumps(text)


class _TokenTable:
    """What llguidance.TokenizerWrapper reads: every id's bytes (ids past the tokenizer: none), the special ids
    (never produced by a grammar's text; the stop ids end a complete one), and text -> ids."""

    def __init__(self, tokenizer: Tokenizer, vocab: int, stops: frozenset[int]):
        known = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) if i < known else b"" for i in range(vocab)]
        self.special_token_ids = sorted(set(tokenizer.special_ids) | set(stops) | set(range(known, vocab)))
        self.eos_token_id, self.bos_token_id = min(stops), None
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # the wrapper probes with bytes to learn which it is given
            raise TypeError("the grammar tokenizer encodes text, not bytes")
        return self._tokenizer.encode_ordinary(text)


def _grammar_tokenizer(tokenizer: Tokenizer, vocab: int, stops: frozenset[int]) -> llguidance.LLTokenizer:
    key = (vocab, tuple(sorted(stops)))
    with _tokenizers_lock:
        built = _tokenizers.setdefault(tokenizer, {})
        if key not in built:
            wrapper = llguidance.TokenizerWrapper(_TokenTable(tokenizer, vocab, stops))
            built[key] = llguidance.LLTokenizer(wrapper, n_vocab=vocab, eos_token=sorted(stops))
        return built[key]
