"""One Qwen2.5-Omni stream's speech: the talker speaking the reply as the thinker writes it, and Token2Wav turning
its codec tokens into a 24 kHz wave block by block as they come.

    speech = Qwen25SpeechRun(model, plan, thinker_run, first_token, first_part)   the talker's prefill -> code 0
    speech.push_part(part) / speech.text_finished()     reply parts as the thinker makes them, then its end
    while speech.can_step: wave = speech.step()          one codec token: into Token2Wav (a wave piece, often
                                                         empty), then one talker step for the next one
Text leads speech: step k reads reply part k, which the thinker's decode step k made; `can_step` is False while
that part does not exist yet. After the reply's parts the talker reads tts_text_end once, then tts_text_pad
(models/qwen2_5/talker.py's ReplyFeed). The speech ends at a stop code (codec pad or end, as the reference's
eos list), at its code budget, or at the runaway guard's bound (requests.GUARD_*), and then Token2Wav flushes.

Streaming Token2Wav (models/qwen2_5/token2wav.py): the first wave comes once a chunk of DiT blocks and its
look-ahead block of tokens has arrived (48 codes, about 1 s of speech, at the released sizes; a smaller first
chunk would not help: BigVGAN's right context is 45 mel frames, so a chunk of 1 block could give no samples and one of
2 blocks 3 frames); it equals the
one-shot decode from the same initial noise (`BlockNoise`, seeded by the request) for a reply that fits the first
window, and differs from it by the tokens outside each window otherwise (measured in tests/test_qwen2_5_omni.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import SamplingConfig
from ..config_qwen2_5 import Qwen25OmniConfig
from ..layers.kv_cache import LayerCaches
from ..layers.sampler import Sampler
from ..models.qwen2_5.omni import Qwen25OmniModel
from ..models.qwen2_5.talker import ReplyFeed, TalkerPrompt, talker_prompt_inputs
from ..models.qwen2_5.token2wav import BlockNoise
from ..models.qwen2_5.voices import Voice
from ..processing.qwen2_5_positions import qwen2_5_rope_positions
from ..requests import GUARD_MARGIN_SECONDS, GUARD_SECONDS_PER_TEXT_TOKEN
from .qwen2_5_thinker import Qwen25ThinkerRun


@dataclass(frozen=True)
class Qwen25SpeechPlan:
    """A request's speech resolved against the checkpoint."""

    voice: Voice
    sampling: SamplingConfig  # the talker's
    max_codes: int  # the hard budget of codec tokens
    guarded: bool  # no budget was asked for: the runaway guard bounds the codes by the text
    talker_seed: int | None
    noise_seed: int  # Token2Wav's initial noise


def codes_per_second(cfg: Qwen25OmniConfig) -> float:
    """Codec tokens per second of speech (50 at the released sizes: 2 mel frames of 240 samples at 24 kHz)."""
    t2w = cfg.token2wav
    return t2w.sample_rate / (t2w.dit.repeats * t2w.bigvgan.samples_per_frame)


def guard_codes(cfg: Qwen25OmniConfig, text_tokens: int) -> int:
    return math.ceil((GUARD_SECONDS_PER_TEXT_TOKEN * text_tokens + GUARD_MARGIN_SECONDS) * codes_per_second(cfg))


def unspeakable_codes(cfg: Qwen25OmniConfig, device: torch.device) -> torch.Tensor:
    """Codes the talker must not choose: codec bos (as the reference suppresses it), and every id past the DiT's
    codec table but the two stop codes. A trained talker never picks those (the reference would index past its table
    if it did: IndexError); a random-weight one does, and Token2Wav could not say them."""
    talker, renderable = cfg.talker, cfg.token2wav.dit.num_embeds  # ids 0..num_embeds have a DiT embedding
    ids = [talker.codec_bos_id] + [code for code in range(renderable + 1, talker.text.vocab_size)
                                   if code not in talker.stop_ids and code != talker.codec_bos_id]
    return torch.tensor(ids, device=device)


