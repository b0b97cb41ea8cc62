"""Captured, compiled and eager per-frame steps compute the same speech; the MoE's grouped path computes the same
experts as the block path and a per-token loop.

- The eager talker session against an independent slower path: the talker and the code predictor recomputed
  over their whole sequences without a KV cache, frame after frame.
- A compiled session (the code predictor's decoder-stack runs compiled on the CPU) against the eager one, greedy
  and drawing with a seed: the same codes.
- The MoE experts: the grouped-GEMM path (F.grouped_mm, which runs on the CPU in bfloat16 with aligned shapes),
  the row-gather path and the block path against a per-token loop, an idle expert included.
- The grouped path inside whole bf16 networks on the CPU (eager; F.grouped_mm runs on the CPU in bf16): the tiny
  thinker's decode and a talker session with every MoE forced onto GROUPED against the CPU's block path.
- CUDA only (skipped here): the captured talker step and code-predictor pass (CUDA graphs) against eager, greedy
  and drawing; a captured thinker decode step (ThinkerRunner's step in a CapturedStep) against eager. Each in float32
  (the ROW_GATHER experts) and in bf16, where sm90 / sm100 GPUs take GROUPED (F.grouped_mm inside the graph): the
  tiny widths are multiples of 8, as F.grouped_mm's 16-byte strides need.
- Private thinker rows kept across generate calls (one batch, one captured or compiled step for both).

The talker and thinker are the suite's tiny ones with strong random weights, built directly (no reference needed).
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from checkpoints import strengthen_, tiny_config_dict
from thinktalk.config import SamplingConfig, parse_config
from thinktalk.engine.graphs import CapturedStep, StepMode
from thinktalk.layers.sampler import Sampler
from thinktalk.engine.talker_prompt import TalkerPrefill
from thinktalk.engine.talker_session import TalkerSession
from thinktalk.engine.thinker_batch import PRIVATE_IDLE_LIMIT, PRIVATE_MIN_LEN, PrivateRows, private_length
from thinktalk.engine.thinker_runner import DecodeStep, ThinkerRunner, text_prefill_inputs
from thinktalk.layers import moe
from thinktalk.layers.moe import ExpertPath, Experts, choose_path, grouped_mm_is_fast
from thinktalk.models.talker import Talker
from thinktalk.models.thinker import Thinker
from thinktalk.omni import Omni
from thinktalk.processing.audio import AudioFeatureConfig
from thinktalk.processing.multimodal import MediaOptions
from thinktalk.processing.tokenizer import Tokenizer
from thinktalk.processing.vision import VisionProcessorConfig
from thinktalk.random_weights import random_model

FRAMES = 6
PROMPT = 7
HAS_CUDA = torch.cuda.is_available()
HAS_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None  # inductor's CPU backend compiles C++
GREEDY = SamplingConfig(do_sample=False, repetition_penalty=1.05, max_new_tokens=FRAMES + 2)
DRAW = SamplingConfig(do_sample=True, temperature=0.9, top_k=50, repetition_penalty=1.05, max_new_tokens=FRAMES + 2)


@pytest.fixture(scope="module")
def cfg():
    return parse_config(tiny_config_dict())


@pytest.fixture(scope="module")
def talker(cfg) -> Talker:
    model = Talker(cfg.talker).eval()
    strengthen_(model, seed=5)
    return model


def random_prefill(cfg, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.float32) -> TalkerPrefill:
    gen = torch.Generator().manual_seed(seed)
    hidden = cfg.talker.text.hidden_size
    positions = torch.arange(PROMPT, dtype=torch.float32).view(1, 1, -1).expand(3, 1, PROMPT)
    return TalkerPrefill(torch.randn(1, PROMPT, hidden, generator=gen).to(device, dtype), positions.to(device), 0.0,
                         torch.randn(3, hidden, generator=gen).to(device, dtype))


def text_inputs(cfg, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(FRAMES, 1, hidden) stand-ins for the projected reply tokens the talker steps read."""
    gen = torch.Generator().manual_seed(11)
    return torch.randn(FRAMES, 1, cfg.talker.text.hidden_size, generator=gen).to(device, dtype)


