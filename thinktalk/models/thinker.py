"""The Thinker: audio and vision encoders feeding a sparse-MoE language model with TM-RoPE.

    token ids --embed_tokens--> (batch, seq, hidden) --[media embeddings placed at their pad tokens]-->
    DecoderStack (deepstack visual features added after the first layers) --> norm --> lm_head --> logits

Module names match the checkpoint: thinker.model.{embed_tokens, layers, norm}, thinker.lm_head,
thinker.audio_tower, thinker.visual.
"""

import torch
from torch import nn

from ..config import DecoderConfig, ThinkerConfig
from ..layers.decoder import DecoderStack, LayerHook
from .audio_encoder import AudioEncoder
from .vision_encoder import VisionEncoder


class ThinkerTextModel(DecoderStack):
    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.audio_tower = AudioEncoder(cfg.audio)
        self.visual = VisionEncoder(cfg.vision)
        self.model = ThinkerTextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, *, mask: torch.Tensor | None = None,
                cache=None, slots: torch.Tensor | None = None, key_len: int | None = None,
                after_layer: LayerHook | None = None, keep_hidden: int | None = None,
                logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """embeds: (batch, seq, hidden); positions: (3, batch, seq).

        Returns (logits, final hidden states, hidden states after `keep_hidden` layers or None). With
        `logits_at` (batch,) only the logits of that position per row are computed: (batch, vocab).
        """
        hidden, kept = self.model.run_layers(embeds, positions, mask=mask, cache=cache, slots=slots,
                                             key_len=key_len, after_layer=after_layer, keep_hidden=keep_hidden)
        if logits_at is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return self.lm_head(hidden[rows, logits_at]), hidden, kept
        return self.lm_head(hidden), hidden, kept
