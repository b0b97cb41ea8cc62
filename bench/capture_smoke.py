"""A capture smoke test for the device run (bench/gpu_run.py): the thinker's decode step and a talker session, run
in a step mode (a CUDA graph on a GPU) against eager steps on the same weights, in bf16.

Per network: the tokens (thinker) or codes (talker) of the captured run must equal the eager run's, the captured
steps must really be captured, and the MoE path the experts took is reported (GROUPED, F.grouped_mm, on sm90 and
sm100 in bf16: the path that the float32 tests never capture). Cheap: a few steps on a small model, so it runs
before the full-size build, at the tiny widths and at the released widths with one layer per stack.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from thinktalk.config import SamplingConfig, parse_config
from thinktalk.engine.graphs import WARMUP_CALLS, StepMode
from thinktalk.engine.talker_prompt import TalkerPrefill
from thinktalk.engine.talker_session import TalkerSession
from thinktalk.engine.thinker_runner import ThinkerRunner, text_prefill_inputs
from thinktalk.layers.moe import choose_path
from thinktalk.layers.sampler import Sampler
from thinktalk.random_weights import random_model

STEPS = WARMUP_CALLS + 4  # eager warm-up calls, the capture, then replays
PROMPT = 7  # talker prompt positions (random embeddings)
SEED = 7


@dataclass(frozen=True)
class SmokeResult:
    name: str  # "thinker" or "talker"
    same: bool  # the step mode's tokens / codes equal eager ones
    captured: bool  # every step of the session or runner was captured (GRAPH) or compiled (COMPILED)
    detail: str


def one_layer(config: dict) -> dict:
    """The config with one layer in the thinker, the talker and the code predictor (widths unchanged)."""
    config = copy.deepcopy(config)
    config["thinker_config"]["text_config"]["num_hidden_layers"] = 1
    talker = config.get("talker_config")
    if talker is not None:
        talker["accept_hidden_layer"] = 1
        talker["text_config"]["num_hidden_layers"] = 1
        predictor = talker["code_predictor_config"]
        predictor["num_hidden_layers"] = 1
        if predictor.get("layer_types"):
            predictor["layer_types"] = predictor["layer_types"][:1]
    return config


def thinker_tokens(model, mode: StepMode, device: torch.device) -> tuple[list[list[int]], bool]:
    thinker = model.thinker
    prompts = torch.randint(0, thinker.cfg.text.vocab_size, (2, 5), generator=torch.Generator().manual_seed(SEED))
    runner = ThinkerRunner(thinker, 2, 5 + STEPS + 1, mode=mode)
    sampler = Sampler(SamplingConfig(), 2, thinker.cfg.text.vocab_size, device)
    with torch.inference_mode():
        tokens = sampler(runner.prefill(text_prefill_inputs(thinker, prompts.tolist(), device))[0])
        picked = [tokens.tolist()]
        for _ in range(STEPS):
            tokens = runner.decode_and_sample(tokens, sampler)
            picked.append(tokens.tolist())
    steps = [*runner._steps.values(), *runner._picks.values()]
    return picked, all(step.captures == 1 for step in steps) and bool(steps)


def talker_codes(model, cfg, mode: StepMode, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    hidden = cfg.talker.text.hidden_size
    gen = torch.Generator().manual_seed(SEED)
    positions = torch.arange(PROMPT, dtype=torch.float32).view(1, 1, -1).expand(3, 1, PROMPT)
    prefill = TalkerPrefill(torch.randn(1, PROMPT, hidden, generator=gen).to(device, dtype), positions.to(device),
                            0.0, torch.randn(3, hidden, generator=gen).to(device, dtype))
    texts = torch.randn(STEPS, 1, hidden, generator=gen).to(device, dtype)
    session = TalkerSession(model.talker, cfg, prefill, SamplingConfig(max_new_tokens=STEPS + 2), mode=mode)
    codes = []
    for text in texts:
        if session.finished:
            break
        frame, codec_sum = session.complete()
        codes.append(frame)
        session.advance(codec_sum, text)
    steps = [session.step, session.frame_pass.step]
    if mode is StepMode.COMPILED:  # the talker step stays eager there; the pass compiles its decoder-stack runs
        steps = [session.frame_pass.step]
    captured = all(s.captures == 1 for s in steps) if mode is StepMode.GRAPH else mode is not StepMode.EAGER
    return torch.cat(codes), captured


def smoke(config: dict, device: torch.device, dtype: torch.dtype, mode: StepMode) -> list[SmokeResult]:
    """The thinker's and (when the config has one) the talker's steps in `mode` against eager. Raises whatever a
    capture raises: the caller reports it and falls back to eager steps."""
    model = random_model(config, device, dtype, SEED)
    cfg = parse_config(config)
    probe = torch.zeros(1, cfg.thinker.text.hidden_size, device=device, dtype=dtype)
    path = choose_path(probe).value
    eager, _ = thinker_tokens(model, StepMode.EAGER, device)
    ours, captured = thinker_tokens(model, mode, device)
    results = [SmokeResult("thinker", ours == eager, captured,
                           f"{STEPS} decode steps of 2 rows, {mode.value} vs eager; MoE path {path}")]
    if model.talker is not None:
        eager_codes, _ = talker_codes(model, cfg, StepMode.EAGER, device, dtype)
        codes, captured = talker_codes(model, cfg, mode, device, dtype)
        results.append(SmokeResult("talker", torch.equal(codes, eager_codes), captured,
                                   f"{codes.shape[0]} frames, {mode.value} vs eager"))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results
