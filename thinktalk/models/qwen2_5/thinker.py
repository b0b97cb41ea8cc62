"""Qwen2.5-Omni's Thinker: audio and vision encoders feeding a dense Qwen2.5 decoder with TM-RoPE.

    token ids --embed_tokens--> (batch, seq, hidden) --[media embeddings placed at their pad tokens]-->
    DecoderStack (biased q/k/v, no q/k norm, contiguous TM-RoPE) --> norm --> lm_head --> logits

Module names match the checkpoint: thinker.model.{embed_tokens, layers, norm}, thinker.lm_head (absent when the
config ties it to embed_tokens), thinker.audio_tower, thinker.visual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...config_qwen2_5 import Qwen25ThinkerConfig
from ..thinker import ThinkerTextModel
from .audio_encoder import Qwen25AudioEncoder
from .vision_encoder import Qwen25VisionEncoder

if TYPE_CHECKING:
    from ...layers.kv_cache import LayerCaches


@dataclass
class MediaEmbeds:
    """Encoder outputs for one prompt batch, each kind in prompt order (batch rows in order, left to right).

    With audio in a video the video's and its sound's tokens interleave in the prompt; each kind still fills its own
    placeholders in order, so the video's tokens go in `video` and its sound's in `audio`."""

    audio: torch.Tensor | None = None  # (audio tokens, hidden)
    image: torch.Tensor | None = None  # (image tokens, hidden)
    video: torch.Tensor | None = None  # (video tokens, hidden)


@dataclass
class ThinkerOutput:
    logits: torch.Tensor  # (batch, seq, vocab), or (batch, vocab) with `logits_at`
    hidden: torch.Tensor  # (batch, seq, hidden): final-normed hidden states, what the talker is fed


class Qwen25Thinker(nn.Module):
    def __init__(self, cfg: Qwen25ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.audio_tower = Qwen25AudioEncoder(cfg.audio)
        self.visual = Qwen25VisionEncoder(cfg.vision)
        self.model = ThinkerTextModel(cfg.text)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size,
                                                                      bias=False)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def embed_prompt(self, token_ids: torch.Tensor, media: MediaEmbeds) -> torch.Tensor:
        """token_ids (batch, seq) -> (batch, seq, hidden): token embeddings, each media placeholder replaced by the
        next row of its kind's encoder output. A count mismatch is an error naming the kind."""
        embeds = self.embed(token_ids)
        layout = self.cfg.layout
        for kind, token, rows in (("audio", layout.audio_token_id, media.audio),
                                  ("image", layout.image_token_id, media.image),
                                  ("video", layout.video_token_id, media.video)):
            where = token_ids == token
            count = int(where.sum())
            given = 0 if rows is None else rows.shape[0]
            if count != given:
                raise ValueError(f"the prompt has {count} {kind} placeholder tokens but the {kind} encoder gave "
                                 f"{given} embeddings")
            if count:
                embeds = embeds.masked_scatter(where.unsqueeze(-1), rows.to(embeds.dtype))
        return embeds

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, *, mask: torch.Tensor | None = None,
                cache: "LayerCaches | None" = None, slots: torch.Tensor | None = None, key_len: int | None = None,
                logits_at: torch.Tensor | None = None) -> ThinkerOutput:
        """embeds: (batch, seq, hidden); positions: (3, batch, seq) TM-RoPE ids; mask (batch, 1, seq, keys) bool
        (required with a cache); cache/slots/key_len as in layers/decoder.py. With `logits_at` (batch,) only that
        position's logits per row are computed: (batch, vocab)."""
        hidden, _ = self.model.run_layers(embeds, positions, mask=mask, cache=cache, slots=slots, key_len=key_len)
        if logits_at is None:
            return ThinkerOutput(self.head(hidden), hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return ThinkerOutput(self.head(hidden[rows, logits_at]), hidden)
