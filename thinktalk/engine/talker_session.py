"""One reply's talker: prefill once, then one codec frame per step, over a static KV cache.

    prefill(talker prompt) -> code0 of frame 0
    frame k:   complete()        code0_k + the code predictor's 15 residual codes  -> codes (16,)
               advance(text_k)   talker step on sum(16 codebook embeddings) + text_k -> code0 of frame k+1
A frame's codes need only the talker's state, not the next text token, so a frame leaves for Code2Wav before the
thinker has written the token the next talker step consumes. codebook 0 never takes the top 1,024 ids of the
talker vocabulary (control codes), except codec EOS, which ends the speech.
"""

from __future__ import annotations

import torch

from ..config import OmniConfig, SamplingConfig, code_predictor_sampling
from ..models.talker import Talker
from .kv_cache import CacheCursor, LayerCaches
from .sampler import Sampler
from .talker_prompt import TalkerPrefill

CONTROL_CODES = 1024  # the talker vocabulary's top ids are control codes, never sampled as audio


class TalkerSession:
    def __init__(self, talker: Talker, cfg: OmniConfig, prefill: TalkerPrefill, sampling: SamplingConfig,
                 seed: int | None = None):
        weight = talker.codec_head.weight
        self.talker, self.cfg, self.device = talker, cfg.talker, weight.device
        self.max_frames = sampling.max_new_tokens
        seq = prefill.embeds.shape[1]
        self.cache = LayerCaches(cfg.talker.text, 1, seq + self.max_frames + 1, weight.dtype, weight.device)
        self.cursor = CacheCursor(1, self.cache.max_len, weight.device)
        self.workspace = talker.code_predictor.workspace(1)
        vocab = cfg.talker.text.vocab_size
        suppress = torch.tensor([i for i in range(vocab - CONTROL_CODES, vocab) if i != cfg.talker.codec_eos_id],
                                device=weight.device)
        self.code0_sampler = Sampler(sampling, 1, vocab, weight.device, seed=seed, suppress_ids=suppress)
        residual_seed = None if seed is None else seed + 1
        self.residual_sampler = Sampler(code_predictor_sampling(sampling), 1, cfg.talker.code_predictor.vocab_size,
                                        weight.device, seed=residual_seed)
        self.frames = 0
        self._start(prefill)

    @torch.inference_mode()
    def _start(self, prefill: TalkerPrefill) -> None:
        seq = prefill.embeds.shape[1]
        lengths = torch.tensor([seq], device=self.device)
        slots = self.cursor.start(lengths, torch.tensor([prefill.rope_delta], device=self.device), seq)
        hidden, logits = self.talker(prefill.embeds, prefill.positions, None, self.cache, slots)
        self.hidden, self.code0 = hidden[:, -1], self.code0_sampler(logits[:, -1])

    @property
    def finished(self) -> bool:
        """The last sampled code0 is codec EOS, or the frame budget is spent (that token then gets no frame)."""
        return int(self.code0) == self.cfg.codec_eos_id or self.frames >= self.max_frames - 1

    @torch.inference_mode()
    def complete(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this frame's codes (1, groups), the codec part of the next input (1, hidden))."""
        assert not self.finished
        codes, codec_sum = self.talker.complete_frame(self.hidden, self.code0, self.workspace, self.residual_sampler)
        self.frames += 1
        return codes, codec_sum

    @torch.inference_mode()
    def advance(self, codec_sum: torch.Tensor, text_embed: torch.Tensor) -> None:
        """One talker step on the finished frame plus the text for it; samples the next frame's code0."""
        slots, positions, mask = self.cursor.step()
        hidden, logits = self.talker((codec_sum + text_embed).unsqueeze(1), positions, mask, self.cache, slots)
        self.hidden, self.code0 = hidden[:, -1], self.code0_sampler(logits[:, -1])
