"""The checkpoint's chat template through the public entry points: Omni loads it from the checkpoint directory and
renders every prompt with it; `enable_thinking` is a keyword of generate / stream / request, and the HTTP API's
`chat_template_kwargs` (as vLLM spells it) reaches the template; a template's raise_exception answers 400 naming
its message. A checkpoint without a template (the demo's case) keeps the built-in layout, where enable_thinking
means the same empty think block and any other template variable is refused."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from thinktalk.errors import RequestError
from thinktalk.omni import Omni
from thinktalk.processing.chat_template import TemplateOptions
from thinktalk.processing.templated_prompt import EMPTY_THINK_BLOCK
from thinktalk.serve.app import create_app
from thinktalk.serve.local import BackgroundServer
from thinktalk.serve.schemas import ServerLimits

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

TEMPLATE = (Path(__file__).parent / "data" / "qwen3_omni_thinking.chat_template.jinja").read_text()
# The test template, refusing a conversation that opens with an assistant turn (to see raise_exception over HTTP).
REFUSING = ("{%- if messages[0].role == 'assistant' %}{{ raise_exception('The conversation must open with a user "
            "or system turn.') }}{% endif %}") + TEMPLATE
MODEL = "templated"
HELLO = [{"role": "user", "content": "Hello there"}]


def with_template(source: Path, target: Path, template: str) -> Path:
    """The tiny checkpoint's files (linked) plus a chat_template.json."""
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).symlink_to(file)
    (target / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return target


@pytest.fixture(scope="module")
def templated(tiny, tmp_path_factory):
    path = with_template(tiny.path, tmp_path_factory.mktemp("templated") / "ckpt", REFUSING)
    return Omni.from_pretrained(path, device="cpu", dtype="float32", audio_output=False)


@pytest.fixture(scope="module")
def builtin(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


@pytest.fixture(scope="module")
def reference_tokenizer(qwen_dir):
    return AutoTokenizer.from_pretrained(qwen_dir)


def reference_ids(tokenizer, messages, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, chat_template=REFUSING, add_generation_prompt=True, tokenize=True,
                                         return_dict=False, **kwargs)


def test_omni_renders_prompts_with_the_checkpoints_template(templated, builtin, reference_tokenizer):
    assert templated.chat_template is not None and builtin.chat_template is None
    messages = [{"role": "system", "content": [{"type": "text", "text": "A."}, {"type": "text", "text": "B."}]}] + HELLO
    assert templated.encode_prompt(messages) == reference_ids(reference_tokenizer, messages)
    assert builtin.encode_prompt(messages) != templated.encode_prompt(messages)  # one system turn per part


@pytest.mark.parametrize("entry", ["generate", "stream", "request"])
def test_enable_thinking_is_a_keyword_of_the_public_api(templated, reference_tokenizer, entry):
    expected = reference_ids(reference_tokenizer, HELLO, enable_thinking=False)
    assert expected[-4:] == templated.tokenizer.encode(EMPTY_THINK_BLOCK)
    if entry == "request":
        request = templated.request(HELLO, enable_thinking=False)
        assert request.template == TemplateOptions(enable_thinking=False)
        assert templated.prepare(request.messages, template=request.template).token_ids == expected
        return
    if entry == "generate":
        result = templated.generate(HELLO, enable_thinking=False, max_new_tokens=2, do_sample=False)
    else:
        *_, done = templated.stream(HELLO, enable_thinking=False, max_new_tokens=2, do_sample=False)
        result = done.result
    assert result.usage.prompt_tokens == len(expected)
    plain = templated.generate(HELLO, max_new_tokens=2, do_sample=False)
    assert plain.usage.prompt_tokens == len(expected) - 4


def test_the_built_in_layout_takes_enable_thinking_and_refuses_other_variables(builtin):
    plain = builtin.encode_prompt(HELLO)
    assert builtin.encode_prompt(HELLO, template=TemplateOptions(enable_thinking=False)) == \
        plain + builtin.tokenizer.encode(EMPTY_THINK_BLOCK)
    with pytest.raises(RequestError, match="ships no chat template") as caught:
        builtin.generate(HELLO, chat_template_kwargs={"reasoning_effort": "high"}, max_new_tokens=1)
    assert caught.value.param == "chat_template_kwargs"


# ---------------------------------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def server(templated):
    app = create_app(templated, MODEL, limits=ServerLimits(default_max_tokens=2))
    with BackgroundServer(app) as url:
        yield url


def chat(server, messages, **body) -> httpx.Response:
    return httpx.post(server + "/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0, **body})


def test_chat_template_kwargs_over_http(server, reference_tokenizer):
    plain = chat(server, HELLO)
    thinking_off = chat(server, HELLO, chat_template_kwargs={"enable_thinking": False})
    assert plain.status_code == thinking_off.status_code == 200, thinking_off.text
    assert thinking_off.json()["usage"]["prompt_tokens"] == len(
        reference_ids(reference_tokenizer, HELLO, enable_thinking=False))
    assert thinking_off.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"] + 4


def test_bad_chat_template_kwargs_and_a_refusing_template_are_400s(server):
    reserved = chat(server, HELLO, chat_template_kwargs={"add_generation_prompt": False})
    assert reserved.status_code == 400
    assert reserved.json()["error"]["param"] == "chat_template_kwargs.add_generation_prompt"
    assert chat(server, HELLO, chat_template_kwargs=["not", "an", "object"]).status_code == 400
    refused = chat(server, [{"role": "assistant", "content": "I start."}] + HELLO)
    assert refused.status_code == 400, refused.text
    assert "must open with a user or system turn" in refused.json()["error"]["message"]
