"""ChatML, the layout Qwen3-Omni was trained on:

    <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n

Messages follow the Qwen/OpenAI chat form: {"role": "system"|"user"|"assistant", "content": str | [parts]}.
processing/multimodal.py renders them (text and media parts) with these markers.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """A chat message is malformed: names the message index and the problem."""


@dataclass(frozen=True)
class ChatTemplate:
    """The ChatML markers, as text; the tokenizer maps each marker to its single special token."""

    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
