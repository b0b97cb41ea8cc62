"""The DiT of Qwen2.5-Omni's Token2Wav: a flow-matching velocity field over mel frames, conditioned on codec tokens
and a voice, with block attention.

    x: noisy mel (batch, frames, mel_dim); codes (batch, frames / repeats); t: flow time (batch,)
    voice: cond (batch, enc_emb_dim) and reference mel (batch, ref_frames, mel_dim)
      -> input_embed.proj(cat[x, ECAPA(ref mel) per frame, codec embedding repeated `repeats` times per code,
                              cond per frame])                                            (batch, frames, hidden)
      -> [AdaLN-Zero(t) -> block attention (rotary on head 0 only) -> gated residual
          -> AdaLN(t) -> MLP (GELU tanh) -> gated residual] x num_layers
      -> AdaLN(t) final -> proj_out                                                     velocity (batch, frames, mel_dim)

Block attention: frame i belongs to block i // block_size; a query attends to the keys of its own block, plus the
previous block in `look_backward_layers` and the next block in `look_ahead_layers`. So one evaluation of the field
at a block depends on the state of that block, two before and one after (released layers 0, 20 back; 10 ahead).

Classifier-free guidance runs the conditioned and the unconditioned field as one batch of 2: the unconditioned row
has a zero voice (zero cond, and the ECAPA embedding of an all-zero reference mel) and the codes replaced by 0.

Rotary: only head 0 is rotated, in the checkpoint's interleaved pair layout (x0, x1), (x2, x3), ...; thinktalk
de-interleaves head 0 of q and k alike (the q.k products do not change) and applies the rotate-half form.
Module names match the checkpoint keys under `token2wav.code2wav_dit_model.`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config_qwen2_5 import DiTConfig
from ...layers.rotary import RotaryEmbedding, apply_rotary
from .ecapa import EcapaTDNN

LAYER_NORM_EPS = 1e-6
TIME_FREQUENCIES = 256  # width of the sinusoidal flow-time embedding
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as 1000 t
TIME_MAX_PERIOD = 10000.0


def time_features(t: torch.Tensor) -> torch.Tensor:
    """(batch,) flow times -> (batch, 256) [sin | cos] features of 1000 t at geometric frequencies."""
    half = TIME_FREQUENCIES // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(TIME_MAX_PERIOD) / (half - 1)))
    angles = TIME_SCALE * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((angles.sin(), angles.cos()), dim=-1).to(t.dtype)


class TimeEmbedding(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        # ModuleList so the checkpoint's time_mlp.0 / time_mlp.2 line up (time_mlp.1 is the parameter-free SiLU).
        self.time_mlp = nn.ModuleList([nn.Linear(TIME_FREQUENCIES, hidden), nn.SiLU(), nn.Linear(hidden, hidden)])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = time_features(t)
        for layer in self.time_mlp:
            x = layer(x)
        return x  # (batch, hidden)


class CodecEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.repeats = cfg.repeats
        self.codec_embed = nn.Embedding(cfg.num_embeds + 1, cfg.emb_dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        # (batch, tokens) -> (batch, tokens * repeats, emb_dim): each code held for `repeats` mel frames
        return self.codec_embed(codes).repeat_interleave(self.repeats, dim=1)


class InputEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.mel_dim + cfg.enc_dim + cfg.enc_emb_dim + cfg.emb_dim, cfg.hidden_size)
        self.spk_encoder = EcapaTDNN(cfg)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, ref_mel: torch.Tensor,
                codes: torch.Tensor) -> torch.Tensor:
        """x (b, frames, mel); cond (b, enc_emb_dim); ref_mel (b, ref_frames, mel); codes (b, frames, emb_dim)."""
        frames = x.shape[1]
        voice = self.spk_encoder(ref_mel).unsqueeze(1).expand(-1, frames, -1)
        return self.proj(torch.cat((x, voice, codes, cond.unsqueeze(1).expand(-1, frames, -1)), dim=-1))


class AdaLayerNormZero(nn.Module):
    """LayerNorm (no affine) modulated by the flow time: 6 vectors (shift, scale, gate) for attention and MLP."""

    def __init__(self, hidden: int, parts: int):
        super().__init__()
        self.linear = nn.Linear(hidden, parts * hidden)
        self.parts = parts

    def modulation(self, t_embed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(t_embed)).chunk(self.parts, dim=1)  # each (batch, hidden)


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS) * (1 + scale[:, None]) + shift[:, None]


class DiTAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.to_q = nn.Linear(cfg.hidden_size, inner)
        self.to_k = nn.Linear(cfg.hidden_size, inner)
        self.to_v = nn.Linear(cfg.hidden_size, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, cfg.hidden_size), nn.Identity()])  # .1: the dropout slot

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        batch, frames, _ = x.shape
        q, k, v = (p(x).view(batch, frames, self.heads, self.head_dim) for p in (self.to_q, self.to_k, self.to_v))
        q, k = rotate_first_head(q, *rotary), rotate_first_head(k, *rotary)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(batch, frames, -1))


def rotate_first_head(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, frames, heads, head_dim): head 0 de-interleaved ([even dims | odd dims]) and rotated; others kept."""
    first = x[:, :, :1]
    first = torch.cat((first[..., 0::2], first[..., 1::2]), dim=-1)
    return torch.cat((apply_rotary(first, cos, sin), x[:, :, 1:]), dim=2)


