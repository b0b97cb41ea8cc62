"""The talker: a small MoE decoder that speaks what the thinker writes, one codec frame per step.

    thinker embeddings / hidden states --text_projection / hidden_projection--> talker width (built by the caller)
    inputs_embeds (batch, seq, hidden), TM-RoPE positions (3, batch, seq)
      -> model: [attention + sparse MoE with shared expert] * num_layers -> RMSNorm   -> hidden (batch, seq, hidden)
      -> codec_head                                                                 -> logits (batch, seq, vocab)

A decode step turns the logits into codebook 0 of a frame; the code predictor adds codebooks 1 .. G-1 from the
step's hidden state; the next step's input is the sum of the frame's G codebook embeddings plus the text embedding
of the next thinker token (or tts_pad once the text has run out), which the caller adds.
"""

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig, TalkerConfig
from ..layers.kv_cache import LayerCaches
from ..layers.sampler import Sampler
from ..layers.decoder import DecoderStack
from .code_predictor import CodePredictor, PredictorWorkspace, StackRun


class ResizeMLP(nn.Module):
    """linear_fc2(SiLU(linear_fc1(x))): maps thinker-width vectors to the talker's width."""

    def __init__(self, in_size: int, intermediate_size: int, out_size: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(in_size, intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(intermediate_size, out_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class TalkerModel(DecoderStack):
    """The talker's decoder stack plus its codec-token embedding (codebook 0 and the control codes)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


def _every_layer_sparse(cfg: DecoderConfig) -> DecoderConfig:
    """The reference builds every talker layer as a sparse MoE block, whatever mlp_only_layers and
    decoder_sparse_step say (the released config has [] and 1, so nothing changes there)."""
    if cfg.moe is None:
        raise ValueError("the talker's text_config must configure experts (num_experts / num_local_experts)")
    return replace(cfg, moe=replace(cfg.moe, decoder_sparse_step=1, mlp_only_layers=()))


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        text = _every_layer_sparse(cfg.text)
        self.model = TalkerModel(text)
        self.codec_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.text_projection = ResizeMLP(cfg.thinker_hidden_size, text.intermediate_size, text.hidden_size)
        self.hidden_projection = ResizeMLP(cfg.thinker_hidden_size, text.intermediate_size, text.hidden_size)
        self.code_predictor = CodePredictor(cfg)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerCaches | None = None,
                slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefill or decode step.

        inputs_embeds: (batch, seq, hidden); positions: (3, batch, seq) TM-RoPE ids (T, H, W);
        mask: (batch, 1, seq, keys) bool, True = may attend (required with a cache; None = causal within seq);
        cache/slots: the static KV cache and the (batch, seq) slots the new tokens are written to.
        Returns the final-normed hidden states (batch, seq, hidden), which the code predictor reads, and the
        codec logits (batch, seq, vocab).
        """
        hidden, _ = self.model.run_layers(inputs_embeds, positions, mask, cache, slots)
        return hidden, self.codec_head(hidden)

    def embed_codec(self, ids: torch.Tensor) -> torch.Tensor:
        """Codec ids (codebook 0, bos/pad/eos, speaker ids...) -> talker input embeddings."""
        return self.model.codec_embedding(ids)

    def complete_frame(self, hidden: torch.Tensor, code0: torch.Tensor, ws: PredictorWorkspace,
                       sampler: Sampler, run_stack: StackRun | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: (batch, hidden) the step's last hidden state; code0: (batch,) the codebook-0 code it chose;
        run_stack: how the code predictor runs its decoder stack (see CodePredictor.predict).

        Returns the frame's codes (batch, G) and the codec part of the next talker input (batch, hidden): the sum
        of all G codebook embeddings. The caller adds the text embedding for the next step.
        """
        code0_embed = self.embed_codec(code0)
        residual, residual_embed = self.code_predictor.predict(hidden, code0_embed, ws, sampler, run_stack)
        return torch.cat((code0.unsqueeze(1), residual), dim=1), code0_embed + residual_embed
