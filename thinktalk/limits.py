"""What one request may ask for, checked before any work or allocation: the reply budget, the seed, the context.

The context rule is vLLM's (and its wording, which OpenAI clients know): prompt tokens + max_new_tokens must fit
the model's context, `max_position_embeddings` of the thinker, or a smaller `max_model_len` the server sets.
"""

from __future__ import annotations

from .errors import RequestError

# Seeds seed torch.Generator, which takes 64-bit values; the talker's second sampler uses seed + 1.
SEED_LIMIT = 2**63


class ContextLengthError(RequestError):
    """The prompt plus the reply budget does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int):
        total = prompt_tokens + max_new_tokens
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, you requested {total} tokens "
            f"({prompt_tokens} in the messages, {max_new_tokens} in the completion). Please reduce the length of "
            "the messages or completion.", param="messages")
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context


def is_integer(value) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to a caller)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_max_new_tokens(value, context: int, name: str = "max_new_tokens") -> None:
    """A reply budget: an integer >= 1 that leaves room for a prompt of at least one token in `context`."""
    if not is_integer(value) or value < 1:
        raise RequestError(f"{name} must be an integer >= 1, got {value!r:.40}", param=name)
    if value >= context:
        raise RequestError(f"{name} {value} leaves no room for the prompt in this model's context of {context} "
                          f"tokens; at most {context - 1}", param=name)


def check_seed(seed) -> None:
    if seed is not None and (not is_integer(seed) or not 0 <= seed < SEED_LIMIT):
        raise RequestError(f"seed must be an integer in [0, 2**63), got {seed!r:.40}", param="seed")


def check_context(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    if prompt_tokens + max_new_tokens > context:
        raise ContextLengthError(prompt_tokens, max_new_tokens, context)
