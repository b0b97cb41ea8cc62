"""ChatML, the layout Qwen3-Omni was trained on:

    <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n

Messages follow the Qwen/OpenAI chat form: {"role": "system"|"user"|"assistant", "content": str | [parts]}.
processing/multimodal.py renders them (text and media parts) with these markers, as a PromptText: the pieces the
builder writes (markers, role names, the tools preamble) apart from the pieces the caller wrote (message text, tool
definitions, call arguments and results). Control-token strings in the builder's pieces become control tokens; in
the caller's they are ordinary text (Tokenizer.encode_pieces), so a user cannot close a turn or open a system one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

ROLES = ("system", "user", "assistant")


class PromptError(InputError):
    """A chat message is malformed: names the message index and the problem."""


class PromptText:
    """A rendered prompt as (text, written by the builder) pieces; str() is the whole ChatML text."""

    def __init__(self) -> None:
        self.pieces: list[tuple[str, bool]] = []

    def builder(self, text: str) -> PromptText:
        """Text the prompt builder wrote: its control-token strings are control tokens."""
        if text:
            self.pieces.append((text, True))
        return self

    def caller(self, text: str) -> PromptText:
        """Text from the caller's messages or tools: ordinary text, whatever it spells."""
        if text:
            self.pieces.append((text, False))
        return self

    def add(self, other: PromptText) -> PromptText:
        self.pieces += other.pieces
        return self

    def __bool__(self) -> bool:
        return bool(self.pieces)

    def __str__(self) -> str:
        return "".join(text for text, _ in self.pieces)


@dataclass(frozen=True)
class ChatTemplate:
    """The ChatML markers, as text; the tokenizer maps each marker to its single special token."""

    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