class DiTMLP(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        inner = cfg.hidden_size * cfg.ff_mult
        # Sequential so the checkpoint's ff.0 / ff.3 line up (ff.1 is the GELU, ff.2 the dropout slot).
        self.ff = nn.Sequential(nn.Linear(cfg.hidden_size, inner), nn.GELU(approximate="tanh"), nn.Identity(),
                                nn.Linear(inner, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(cfg.hidden_size, parts=6)
        self.attn = DiTAttention(cfg)
        self.ff = DiTMLP(cfg)

    def forward(self, x: torch.Tensor, t_embed: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.attn_norm.modulation(t_embed)
        x = x + gate_attn[:, None] * self.attn(modulate(x, scale_attn, shift_attn), rotary, mask)
        return x + gate_mlp[:, None] * self.ff(modulate(x, scale_mlp, shift_mlp))


class FinalNorm(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 2 * hidden)

    def forward(self, x: torch.Tensor, t_embed: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(t_embed)).chunk(2, dim=1)  # scale first: the checkpoint's order
        return modulate(x, scale, shift)


def block_mask(frames: int, block_size: int, back: int, ahead: int, device: torch.device) -> torch.Tensor:
    """(frames, frames) bool, True = may attend: key block - query block in [-back, ahead]."""
    block = torch.arange(frames, device=device) // block_size
    diff = block[None, :] - block[:, None]
    return (diff >= -back) & (diff <= ahead)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimeEmbedding(cfg.hidden_size)
        self.text_embed = CodecEmbedding(cfg)
        self.input_embed = InputEmbedding(cfg)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = FinalNorm(cfg.hidden_size)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.mel_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, ref_mel: torch.Tensor,
                code_embeds: torch.Tensor) -> torch.Tensor:
        """The velocity field: x (b, frames, mel), t (b,), cond (b, enc_emb_dim), ref_mel (b, ref_frames, mel),
        code_embeds (b, frames, emb_dim) -> (b, frames, mel)."""
        t_embed = self.time_embed(t)
        h = self.input_embed(x, cond, ref_mel, code_embeds)
        frames = h.shape[1]
        positions = torch.arange(frames, device=h.device).unsqueeze(0)
        cos, sin = self.rotary(positions, h.dtype)  # (1, frames, head_dim)
        masks = {}
        for i, block in enumerate(self.transformer_blocks):
            reach = (int(i in self.cfg.look_backward_layers), int(i in self.cfg.look_ahead_layers))
            if reach not in masks:
                masks[reach] = block_mask(frames, self.cfg.block_size, *reach, h.device)
            h = block(h, t_embed, (cos, sin), masks[reach])
        return self.proj_out(self.norm_out(h, t_embed))

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, ref_mel: torch.Tensor,
                        codes: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """v_cond + (v_cond - v_uncond) * scale, both fields as one batch; scale < 1e-5: the conditioned field
        alone (the reference's threshold). x (b, frames, mel); t: 0-d; codes (b, frames / repeats)."""
        batch = x.shape[0]
        if guidance_scale < 1e-5:
            return self(x, t.expand(batch), cond, ref_mel, self.text_embed(codes))
        both = self(torch.cat((x, x)), t.expand(2 * batch), torch.cat((cond, torch.zeros_like(cond))),
                    torch.cat((ref_mel, torch.zeros_like(ref_mel))),
                    torch.cat((self.text_embed(codes), self.text_embed(torch.zeros_like(codes)))))
        guided, null = both.chunk(2, dim=0)
        return guided + (guided - null) * guidance_scale
