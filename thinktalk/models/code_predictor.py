"""The code predictor (multi-token prediction module): the 15 residual codebooks of one codec frame.

The talker predicts codebook 0 of a frame. The code predictor then runs a short causal pass of its own, fresh for
every frame (its KV cache restarts at position 0), with plain 1-D RoPE:

    position   0                  1                   2                        ...  G-1
    input      talker hidden h    embed_talker(c0)    codec_embedding[0](c1)   ...  codec_embedding[G-3](c_{G-2})
    predicts   -                  c1 = lm_head[0]     c2 = lm_head[1]          ...  c_{G-1} = lm_head[G-2]

(G = num_code_groups = 16.) Positions 0 and 1 are one 2-token prefill, then G-2 single-token steps. The last code
c_{G-1} is never fed back, so the pass holds exactly G tokens. The talker's next input is the sum of all G
codebook embeddings, embed_talker(c0) + sum_g codec_embedding[g-1](c_g), plus a text embedding the caller adds.

`PredictorWorkspace` preallocates the KV cache, positions and masks once per batch size; a frame's pass then has
static shapes, reallocates no cache and does not synchronise with the host, so the whole 15-step pass
can be captured as one CUDA graph.
"""

import torch
from torch import nn

from ..config import TalkerConfig
from ..engine.kv_cache import LayerCaches
from ..engine.sampler import Sampler
from ..layers.decoder import DecoderStack


class CodePredictorModel(DecoderStack):
    """The decoder stack plus one input embedding per residual codebook (codebooks 1 .. G-1)."""

    def __init__(self, cfg: TalkerConfig):
        super().__init__(cfg.code_predictor)
        hidden, vocab = cfg.code_predictor.hidden_size, cfg.code_predictor.vocab_size
        self.codec_embedding = nn.ModuleList(nn.Embedding(vocab, hidden) for _ in range(cfg.num_code_groups - 1))


class PredictorWorkspace:
    """What one frame's pass reuses: the KV cache, token positions and causal masks, (batch, ...) each."""

    def __init__(self, cfg: TalkerConfig, batch: int, dtype: torch.dtype, device: torch.device):
        length = cfg.num_code_groups  # talker hidden + codebooks 0 .. G-2
        self.cache = LayerCaches(cfg.code_predictor, batch, length, dtype, device)
        self.positions = torch.arange(length, device=device).expand(batch, length)  # (batch, length)
        # (batch, 1, length, length): token t attends tokens 0..t; later slots hold the previous frame's stale keys
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        self.causal = causal.expand(batch, 1, length, length)
        self.batch = batch


class CodePredictor(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        if cfg.code_predictor.hidden_size != cfg.text.hidden_size:
            raise ValueError(f"code predictor hidden_size ({cfg.code_predictor.hidden_size}) must equal the talker's "
                             f"({cfg.text.hidden_size}): it reads the talker's hidden state directly")
        self.cfg = cfg
        self.model = CodePredictorModel(cfg)
        hidden, vocab = cfg.code_predictor.hidden_size, cfg.code_predictor.vocab_size
        self.lm_head = nn.ModuleList(nn.Linear(hidden, vocab, bias=False) for _ in range(cfg.num_code_groups - 1))

    def workspace(self, batch: int, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> PredictorWorkspace:
        weight = self.lm_head[0].weight
        return PredictorWorkspace(self.cfg, batch, dtype or weight.dtype, device or weight.device)

    def _run(self, x: torch.Tensor, ws: PredictorWorkspace, start: int) -> torch.Tensor:
        """x: (batch, n, hidden) at positions start.. -> final-normed hidden of the last of them, (batch, hidden)."""
        end = start + x.shape[1]
        positions = ws.positions[:, start:end]
        mask = ws.causal[:, :, start:end]
        hidden, _ = self.model.run_layers(x, positions, mask, ws.cache, slots=positions)
        return hidden[:, -1]

    def predict(self, talker_hidden: torch.Tensor, code0_embed: torch.Tensor, ws: PredictorWorkspace,
                sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebooks 1 .. G-1 of one frame.

        talker_hidden: (batch, hidden) the talker's final-normed hidden state at the token that produced c0;
        code0_embed: (batch, hidden) the talker's codec embedding of c0;
        sampler: picks each code from (batch, vocab) logits (greedy, or the reference's top_k 50 / top_p 0.8 draw;
        give it no repetition penalty: the reference's code predictor has none).
        Returns codes (batch, G-1) and the sum of their input embeddings (batch, hidden).
        """
        h = self._run(torch.stack((talker_hidden, code0_embed), dim=1), ws, 0)  # prefill: positions 0, 1
        codes, embed_sum = [], torch.zeros_like(code0_embed)
        for g in range(1, self.cfg.num_code_groups):
            code = sampler(self.lm_head[g - 1](h))  # (batch,)
            embed = self.model.codec_embedding[g - 1](code)  # (batch, hidden)
            codes.append(code)
            embed_sum = embed_sum + embed
            if g < self.cfg.num_code_groups - 1:  # the last code is never fed back
                h = self._run(embed.unsqueeze(1), ws, g + 1)
        return torch.stack(codes, dim=1), embed_sum

