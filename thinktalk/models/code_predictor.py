"""The code predictor (multi-token prediction module): the 15 residual codebooks of one codec frame.

The talker predicts codebook 0 of a frame. The code predictor then runs a short causal pass of its own, fresh for
every frame (its KV cache restarts at position 0), with plain 1-D RoPE:

    position   0                  1                   2                        ...  G-1
    input      talker hidden h    embed_talker(c0)    codec_embedding[0](c1)   ...  codec_embedding[G-3](c_{G-2})
    predicts   -                  c1 = lm_head[0]     c2 = lm_head[1]          ...  c_{G-1} = lm_head[G-2]

(G = num_code_groups = 16.) Positions 0 and 1 are one 2-token prefill, then G-2 single-token steps. The last code
c_{G-1} is never fed back, so the pass holds exactly G tokens. The talker's next input is the sum of all G
codebook embeddings, embed_talker(c0) + sum_g codec_embedding[g-1](c_g), plus a text embedding the caller adds.

`PredictorWorkspace` preallocates the KV cache and positions once per batch size; a frame's pass then has static
shapes, reallocates no cache and does not synchronise with the host, so the whole 15-step pass can be captured as
one CUDA graph (engine/talker_session.py: FramePass), and its decoder-stack runs compile to two graphs.
"""

from collections.abc import Callable

import torch
from torch import nn

from ..config import TalkerConfig
from ..layers.kv_cache import LayerCaches
from ..layers.sampler import Sampler
from ..layers.decoder import DecoderStack

# (x (batch, n, hidden), positions (batch, n), workspace) -> the last token's final-normed hidden (batch, hidden)
StackRun = Callable[[torch.Tensor, torch.Tensor, "PredictorWorkspace"], torch.Tensor]


class CodePredictorModel(DecoderStack):
    """The decoder stack plus one input embedding per residual codebook (codebooks 1 .. G-1)."""

    def __init__(self, cfg: TalkerConfig):
        super().__init__(cfg.code_predictor)
        hidden, vocab = cfg.code_predictor.hidden_size, cfg.code_predictor.vocab_size
        self.codec_embedding = nn.ModuleList(nn.Embedding(vocab, hidden) for _ in range(cfg.num_code_groups - 1))


class PredictorWorkspace:
    """What one frame's pass reuses: the KV cache and the token positions of each of its runs, (batch, ...) each.

    Position t is also cache slot t, and token t attends slots 0..t (later slots hold the previous frame's stale
    keys). Every run gets its positions as a tensor of its own, so a compiled run is one graph for all 14 steps.
    """

    def __init__(self, cfg: TalkerConfig, batch: int, dtype: torch.dtype, device: torch.device):
        length = cfg.num_code_groups  # talker hidden + codebooks 0 .. G-2
        self.cache = LayerCaches(cfg.code_predictor, batch, length, dtype, device)
        self.key_slots = torch.arange(length, device=device)  # (length,)
        positions = self.key_slots.expand(batch, length)
        self.prefill_positions = positions[:, :2].clone()  # (batch, 2): the talker hidden and code0
        # (batch, 1) per position g; single-token step inputs (code g-1 fed back) use g = 2 .. G-1
        self.step_positions = [positions[:, g:g + 1].clone() for g in range(length)]
        self.batch = batch

    def first_rows(self, rows: int) -> "PredictorWorkspace":
        """The same memory seen as a workspace of rows [0, rows) (views, no copy): a pass over the leading rows of
        a shared batch (engine/talker_batch.py) reads and writes only those rows."""
        assert 1 <= rows <= self.batch, (rows, self.batch)
        if rows == self.batch:
            return self
        view = object.__new__(PredictorWorkspace)  # no allocation: the views share this workspace's memory
        view.cache, view.key_slots, view.batch = self.cache.first_rows(rows), self.key_slots, rows
        view.prefill_positions = self.prefill_positions[:rows]
        view.step_positions = [p[:rows] for p in self.step_positions]
        return view


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
        weight = self.model.codec_embedding[0].weight  # device and dtype (an embedding is never quantized)
        return PredictorWorkspace(self.cfg, batch, dtype or weight.dtype, device or weight.device)

    def run_stack(self, x: torch.Tensor, positions: torch.Tensor, ws: PredictorWorkspace) -> torch.Tensor:
        """x: (batch, n, hidden) at positions (batch, n), which are also its cache slots -> the final-normed hidden
        state of the last of them, (batch, hidden). Static shapes and no host sync: it compiles to one graph per n."""
        batch, n = positions.shape
        mask = ws.key_slots.view(1, 1, 1, -1) <= positions.view(batch, 1, n, 1)  # (batch, 1, n, length) causal
        hidden, _ = self.model.run_layers(x, positions, mask, ws.cache, slots=positions)
        return hidden[:, -1]

    def predict(self, talker_hidden: torch.Tensor, code0_embed: torch.Tensor, ws: PredictorWorkspace,
                sampler: Sampler, run_stack: StackRun | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebooks 1 .. G-1 of one frame.

        talker_hidden: (batch, hidden) the talker's final-normed hidden state at the token that produced c0;
        code0_embed: (batch, hidden) the talker's codec embedding of c0;
        sampler: picks each code from (batch, vocab) logits (greedy, or the reference's top_k 50 / top_p 0.8 draw;
        give it no repetition penalty: the reference's code predictor has none);
        run_stack: runs the decoder stack as `self.run_stack` does (default: that method; a compiled copy of it in
        a compiled frame pass, which leaves the lm heads, embeddings and sampler eager around it).
        Returns codes (batch, G-1) and the sum of their input embeddings (batch, hidden).
        """
        run_stack = run_stack or self.run_stack
        h = run_stack(torch.stack((talker_hidden, code0_embed), dim=1), ws.prefill_positions, ws)
        codes, embed_sum = [], torch.zeros_like(code0_embed)
        for g in range(1, self.cfg.num_code_groups):
            code = sampler(self.lm_head[g - 1](h))  # (batch,)
            embed = self.model.codec_embedding[g - 1](code)  # (batch, hidden)
            codes.append(code)
            embed_sum = embed_sum + embed
            if g < self.cfg.num_code_groups - 1:  # the last code is never fed back
                h = run_stack(embed.unsqueeze(1), ws.step_positions[g + 1], ws)
        return torch.stack(codes, dim=1), embed_sum

