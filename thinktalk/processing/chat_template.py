"""The checkpoint's own chat template: Jinja, rendered in a sandbox, as the checkpoint's authors intended.

A checkpoint ships its template as `chat_template.jinja`, as `chat_template.json` ({"chat_template": "..."}), or
as `chat_template` in `tokenizer_config.json` (looked for in that order). It is rendered with the variables and
helpers Hugging Face templates are written against: `messages`, `tools`, `add_generation_prompt`, the tokenizer's
named special tokens (`eos_token`, ...), the caller's template options (`enable_thinking`, chat_template_kwargs),
the `raise_exception` and `strftime_now` functions, the `tojson` filter (no HTML escaping), a `namespace` that
refuses underscore names, and `break` / `continue` in loops; blocks trim their newline and leading space.
The environment is Jinja's immutable sandbox: no attribute starting with "_", no mutation of the inputs.

Control tokens. The template writes control tokens (`<|im_start|>`, media placeholders) as text; so may the
caller's strings. Before rendering, every added-token string inside a caller's string is wrapped in private-use
markers (MARK_OPEN token MARK_CLOSE), and a caller's string whose first or last characters could join a
neighbour into a control token ("<|im_" + "end|>") gets a MARK_EDGE there. Template logic still sees the tokens
(`'</think>' in content` holds); after rendering, a marked token is ordinary text, the markers are dropped, and
only the template's own text places control tokens. The reasoning tags `<think>` / `</think>` of assistant
messages are left unmarked: they are the model's own output, which the template is written to take apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils

from ..errors import RequestError
from .prompt import PromptError, PromptText

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")  # the order looked in
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # template variables, from the config
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
REASONING_TAGS = ("<think>", "</think>")  # left unmarked in assistant messages (see the module doc)
# Private-use characters (plane 15) that no tokenizer of this family gives a meaning; caller strings lose them.
MARK_OPEN, MARK_CLOSE, MARK_EDGE = "\U000FFF01", "\U000FFF02", "\U000FFF03"
MARKS = (MARK_OPEN, MARK_CLOSE, MARK_EDGE)


class ChatTemplateError(PromptError):
    """The checkpoint's chat template refused the messages (raise_exception), failed on them, or tried something
    its sandbox does not allow; or the checkpoint's template file cannot be read."""


@dataclass(frozen=True)
class TemplateOptions:
    """Options for the checkpoint's chat template. `enable_thinking`: the Qwen templates' switch (False: the reply
    starts with an empty think block), None: the template's default. `variables`: any other template variables
    (the HTTP API's chat_template_kwargs), JSON values by name."""

    enable_thinking: bool | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)

    def template_variables(self) -> dict[str, Any]:
        """The variables as the template sees them; a RequestError names a bad one."""
        if self.enable_thinking is not None and not isinstance(self.enable_thinking, bool):
            raise RequestError(f"enable_thinking must be a boolean, got {self.enable_thinking!r}",
                             param="enable_thinking")
        if not isinstance(self.variables, Mapping):
            raise RequestError(f"chat_template_kwargs must be an object, got {self.variables!r:.80}",
                             param="chat_template_kwargs")
        out: dict[str, Any] = {}
        for name, value in self.variables.items():
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                raise RequestError(f"chat_template_kwargs: {name!r} is not a template variable name",
                                 param="chat_template_kwargs")
            if name in RESERVED_VARIABLES:
                raise RequestError(f"chat_template_kwargs: {name!r} is set by the request itself, not an option",
                                 param=f"chat_template_kwargs.{name}")
            out[name] = _plain(value, f"chat_template_kwargs.{name}")
        if self.enable_thinking is not None:
            out["enable_thinking"] = self.enable_thinking
        return out