class Qwen25SpeechRun:
    @torch.inference_mode()
    def __init__(self, model: Qwen25OmniModel, plan: Qwen25SpeechPlan, thinker: Qwen25ThinkerRun, first_token: int,
                 first_part: torch.Tensor):
        self.model, self.plan, self.cfg = model, plan, model.cfg
        talker, cfg = model.talker, model.cfg.talker
        device = first_part.device

        def text(token: int) -> torch.Tensor:
            return model.thinker.embed(torch.tensor([token], device=device))[0]

        def codec(code: int) -> torch.Tensor:
            return talker.embed_codec(torch.tensor(code, device=device))

        inputs = talker_prompt_inputs(thinker.token_embeds, thinker.prompt_hidden, thinker.media_rows,
                                      text(plan.voice.bos_token), first_part, codec(cfg.codec_pad_id),
                                      codec(cfg.codec_bos_id))
        ids = list(thinker.prompt.token_ids) + [plan.voice.bos_token, first_token]
        positions, delta = qwen2_5_rope_positions(ids, thinker.prompt.layout, cfg.layout,
                                                  thinker.prompt.use_audio_in_video)
        self.feed = ReplyFeed(eos=text(cfg.text_eos_id), pad=text(cfg.text_pad_id))
        cache = LayerCaches(cfg.text, 1, inputs.shape[0] + plan.max_codes, inputs.dtype, device)
        self.state, logits = talker.start(TalkerPrompt(inputs, positions.to(device), delta), cache)
        self.sampler = Sampler(plan.sampling, 1, cfg.text.vocab_size, device, seed=plan.talker_seed,
                               suppress_ids=unspeakable_codes(self.cfg, device))
        # The reference's repetition penalty also counts its talker input ids: codec mask, pad and bos.
        self.sampler.observe(torch.tensor([[cfg.codec_mask_id, cfg.codec_pad_id, cfg.codec_bos_id]], device=device))
        noise = BlockNoise(self.cfg.token2wav.dit.mel_dim, self.cfg.token2wav.dit.block_size, plan.noise_seed,
                           device)
        self.token2wav = model.token2wav.stream(plan.voice, noise)
        self.codes: list[int] = []  # content codes, in Token2Wav
        self.code = self._pick(logits)  # the newest code, not yet in Token2Wav
        self.text_tokens = 0  # the reply's text tokens so far (the guard's measure)
        self.finish_reason: str | None = None  # "stop" or "length" once the speech has ended

    def push_part(self, part: torch.Tensor) -> None:
        self.feed.push(part)

    def text_finished(self, text_tokens: int) -> None:
        self.text_tokens = text_tokens
        self.feed.finish()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def can_step(self) -> bool:
        """The newest code can go in: its wave piece, and the step after it has its text part (or the speech ends)."""
        return not self.done and (bool(self.feed.parts) or self.feed.finished)

    @torch.inference_mode()
    def step(self) -> np.ndarray:
        """One codec token into Token2Wav, then the talker's next one -> the wave made final meanwhile."""
        assert self.can_step, "no text part for the talker's next step"
        if self.code in self.cfg.talker.stop_ids:
            return self._end("stop")
        self.codes.append(self.code)
        wave = self.token2wav.push([self.code])
        if self._spent():
            return np.concatenate([_host(wave), self._end("length")])
        logits = self.model.talker.step(self.state, torch.tensor(self.code, device=wave.device),
                                        self.feed.next_part())
        self.code = self._pick(logits)
        return _host(wave)

    def _spent(self) -> bool:
        over = len(self.codes) >= self.plan.max_codes
        guard = self.plan.guarded and self.feed.finished and len(self.codes) >= guard_codes(self.cfg, self.text_tokens)
        return over or guard

    def _pick(self, logits: torch.Tensor) -> int:
        return int(self.sampler(logits.unsqueeze(0))[0])

    def _end(self, reason: str) -> np.ndarray:
        self.finish_reason = reason
        return _host(self.token2wav.finish())


def _host(wave: torch.Tensor) -> np.ndarray:
    return wave.detach().float().cpu().numpy().astype(np.float32, copy=False)
