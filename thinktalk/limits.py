"""What one request may ask for, checked before any work or allocation: the reply budget, the seed, the context.

The context rule is vLLM's (and its wording, which OpenAI clients know): prompt tokens + max_new_tokens must fit
the model's context, `max_position_embeddings` of the thinker, or a smaller `max_model_len` the server sets.
`check_request` runs once the prompt is prepared and before a scheduler or a cache is sized for the request.
"""

from __future__ import annotations

import numbers

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


def check_option_types(params, prefix: str = "") -> None:
    """Sampling options of the right JSON-ish type: do_sample a bool, the real-valued ones numbers (not bools, not
    strings), so that no comparison inside SamplingConfig meets a str. Integers are checked by requests.py."""
    do_sample = getattr(params, "do_sample", None)
    if do_sample is not None and not isinstance(do_sample, bool):
        raise RequestError(f"{prefix}do_sample must be true or false, got {do_sample!r:.40}",
                           param=f"{prefix}do_sample")
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(params, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise RequestError(f"{prefix}{name} must be a number, got {value!r:.40}", param=f"{prefix}{name}")


def check_request(request, prompt_tokens: int, context: int, default_budget: int) -> None:
    """A GenerationRequest whose prompt holds `prompt_tokens`: its options typed and in range, and prompt + reply
    budget (its max_new_tokens, else `default_budget`) within `context`."""
    check_option_types(request.sampling)
    if request.speech is not None:
        check_option_types(request.speech, "talker_")
    check_seed(request.sampling.seed)
    budget = request.sampling.max_new_tokens
    check_max_new_tokens(default_budget if budget is None else budget, context)
    check_context(prompt_tokens, default_budget if budget is None else budget, context)
