"""The Thinker's language model and generation against the reference (transformers) on tiny random checkpoints."""

import pytest
import torch

from thinktalk import Omni
from thinktalk.config import parse_config
from thinktalk.layers.sampler import Sampler
from thinktalk.engine.thinker_runner import ThinkerRunner, text_prefill_inputs
from thinktalk.layers.decoder import DecoderStack

ATOL = 1e-4


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


@pytest.fixture(scope="module")
def omni_thinker_only(tiny_thinker_only):
    return Omni.from_pretrained(tiny_thinker_only.path, device="cpu", dtype="float32")


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 151_000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logits(reference, ids: list[int]) -> torch.Tensor:
    tensor = torch.tensor([ids])
    with torch.no_grad():
        return reference.thinker(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits[0]


def thinktalk_logits(omni, ids: list[int]) -> torch.Tensor:
    """A plain full-sequence forward (no cache)."""
    tensor = torch.tensor([ids])
    positions = torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        logits, _, _ = omni.model.thinker(omni.model.thinker.embed(tensor), positions)
    return logits[0]


@pytest.mark.parametrize("length", [1, 7, 33])
def test_logits_match_reference(omni, tiny, length):
    ids = random_prompt(length, seed=length)
    ours, theirs = thinktalk_logits(omni, ids), reference_logits(tiny.reference, ids)
    assert theirs.std() > 1.0, "weights too weak for a meaningful comparison"
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_logits_match_reference_without_topk_renormalisation(omni_thinker_only, tiny_thinker_only):
    assert omni_thinker_only.cfg.thinker.text.moe.norm_topk_prob is False
    ids = random_prompt(19, seed=5)
    torch.testing.assert_close(thinktalk_logits(omni_thinker_only, ids),
                               reference_logits(tiny_thinker_only.reference, ids), atol=ATOL, rtol=0)


def test_cached_prefill_and_decode_match_full_forward_in_a_padded_batch(omni, tiny):
    """Prompts of different lengths share one right-padded batch; each decode step equals the reference's
    logits for that row's sequence so far (teacher forcing)."""
    prompts = [random_prompt(n, seed=10 + n) for n in (5, 12, 9)]
    continuations = [random_prompt(4, seed=20 + i) for i in range(3)]
    thinker = omni.model.thinker
    runner = ThinkerRunner(thinker, batch=3, max_len=12 + 4)
    first, _ = runner.prefill(text_prefill_inputs(thinker, prompts, omni.device))
    steps = [first]
    for step in range(3):
        steps.append(runner.decode_step(torch.tensor([c[step] for c in continuations])))
    for row, (prompt, extra) in enumerate(zip(prompts, continuations)):
        expected = reference_logits(tiny.reference, prompt + extra[:3])[len(prompt) - 1:]
        got = torch.stack([s[row] for s in steps])
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_padded_batch_matches_reference_left_padded_batch(omni, tiny):
    """The reference's own batching (left padding + attention mask) agrees with ours at each row's last token."""
    prompts = [random_prompt(n, seed=30 + n) for n in (3, 11)]
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = tiny.reference.thinker(input_ids=ids, attention_mask=mask).logits[:, -1]
    runner = ThinkerRunner(omni.model.thinker, batch=2, max_len=longest)
    ours, _ = runner.prefill(text_prefill_inputs(omni.model.thinker, prompts, omni.device))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def reference_greedy(reference, ids: list[int], new_tokens: int) -> list[int]:
    tensor = torch.tensor([ids])
    with torch.no_grad():
        out = reference.thinker.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor),
                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_generation_matches_reference_for_32_tokens(omni, tiny):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    prompt = omni.encode_prompt(messages)
    expected = reference_greedy(tiny.reference, prompt, 32)
    result = omni.generate(messages, max_new_tokens=32, do_sample=False, stop_token_ids=[-1])
    assert result.token_ids == expected
    assert len(set(expected)) > 4, "degenerate reference output: the comparison would prove little"
    assert result.finish_reason == "length" and result.usage.completion_tokens == 32


def test_batched_greedy_generation_matches_reference_per_prompt(omni, tiny):
    conversations = [[{"role": "user", "content": text}] for text in ("Hi", "What is the capital of France, and why?")]
    results = omni.generate(conversations, max_new_tokens=16, do_sample=False, stop_token_ids=[-1])
    for conversation, result in zip(conversations, results):
        assert result.token_ids == reference_greedy(tiny.reference, omni.encode_prompt(conversation), 16)


def test_decoder_stack_with_shared_expert_matches_reference_talker_stack(tiny):
    """The talker's decoder (MoE with a sigmoid-gated shared expert) is the same DecoderStack code."""
    cfg = parse_config(tiny.config).talker.text
    assert cfg.moe.shared_expert_intermediate_size > 0
    stack = DecoderStack(cfg).eval()
    reference = tiny.reference.talker.model
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("codec_embedding")}
    stack.load_state_dict(state, strict=True)
    embeds = torch.randn(2, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(9).view(1, 1, -1).expand(3, 2, -1)
    with torch.no_grad():
        theirs = reference(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        ours, _ = stack.run_layers(embeds, positions)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(omni):
    messages = [{"role": "user", "content": "Sing."}]
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, stop_token_ids=[-1])
    first = omni.generate(messages, seed=7, **kwargs).token_ids
    assert omni.generate(messages, seed=7, **kwargs).token_ids == first
    assert any(omni.generate(messages, seed=s, **kwargs).token_ids != first for s in (8, 9, 10))


def test_sampler_filters():
    from thinktalk.config import SamplingConfig
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 1.0]])
    top1 = Sampler(SamplingConfig(do_sample=True, top_k=1), 1, 5, torch.device("cpu"), seed=0)
    assert all(top1(logits).item() == 1 for _ in range(20))
    narrow = Sampler(SamplingConfig(do_sample=True, top_p=0.5), 1, 5, torch.device("cpu"), seed=0)
    assert {narrow(logits).item() for _ in range(50)} == {1}  # token 1 alone holds 52% of the mass
    wide = Sampler(SamplingConfig(do_sample=True, top_p=0.9), 1, 5, torch.device("cpu"), seed=0)
    assert {wide(logits).item() for _ in range(100)} == {1, 2}  # 1 and 2 hold 99%; 0, 3, 4 are cut
    penalised = Sampler(SamplingConfig(repetition_penalty=100.0), 1, 5, torch.device("cpu"))
    penalised.observe(torch.tensor([[1]]))
    assert penalised(logits).item() == 2


def test_streamed_text_equals_generated_text(omni):
    from thinktalk.omni import Done, TextDelta
    messages = [{"role": "user", "content": "Count: 一二三 🎉"}]
    events = list(omni.stream_text(messages, max_new_tokens=24, do_sample=False, stop_token_ids=[-1]))
    assert isinstance(events[-1], Done)
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert streamed == events[-1].result.text
    assert "\ufffd" not in streamed or "\ufffd" in events[-1].result.text
    assert events[-1].result.token_ids == omni.generate(messages, max_new_tokens=24, do_sample=False,
                                                        stop_token_ids=[-1]).token_ids
