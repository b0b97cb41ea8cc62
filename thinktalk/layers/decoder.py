"""A pre-norm decoder stack: the shared body of the thinker's language model, the talker and the code predictor.

    x -> [ x + Attention(RMSNorm(x)) -> x + MLP-or-MoE(RMSNorm(x)) ] * num_layers -> RMSNorm

Embeddings and output heads are not here: each network names its own (embed_tokens, codec_embedding, ...), so
that module names match the checkpoint keys.
"""

from collections.abc import Callable

import torch
from torch import nn

from ..config import DecoderConfig
from .attention import Attention, AttentionMeta
from .kv_cache import LayerCaches
from .mlp import GatedMLP
from .moe import SparseMoe
from .norm import RMSNorm
from .rotary import RotaryEmbedding


# Called after layer i with (i, hidden) and returning the hidden states to continue with (deepstack injection).
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   cfg.rms_norm_eps, bias=cfg.attention_bias or cfg.qkv_bias, qk_norm=cfg.qk_norm,
                                   output_bias=cfg.attention_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.layer_is_sparse(layer_idx):
            self.mlp = SparseMoe(cfg.hidden_size, cfg.moe)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, meta: AttentionMeta,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope.theta, cfg.rope.mrope_section, cfg.rope.mrope_interleaved)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                   cache: LayerCaches | None = None, slots: torch.Tensor | None = None,
                   key_len: int | None = None, after_layer: LayerHook | None = None,
                   keep_hidden: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (batch, seq, hidden); positions: (3, batch, seq) or (batch, seq).

        Returns the final-normed hidden states and, when `keep_hidden=k`, the hidden states after k layers
        (0 = the input embeddings), taken before `after_layer` changes them.
        """
        cos, sin = self.rotary(positions, x.dtype)
        meta = AttentionMeta(cos=cos, sin=sin, mask=mask, slots=slots, key_len=key_len)
        kept = x if keep_hidden == 0 else None
        for i, layer in enumerate(self.layers):
            x = layer(x, meta, None if cache is None else cache.layer(i))
            if keep_hidden == i + 1:
                kept = x
            if after_layer is not None:
                x = after_layer(i, x)
        return self.norm(x), kept
