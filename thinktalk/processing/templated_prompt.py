"""The prompt step: messages -> PreparedPrompt, through the checkpoint's chat template when it ships one, else
through the built-in ChatML layout (processing/multimodal.py; the demo checkpoint has no template).

    messages --checked part by part, media prepared in message order--> the template's view of the messages
             --CheckpointTemplate.render--> PromptText (the template's text; caller-written control tokens apart)
             --Tokenizer.encode_pieces--> ids, one placeholder per media item --expand--> PreparedPrompt

The template sees each message as given (keys whose value is None dropped, as Hugging Face does), with content
parts in canonical form: {"type": "text", "text"}, and {"type": kind, kind: "<kind>"} for media (image_url,
audio_url, input_audio and video_url parts become image / audio / video), so that every Qwen template recognises
them; templates test a media part's keys, never print its value. Media placeholders are expanded exactly as in the
built-in layout; the template must place them in message order (the Qwen templates do).
"""

from __future__ import annotations

from typing import Any

from ..config import ThinkerConfig
from ..errors import InputError, RequestError
from .chat_template import CheckpointTemplate, TemplateOptions
from .multimodal import PART_ALIASES, MediaOptions, PreparedPrompt, _PromptBuilder, build_prompt
from .prompt import PromptError
from .tokenizer import Tokenizer, check_encodable

TEMPLATE_ROLES = ("system", "user", "assistant", "tool")
# What the Qwen templates append to the generation prompt when enable_thinking is False; the built-in layout does
# the same, so that the option means one thing with or without a template.
EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"


def prepare_prompt(messages: list, tokenizer: Tokenizer, cfg: ThinkerConfig, options: MediaOptions,
                   template: CheckpointTemplate | None, use_audio_in_video: bool = False,
                   tools: list | None = None, template_options: TemplateOptions = TemplateOptions()) -> PreparedPrompt:
    if template is None:
        return _builtin(messages, tokenizer, cfg, options, use_audio_in_video, tools, template_options)
    builder = _PromptBuilder(tokenizer, cfg, options, use_audio_in_video)
    view = template_view(messages, builder)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise PromptError(f"tools must be a list of JSON objects, got {tools!r:.80}")
    text = template.render(view, tools, True, template_options, trusted_text=options.trusted_text)
    return builder.expand(tokenizer.encode_pieces(text.pieces, split_special=not options.trusted_text))


def _builtin(messages: list, tokenizer: Tokenizer, cfg: ThinkerConfig, options: MediaOptions,
             use_audio_in_video: bool, tools: list | None, template_options: TemplateOptions) -> PreparedPrompt:
    variables = template_options.template_variables()
    if unknown := sorted(set(variables) - {"enable_thinking"}):
        raise RequestError(f"chat_template_kwargs {unknown}: this checkpoint ships no chat template, and its "
                           "built-in layout takes only enable_thinking", param="chat_template_kwargs")
    prompt = build_prompt(messages, tokenizer, cfg, options, use_audio_in_video, tools=tools)
    if variables.get("enable_thinking") is False:
        prompt.token_ids += tokenizer.encode(EMPTY_THINK_BLOCK)
    return prompt


def template_view(messages: Any, builder: _PromptBuilder) -> list[dict]:
    """The messages as the template sees them, each part checked (and its media prepared) on the way."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list of {'role', 'content'} objects")
    view = []
    for index, message in enumerate(messages):
        try:
            view.append(_message_view(message, index, builder))
        except InputError as error:
            raise error.at(index) from None
    return view


def _message_view(message: Any, index: int, builder: _PromptBuilder) -> dict:
    if not isinstance(message, dict) or message.get("role") not in TEMPLATE_ROLES:
        raise PromptError(f"message {index} must be an object with a role among {', '.join(TEMPLATE_ROLES)}")
    out = {key: value for key, value in message.items() if value is not None}
    content = message.get("content")
    if content is None:
        if not message.get("tool_calls"):
            raise PromptError(f"message {index} has no content (only an assistant turn with tool_calls may)")
        return out
    if isinstance(content, str):
        check_encodable(content, f"message {index}")
        return out
    if not isinstance(content, list):
        raise PromptError(f"message {index} content must be a string or a list of parts, got {content!r:.80}")
    parts = []
    for j, part in enumerate(content):
        try:
            builder.render_part(message["role"], part, f"message {index} part {j}")  # checks it; prepares media
        except InputError as error:
            raise error.at(index, j) from None
        parts.append(_part_view(part))
    out["content"] = parts
    return out


def _part_view(part: dict) -> dict:
    kind = PART_ALIASES.get(part["type"], part["type"])
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    return {"type": kind, kind: f"<{kind}>"}