def speak(session: TalkerSession, texts: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Up to FRAMES frames -> (codes (1, G) per frame, the talker hidden (1, hidden) each frame's pass read)."""
    codes, hiddens = [], []
    for text in texts:
        if session.finished:
            break
        hiddens.append(session.hidden.clone())
        frame, codec_sum = session.complete()
        codes.append(frame)
        session.advance(codec_sum, text)
    return codes, hiddens


def test_eager_session_equals_recomputation_without_cache(cfg, talker):
    """Talker: each step's hidden state equals a cache-free pass over prompt + all step inputs so far.
    Code predictor: each greedy code is the argmax of a cache-free pass over the frame's inputs."""
    cpu = torch.device("cpu")
    prefill, texts = random_prefill(cfg, cpu), text_inputs(cfg, cpu)
    session = TalkerSession(talker, cfg, prefill, GREEDY, mode=StepMode.EAGER)
    codes, hiddens = speak(session, texts)
    assert len(codes) == FRAMES
    predictor, groups = talker.code_predictor, cfg.talker.num_code_groups
    inputs = prefill.embeds
    with torch.inference_mode():
        for frame, (code, hidden) in enumerate(zip(codes, hiddens)):
            seq = inputs.shape[1]
            positions = torch.arange(seq, dtype=torch.float32).view(1, 1, -1).expand(3, 1, seq)
            full, _ = talker(inputs, positions)  # no cache: causal over the whole sequence
            torch.testing.assert_close(hidden, full[:, -1], atol=1e-5, rtol=0)
            embeds = [hidden, talker.embed_codec(code[:, 0])]
            embeds += [predictor.model.codec_embedding[g - 1](code[:, g]) for g in range(1, groups - 1)]
            states, _ = predictor.model.run_layers(torch.stack(embeds, dim=1), torch.arange(groups).view(1, -1))
            picked = [predictor.lm_head[g - 1](states[:, g]).argmax(-1) for g in range(1, groups)]
            assert torch.equal(code[:, 1:], torch.stack(picked, dim=1)), frame
            codec_sum = talker.embed_codec(code[:, 0]) + sum(
                predictor.model.codec_embedding[g - 1](code[:, g]) for g in range(1, groups))
            inputs = torch.cat((inputs, (codec_sum + texts[frame]).unsqueeze(1)), dim=1)


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("params", [GREEDY, DRAW], ids=["greedy", "draw"])
def test_compiled_session_speaks_the_eager_codes(cfg, talker, params):
    cpu = torch.device("cpu")
    results = []
    for mode in (StepMode.EAGER, StepMode.COMPILED):
        session = TalkerSession(talker, cfg, random_prefill(cfg, cpu), params, seed=3, mode=mode)
        results.append(speak(session, text_inputs(cfg, cpu)))
    (eager_codes, eager_hidden), (compiled_codes, compiled_hidden) = results
    assert len(eager_codes) == len(compiled_codes) >= FRAMES - 1
    assert torch.equal(torch.cat(compiled_codes), torch.cat(eager_codes))
    torch.testing.assert_close(torch.cat(compiled_hidden), torch.cat(eager_hidden), atol=1e-5, rtol=0)


def test_graph_mode_needs_cuda():
    with pytest.raises(ValueError, match="cpu"):
        CapturedStep(torch.neg, StepMode.GRAPH, torch.device("cpu"))


def naive_experts(experts: Experts, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """One token and one slot at a time, in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for slot in range(chosen.shape[1]):
            e = int(chosen[t, slot])
            gate, up = (experts.gate_up_proj[e].float() @ x[t].float()).chunk(2)
            out[t] += weights[t, slot].float() * (experts.down_proj[e].float() @ (torch.nn.functional.silu(gate) * up))
    return out


def test_grouped_experts_equal_blocks_and_a_token_loop():
    """bfloat16 on the CPU, widths multiples of 8 (16-byte rows, as F.grouped_mm needs); expert 3 gets no token."""
    num_experts, hidden, inter, tokens, top_k = 6, 32, 16, 9, 2
    gen = torch.Generator().manual_seed(0)
    experts = Experts(num_experts, hidden, inter)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) / hidden ** 0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) / inter ** 0.5)
    experts = experts.bfloat16()
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    busy = torch.tensor([0, 1, 2, 4, 5])  # expert 3 idles
    chosen = torch.stack([busy[torch.randperm(busy.numel(), generator=gen)[:top_k]] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1).bfloat16()
    with torch.inference_mode():
        out = {path: experts(x, weights, chosen, path=path).float()
               for path in (ExpertPath.GROUPED, ExpertPath.BLOCKS, ExpertPath.ROW_GATHER)}
        expected = naive_experts(experts, x, weights, chosen)
    assert expected.abs().max() > 0.1, "experts too weak for a meaningful comparison"
    for path, got in out.items():  # bfloat16 products and sums: a few units in the last place
        torch.testing.assert_close(got, expected, atol=3e-2, rtol=2e-2, msg=f"{path}")
    torch.testing.assert_close(out[ExpertPath.GROUPED], out[ExpertPath.BLOCKS], atol=0, rtol=0)


class ForcedPath:
    """Stands in for moe.choose_path: every MoE takes `path`; counts the calls (proof that the path ran)."""

    def __init__(self, path: ExpertPath):
        self.path, self.calls = path, 0

    def __call__(self, x: torch.Tensor) -> ExpertPath:
        self.calls += 1
        return self.path


def bf16_decode(thinker: Thinker, steps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy eager decode of two prompts -> (tokens (steps + 1, 2), logits (steps, 2, vocab))."""
    cpu = torch.device("cpu")
    runner = ThinkerRunner(thinker, 2, 8 + steps, mode=StepMode.EAGER)
    sampler = Sampler(SamplingConfig(repetition_penalty=1.2), 2, thinker.cfg.text.vocab_size, cpu)
    with torch.inference_mode():
        tokens = sampler(runner.prefill(text_prefill_inputs(thinker, [[5, 9, 200, 7], [3, 1, 4, 1, 5, 9]], cpu))[0])
        picked, outs = [tokens], []
        for _ in range(steps):
            logits = runner.decode_step(tokens)
            tokens = sampler(logits)
            picked.append(tokens)
            outs.append(logits.float())
    return torch.stack(picked), torch.stack(outs)


def test_bf16_networks_on_the_grouped_path_equal_the_block_path(cfg, talker, monkeypatch):
    """The CPU run of what a captured bf16 step does on sm90: every MoE of the tiny thinker's decode and of a talker
    session (its shared-expert MoE included) through F.grouped_mm, against the CPU's own block path."""
    thinker = Thinker(parse_config(tiny_config_dict(talker=False)).thinker).eval()
    strengthen_(thinker, seed=3)
    thinker, model = thinker.bfloat16(), copy.deepcopy(talker).bfloat16()
    cpu, dtype = torch.device("cpu"), torch.bfloat16
    blocks = bf16_decode(thinker), speak(TalkerSession(model, cfg, random_prefill(cfg, cpu, dtype=dtype), GREEDY,
                                                       mode=StepMode.EAGER), text_inputs(cfg, cpu, dtype))
    forced = ForcedPath(ExpertPath.GROUPED)
    monkeypatch.setattr(moe, "choose_path", forced)
    grouped = bf16_decode(thinker), speak(TalkerSession(model, cfg, random_prefill(cfg, cpu, dtype=dtype), GREEDY,
                                                        mode=StepMode.EAGER), text_inputs(cfg, cpu, dtype))
    assert forced.calls > 0
    (block_tokens, block_logits), (block_codes, block_hidden) = blocks
    (grouped_tokens, grouped_logits), (grouped_codes, grouped_hidden) = grouped
    assert len(set(block_tokens.flatten().tolist())) > 3, "degenerate decode would prove little"
    assert torch.equal(grouped_tokens, block_tokens)
    torch.testing.assert_close(grouped_logits, block_logits, atol=2e-2, rtol=2e-2)
    assert len(grouped_codes) == len(block_codes) >= FRAMES - 1
    assert torch.equal(torch.cat(grouped_codes), torch.cat(block_codes))
    torch.testing.assert_close(torch.cat(grouped_hidden).float(), torch.cat(block_hidden).float(), atol=2e-2,
                               rtol=2e-2)


cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")


def expected_cuda_path(dtype: torch.dtype) -> ExpertPath:
    """The MoE path a CUDA activation of `dtype` takes on this GPU (GROUPED: bf16 on sm90 / sm100)."""
    fast = grouped_mm_is_fast(dtype, torch.cuda.get_device_capability())
    return ExpertPath.GROUPED if fast else ExpertPath.ROW_GATHER


# Captured against eager on one GPU: the same kernels replayed, so float32 agrees to rounding noise; bf16 steps are
# compared at bf16's resolution (its codes must still be identical).
HIDDEN_TOLERANCE = {torch.float32: dict(atol=1e-6, rtol=0), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", [GREEDY, DRAW], ids=["greedy", "draw"])
def test_captured_session_speaks_the_eager_codes(cfg, talker, params, dtype):
    device = torch.device("cuda")
    model = copy.deepcopy(talker).to(device, dtype)
    probe = torch.zeros(1, cfg.talker.text.hidden_size, device=device, dtype=dtype)
    assert choose_path(probe) is expected_cuda_path(dtype)  # bf16 on sm90 / sm100: F.grouped_mm in the graph
    results, sessions = [], []
    for mode in (StepMode.EAGER, StepMode.GRAPH):
        session = TalkerSession(model, cfg, random_prefill(cfg, device, dtype=dtype), params, seed=3, mode=mode)
        results.append(speak(session, text_inputs(cfg, device, dtype)))
        sessions.append(session)
    (eager_codes, eager_hidden), (graph_codes, graph_hidden) = results
    assert sessions[1].step.captured and sessions[1].frame_pass.step.captured
    assert sessions[1].step.captures == sessions[1].frame_pass.step.captures == 1
    assert len(eager_codes) == len(graph_codes) >= FRAMES - 1
    assert torch.equal(torch.cat(graph_codes), torch.cat(eager_codes))
    torch.testing.assert_close(torch.cat(graph_hidden).float(), torch.cat(eager_hidden).float(),
                               **HIDDEN_TOLERANCE[dtype])


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", [SamplingConfig(repetition_penalty=1.2),
                                    SamplingConfig(do_sample=True, top_k=20, top_p=0.9)], ids=["greedy", "draw"])
def test_captured_thinker_step_equals_eager(params, dtype):
    """ThinkerRunner's decode step plus its sampler, captured, against the same eagerly; logits and tokens."""
    device, steps = torch.device("cuda"), 6
    thinker = Thinker(parse_config(tiny_config_dict(talker=False)).thinker).eval()
    strengthen_(thinker, seed=3)
    thinker = thinker.to(device, dtype)
    probe = torch.zeros(1, thinker.cfg.text.hidden_size, device=device, dtype=dtype)
    assert choose_path(probe) is expected_cuda_path(dtype)
    prompts = [[5, 9, 200, 7], [3, 1, 4, 1, 5, 9, 2, 6]]
    vocab = thinker.cfg.text.vocab_size
    picked, logits = [], []
    for mode in (StepMode.EAGER, StepMode.GRAPH):
        runner = ThinkerRunner(thinker, 2, 8 + steps)
        sampler = Sampler(params, 2, vocab, device, seed=7)

        runner_step = DecodeStep(thinker, runner.cache, runner.cursor, rows=2)

        def step_and_pick(tokens, runner_step=runner_step, sampler=sampler):  # (rows,) -> logits (rows, vocab), (rows,)
            logits = runner_step(tokens)
            return logits, sampler(logits)

        step = CapturedStep(step_and_pick, mode, device, generators=[sampler.generator])
        with torch.inference_mode():
            tokens = sampler(runner.prefill(text_prefill_inputs(thinker, prompts, device))[0])
            seq, outs = [tokens], []
            for _ in range(steps):
                out, tokens = step(tokens)
                seq.append(tokens.clone())
                outs.append(out.clone())
        assert step.captured == (mode is StepMode.GRAPH)
        picked.append(torch.stack(seq))
        logits.append(torch.stack(outs))
    assert torch.equal(picked[1], picked[0])
    torch.testing.assert_close(logits[1].float(), logits[0].float(), **HIDDEN_TOLERANCE[dtype])


@cuda
def test_captured_step_rejects_another_shape():
    device = torch.device("cuda")
    step = CapturedStep(lambda x: x * 2, StepMode.GRAPH, device, warmup=0)
    assert torch.equal(step(torch.ones(3, device=device)), torch.full((3,), 2.0, device=device))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        step(torch.ones(4, device=device))


# ------------------------------------------------------------------------------------------------------------------
# Private rows kept across requests: a reply decoding alone reuses the one-row batch, and so the decode step (its
# CUDA graph on a GPU, its compiled code with StepMode.COMPILED), of an earlier reply of the same row length.

LONG_TEXT = "Tell me everything you know about the sea, the tides, the moon and the ships. " * 3


def text_omni(qwen_dir, mode: StepMode | None = None) -> Omni:
    config = tiny_config_dict(talker=False)
    model = random_model(config, "cpu", torch.float32, seed=9, audio_output=False)
    media = MediaOptions(AudioFeatureConfig(), VisionProcessorConfig())
    omni = Omni(parse_config(config), model, Tokenizer.from_dir(qwen_dir), qwen_dir, media)
    omni.private_rows = PrivateRows(model.thinker, mode=mode)
    return omni


def ask(omni: Omni, text: str, tokens: int) -> list[int]:
    return omni.generate([{"role": "user", "content": text}], max_new_tokens=tokens, do_sample=False,
                         stop_token_ids=[-1], return_audio=False).token_ids


def decode_steps(omni: Omni) -> list[CapturedStep]:
    """The decode steps (logits steps, and steps with a greedy pick fused in) of the kept private batches."""
    runners = [batch.runner for batch in omni.private_rows.idle]
    return [step for runner in runners for step in (*runner._steps.values(), *runner._picks.values())]


def test_private_rows_are_reused_across_generate_calls(qwen_dir):
    """A long reply, then a short one on the same Omni: one batch and one decode step serve both (its calls count
    both replies' steps), and the short reply's tokens are those of a fresh Omni (nothing of the long reply's cache
    leaks into it)."""
    omni = text_omni(qwen_dir)
    long_reply = ask(omni, LONG_TEXT, 12)
    short_reply = ask(omni, "Hi", 7)
    assert omni.private_rows.built == 1
    [step] = decode_steps(omni)
    assert step.calls == (12 - 1) + (7 - 1)  # the first token of each reply comes from its prefill
    assert short_reply == ask(text_omni(qwen_dir), "Hi", 7)
    assert long_reply == ask(text_omni(qwen_dir), LONG_TEXT, 12)
    assert len(set(long_reply)) > 2, "degenerate replies would prove little"


def test_private_rows_grow_by_length():
    """Row lengths are powers of two from PRIVATE_MIN_LEN, capped at the model's positions unless a request is
    longer; a length's batch is reused, another length gets its own."""
    assert private_length(1, 10_000) == private_length(PRIVATE_MIN_LEN, 10_000) == PRIVATE_MIN_LEN
    assert private_length(PRIVATE_MIN_LEN + 1, 10_000) == 2 * PRIVATE_MIN_LEN
    assert private_length(5000, 6000) == 6000 and private_length(7000, 6000) == 7000
    thinker = Thinker(parse_config(tiny_config_dict(talker=False)).thinker).eval()
    rows = PrivateRows(thinker)
    first = rows.take(10)
    rows.give_back(release(first))
    assert rows.take(20) is first and rows.built == 1
    other = rows.take(PRIVATE_MIN_LEN + 1)
    assert other is not first and other.max_len == 2 * PRIVATE_MIN_LEN and rows.built == 2
    kept = [rows.take(PRIVATE_MIN_LEN * 2 ** k) for k in range(PRIVATE_IDLE_LIMIT + 1)]  # lengths 1x, 2x, 4x ...
    for batch in kept:
        rows.give_back(release(batch))
    assert rows.idle == kept[-PRIVATE_IDLE_LIMIT:]  # at most PRIVATE_IDLE_LIMIT kept: the newest


def release(batch):
    batch.release(0)
    return batch


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_private_step_compiles_once_for_two_requests(qwen_dir):
    omni = text_omni(qwen_dir, StepMode.COMPILED)
    first, second = ask(omni, "Hi", 4), ask(omni, "Hello there", 4)
    [step] = decode_steps(omni)
    assert step.mode is StepMode.COMPILED and step.captures == 1 and step.calls == 2 * (4 - 1)
    eager = text_omni(qwen_dir)
    assert (first, second) == (ask(eager, "Hi", 4), ask(eager, "Hello there", 4))
