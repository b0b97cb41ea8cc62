"""Chat messages -> ChatML text, in the layout Qwen3-Omni was trained on:

    <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n

Messages follow the Qwen/OpenAI chat form: {"role": "system"|"user"|"assistant", "content": str | [parts]} where a
part is {"type": "text", "text": str}. Media parts (image, audio, video) are expanded by the multimodal prompt
builder; this module handles the text form and validates the structure of every message.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
TEXT_PART = "text"
MEDIA_PARTS = ("image", "image_url", "audio", "input_audio", "audio_url", "video", "video_url")


class PromptError(ValueError):
    """A chat message is malformed: names the message index and the problem."""


@dataclass(frozen=True)
class ChatTemplate:
    """The ChatML markers, as text; the tokenizer maps each marker to its single special token."""

    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
    think_start: str = "<think>"
    think_end: str = "</think>"


def message_text_parts(message: object, index: int) -> tuple[str, list[str]]:
    """Validate one message and return (role, its text parts). Media parts are refused here."""
    if not isinstance(message, dict):
        raise PromptError(f"message {index} must be an object with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise PromptError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, str):
        return role, [content]
    if not isinstance(content, list):
        raise PromptError(f"message {index} content must be a string or a list of parts, got {content!r:.80}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == TEXT_PART and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in MEDIA_PARTS:
            raise PromptError(f"message {index} part {j}: {kind!r} input needs the multimodal prompt builder")
        else:
            raise PromptError(f"message {index} part {j} must be {{'type': 'text', 'text': str}}, got {part!r:.80}")
    return role, texts


def render_chat(messages: list, template: ChatTemplate = ChatTemplate(), add_generation_prompt: bool = True) -> str:
    """Text-only messages -> ChatML text ending with the generation prompt `<|im_start|>assistant\\n`."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list of {'role', 'content'} objects")
    pieces = []
    for index, message in enumerate(messages):
        role, texts = message_text_parts(message, index)
        pieces.append(f"{template.im_start}{role}\n{''.join(texts)}{template.im_end}\n")
    if add_generation_prompt:
        pieces.append(f"{template.im_start}assistant\n")
    return "".join(pieces)
