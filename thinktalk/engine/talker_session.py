"""One reply's talker: prefill once, then one codec frame per step, over a static KV cache.

    prefill(talker prompt) -> code0 of frame 0
    frame k:   complete()        code0_k + the code predictor's 15 residual codes  -> codes (16,)
               advance(text_k)   talker step on sum(16 codebook embeddings) + text_k -> code0 of frame k+1
A frame's codes need only the talker's state, not the next text token, so a frame leaves for Code2Wav before the
thinker has written the token the next talker step consumes. codebook 0 never takes the top 1,024 ids of the
talker vocabulary (control codes), except codec EOS, which ends the speech.

Both per-frame steps are `CapturedStep`s (engine/graphs.py), in the session's `mode`:
    GRAPH (the default on CUDA)  the talker step is one CUDA graph, the whole 15-step code-predictor pass another
    COMPILED (CPU, opt in)       the code predictor's decoder-stack runs are compiled (two graphs: its 2-token
                                 prefill and its single-token step); lm heads, embeddings and the sampler stay eager,
                                 so a drawing sampler keeps its torch.Generator. The talker step stays eager: its
                                 cache length follows the prompt, so each new prompt length would recompile.
    EAGER (the default on CPU)   plain calls
All three compute the same codes (see tests/test_captured_steps.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..config import OmniConfig, SamplingConfig, code_predictor_sampling
from ..models.talker import Talker
from .graphs import CapturedStep, StepMode, default_mode
from ..layers.kv_cache import CacheCursor, LayerCaches
from ..layers.sampler import Sampler
from .talker_prompt import TalkerPrefill

CONTROL_CODES = 1024  # the talker vocabulary's top ids are control codes, never sampled as audio


@dataclass
class TalkerSamplers:
    """One reply's two batch-1 samplers: codebook 0 (the talker's logits: control codes suppressed, the talker's
    repetition penalty) and the residual codebooks (the code predictor's logits, its own top-k / top-p)."""

    code0: Sampler
    residual: Sampler


def talker_samplers(cfg: OmniConfig, sampling: SamplingConfig, seed: int | None,
                    device: torch.device) -> TalkerSamplers:
    """The samplers of one reply; a seed gives both their own reproducible streams (residual: seed + 1)."""
    vocab = cfg.talker.text.vocab_size
    suppress = torch.tensor([i for i in range(vocab - CONTROL_CODES, vocab) if i != cfg.talker.codec_eos_id],
                            device=device)
    code0 = Sampler(sampling, 1, vocab, device, seed=seed, suppress_ids=suppress)
    residual_seed = None if seed is None else seed + 1
    residual = Sampler(code_predictor_sampling(sampling), 1, cfg.talker.code_predictor.vocab_size, device,
                       seed=residual_seed)
    return TalkerSamplers(code0, residual)


def prefill_talker(talker: Talker, prefill: TalkerPrefill, cache: LayerCaches,
                   cursor: CacheCursor) -> tuple[torch.Tensor, torch.Tensor]:
    """The talker prompt through a batch-1 cache (from slot 0; the cursor then stands after it) -> (the last
    final-normed hidden state (1, hidden), the last codec logits (1, vocab))."""
    seq = prefill.embeds.shape[1]
    device = cursor.key_slots.device
    slots = cursor.start(torch.tensor([seq], device=device), torch.tensor([prefill.rope_delta], device=device), seq)
    hidden, logits = talker(prefill.embeds, prefill.positions, None, cache, slots)
    return hidden[:, -1], logits[:, -1]


class FramePass:
    """One session's code-predictor pass, frame after frame, over its own workspace (KV cache, positions).

    (talker hidden (batch, hidden), code0 (batch,)) -> (codes (batch, G), codec embedding sum (batch, hidden)).
    GRAPH captures the whole pass, sampler draws included; COMPILED compiles only the decoder-stack runs.
    """

    def __init__(self, talker: Talker, batch: int, sampler: Sampler, mode: StepMode):
        self.workspace = talker.code_predictor.workspace(batch)
        device = talker.model.codec_embedding.weight.device
        run_stack = None
        if mode is StepMode.COMPILED:
            run_stack = CapturedStep(talker.code_predictor.run_stack, mode, device)
            mode = StepMode.EAGER
        # A partial, not a bound method of this object: no reference cycle keeps a captured graph's memory alive
        # after the session is dropped.
        frame = partial(talker.complete_frame, ws=self.workspace, sampler=sampler, run_stack=run_stack)
        self.step = CapturedStep(frame, mode, device, generators=[sampler.generator])

    def __call__(self, hidden: torch.Tensor, code0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs follow CapturedStep's lifetime rule: valid until the next call."""
        return self.step(hidden, code0)


class TalkerStep:
    """One talker decode step over a session's cache: (codec_sum, text_embed), (1, hidden) each, -> (the final-normed
    hidden state (1, hidden), the next frame's code0 (1,)). Static shapes, no host synchronisation."""

    def __init__(self, talker: Talker, cache: LayerCaches, cursor: CacheCursor, sampler: Sampler):
        self.talker, self.cache, self.cursor, self.sampler = talker, cache, cursor, sampler

    def __call__(self, codec_sum: torch.Tensor, text_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots, positions, mask = self.cursor.step()
        hidden, logits = self.talker((codec_sum + text_embed).unsqueeze(1), positions, mask, self.cache, slots)
        return hidden[:, -1], self.sampler(logits[:, -1])


class TalkerSession:
    """mode: how the per-frame steps run (engine/graphs.py: StepMode); None = the device's default."""

    def __init__(self, talker: Talker, cfg: OmniConfig, prefill: TalkerPrefill, sampling: SamplingConfig,
                 seed: int | None = None, mode: StepMode | None = None):
        weight = talker.model.codec_embedding.weight  # device and dtype (an embedding is never quantized)
        self.talker, self.cfg, self.device = talker, cfg.talker, weight.device
        self.mode = default_mode(self.device) if mode is None else mode
        self.max_frames = sampling.max_new_tokens
        seq = prefill.embeds.shape[1]
        self.cache = LayerCaches(cfg.talker.text, 1, seq + self.max_frames + 1, weight.dtype, weight.device)
        self.cursor = CacheCursor(1, self.cache.max_len, weight.device)
        samplers = talker_samplers(cfg, sampling, seed, weight.device)
        self.code0_sampler, self.residual_sampler = samplers.code0, samplers.residual
        self.frame_pass = FramePass(talker, 1, self.residual_sampler, self.mode)
        # Compiled, the talker step would recompile for every prompt length (its cache length): kept eager.
        step_mode = StepMode.EAGER if self.mode is StepMode.COMPILED else self.mode
        self.step = CapturedStep(TalkerStep(talker, self.cache, self.cursor, self.code0_sampler), step_mode,
                                 self.device, generators=[self.code0_sampler.generator])
        self.frames = 0
        self._start(prefill)

    @torch.inference_mode()
    def _start(self, prefill: TalkerPrefill) -> None:
        self.hidden, logits = prefill_talker(self.talker, prefill, self.cache, self.cursor)
        self.code0 = self.code0_sampler(logits)
        self.last_code0 = int(self.code0)  # the host's copy (one sync per step, in the step's caller)

    @property
    def finished(self) -> bool:
        """The last sampled code0 is codec EOS, or the frame budget is spent (that token then gets no frame).
        Reads the host copy: no device work."""
        return self.last_code0 == self.cfg.codec_eos_id or self.frames >= self.max_frames - 1

    @torch.inference_mode()
    def complete(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this frame's codes (1, groups), the codec part of the next input (1, hidden)). Both are the
        caller's to keep (clones of a captured pass's static outputs)."""
        assert not self.finished
        codes, codec_sum = self.frame_pass(self.hidden, self.code0)
        self.frames += 1
        return codes.clone(), codec_sum.clone()

    @torch.inference_mode()
    def advance(self, codec_sum: torch.Tensor, text_embed: torch.Tensor) -> int:
        """One talker step on the finished frame plus the text for it; samples the next frame's code0 (returned).
        codec_sum, text_embed: (1, hidden). The session keeps the step's outputs only until the next step."""
        self.hidden, self.code0 = self.step(codec_sum, text_embed)
        self.last_code0 = int(self.code0)
        return self.last_code0

    def close(self) -> None:
        """Nothing shared to give back: the caches go with this object (a leased row's close frees the row)."""