def _plain(value: Any, where: str) -> Any:
    """A JSON value (str, number, bool, None, lists, objects with string keys), as plain Python types."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return {key: _plain(item, f"{where}.{key}") for key, item in value.items()}
    raise RequestError(f"{where}: template variables must be JSON values, got {type(value).__name__}",
                     param=where.split("[")[0])


# ---------------------------------------------------------------------------------------------------- loading


def read_template_source(directory: str | Path) -> tuple[str, dict[str, str]] | None:
    """(the template's text, the named special tokens) of a checkpoint directory, or None when it ships none."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    specials = {name: _token_text(config.get(name)) for name in NAMED_SPECIAL_TOKENS}
    specials = {name: text for name, text in specials.items() if text is not None}
    for name in TEMPLATE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return _read_text(path), specials
        source = (_read_json(path) if name != "tokenizer_config.json" else config).get("chat_template")
        if source is None:
            continue
        return _pick_named(source, path), specials
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ChatTemplateError(f"cannot read the chat template {path}: {error}") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ChatTemplateError(f"corrupt JSON in {path}: {error}") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(entry: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _pick_named(source: Any, path: Path) -> str:
    """`chat_template` is a string, or a list of {"name", "template"} of which "default" is the one for chats."""
    if isinstance(source, str):
        return source
    if isinstance(source, list):
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ChatTemplateError(f"{path}: chat_template must be a string or a list holding a 'default' template")


# -------------------------------------------------------------------------------------------------- rendering


class _SafeNamespace(jinja2.utils.Namespace):
    """Jinja's namespace() that refuses underscore names (they reach interpreter internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's signature: `self` may be a kwarg)
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """JSON without Jinja's HTML escaping. With ensure_ascii the markers come back as themselves, not as escapes,
    so that marked tokens inside the JSON stay marked."""
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    if ensure_ascii:
        for mark in MARKS:
            text = text.replace(json.dumps(mark)[1:-1], mark)
    return text


def _strftime_now(format: str) -> str:  # noqa: A002 (the name templates call it with)
    return datetime.now().strftime(format)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_SafeNamespace)
    return env


class CheckpointTemplate:
    """A checkpoint's chat template, compiled once; `render` gives the prompt as PromptText pieces (the template's
    own text: builder pieces; control-token strings the caller wrote: caller pieces)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str], control_tokens: tuple[str, ...],
                 where: str = "the checkpoint's chat template"):
        self.where = where
        try:
            self.template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise ChatTemplateError(f"{where} does not compile: {error} (line {error.lineno})") from None
        self.special_tokens = dict(special_tokens)
        self.marker = ControlTokenMarker(control_tokens)

    @classmethod
    def from_dir(cls, directory: str | Path, control_tokens: tuple[str, ...]) -> CheckpointTemplate | None:
        found = read_template_source(directory)
        return None if found is None else cls(found[0], found[1], control_tokens, f"the chat template of {directory}")

    def render(self, messages: list, tools: list | None, add_generation_prompt: bool, options: TemplateOptions,
               trusted_text: bool = False) -> PromptText:
        variables = options.template_variables()
        messages, tools = plain_data(messages), plain_data(tools)
        if not trusted_text:
            messages = [self.marker.mark_message(m) for m in messages]
            tools = self.marker.mark(tools)
            variables = self.marker.mark(variables)
        try:
            text = self.template.render({**self.special_tokens, **variables}, messages=messages, tools=tools,
                                        add_generation_prompt=add_generation_prompt)  # the caller's over the config's
        except jinja2.exceptions.SecurityError as error:
            raise ChatTemplateError(f"{self.where} tried something its sandbox refuses: {error}") from None
        except jinja2.exceptions.TemplateError as error:  # raise_exception(...), an undefined name, ...
            raise ChatTemplateError(f"{self.where} refused the messages: {error}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as error:
            raise ChatTemplateError(f"{self.where} failed on these messages: {type(error).__name__}: "
                                    f"{error}") from None
        return PromptText().builder(text) if trusted_text else self.marker.unmark(text)


def plain_data(value: Any) -> Any:
    """What the template may see: JSON-like data rebuilt from plain types. Any other object (an image, an array, a
    caller's own class) becomes the string "<TypeName>", so that the template can call none of its methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {plain_data(key): plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    for kind in (bool, int, float, str):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


class ControlTokenMarker:
    """Marks control-token strings in caller strings before rendering, and reads the marks back afterwards."""

    def __init__(self, control_tokens: tuple[str, ...]):
        tokens = sorted(set(control_tokens), key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        self.heads = {t[:k] for t in tokens for k in range(1, len(t))}  # proper prefixes: may end a string
        self.tails = {t[k:] for t in tokens for k in range(1, len(t))}  # proper suffixes: may start one
        self.longest = max(map(len, tokens), default=0)
        inner = "|".join(map(re.escape, tokens)) or "(?!)"
        self.marked = re.compile(f"{re.escape(MARK_OPEN)}({inner}){re.escape(MARK_CLOSE)}|[{''.join(MARKS)}]")

    def mark(self, value: Any, keep: tuple[str, ...] = ()) -> Any:
        """Every string inside `value` (dict values, list items; not dict keys) marked; `keep`: tokens left as
        they are."""
        if isinstance(value, str):
            return self._mark_text(value, keep)
        if isinstance(value, Mapping):
            return {key: self.mark(item, keep) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mark(item, keep) for item in value]
        return value

    def mark_message(self, message: Any) -> Any:
        if not isinstance(message, Mapping):
            return message
        if message.get("role") != "assistant":
            return self.mark(message)
        return {key: self.mark(value, REASONING_TAGS if key in ("content", "reasoning_content") else ())
                for key, value in message.items()}

    def _mark_text(self, text: str, keep: tuple[str, ...]) -> str:
        for mark in MARKS:
            text = text.replace(mark, "")
        if self.pattern is None or not text:
            return text
        marked = self.pattern.sub(lambda m: m.group() if m.group() in keep else f"{MARK_OPEN}{m.group()}{MARK_CLOSE}",
                                  text)
        if self._touches(marked, self.tails, start=True):
            marked = MARK_EDGE + marked
        if self._touches(marked, self.heads, start=False):
            marked += MARK_EDGE
        return marked

    def _touches(self, text: str, pieces: set[str], start: bool) -> bool:
        """`text` starts (ends) with one of `pieces`: part of a control token that a neighbour could complete."""
        return any((text[:k] if start else text[-k:]) in pieces for k in range(1, min(self.longest, len(text) + 1)))

    def unmark(self, rendered: str) -> PromptText:
        """The rendered text as pieces: marked tokens are caller text; a lone marker only breaks the template's
        text there, so that no control token forms across it."""
        out, at = PromptText(), 0
        for match in self.marked.finditer(rendered):
            out.builder(rendered[at:match.start()])
            if match.group(1) is not None:
                out.caller(match.group(1))
            at = match.end()
        return out.builder(rendered[at:])
