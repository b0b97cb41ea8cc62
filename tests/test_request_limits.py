"""What a request may ask for, refused before any work or allocation: the reply budget, the seed, the sampling
options' types, and prompt + max_new_tokens against the model's context (vLLM's wording, naming both numbers)."""

import pytest
from hostile_media import png_bytes

from thinktalk import Omni
from thinktalk.errors import RequestError


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


def user(*parts):
    return [{"role": "user", "content": [{"type": "text", "text": "look:"}, *parts]}]


@pytest.mark.parametrize("options, match", [
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"max_new_tokens": "5"}, "max_new_tokens"),
    ({"seed": 2**70}, "seed"),
    ({"seed": -1}, "seed"),
    ({"temperature": "hot", "do_sample": True}, "temperature"),
])
def test_bad_options_are_request_errors_before_any_work(omni, options, match):
    with pytest.raises(RequestError, match=match):
        omni.generate(user({"type": "image", "image": png_bytes()}), **options)


def test_a_prompt_past_the_context_is_refused_naming_both_numbers(omni, monkeypatch):
    monkeypatch.setattr(omni, "max_model_len", 64)
    with pytest.raises(RequestError, match="maximum context length is 64 tokens. However, you requested") as caught:
        omni.generate(user({"type": "text", "text": "word " * 100}), max_new_tokens=8)
    assert caught.value.param == "messages"
