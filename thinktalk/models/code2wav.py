"""Code2Wav: the codec decoder that turns 16 codebooks of 12.5 Hz codes into a 24 kHz waveform.

    codes (batch, Q, frames)
      -> mean_q code_embedding[codes[q] + q * codebook_size]         (batch, frames, hidden)
      -> pre_transformer: sliding-window causal decoder, layer scale  (batch, frames, hidden)
      -> upsample: [CausalTransposeConv1d(x ratio) -> ConvNeXtBlock] per upsampling_ratio
      -> decoder:  CausalConv1d(hidden -> decoder_dim)
                   [SnakeBeta -> CausalTransposeConv1d(x rate, channels / 2) -> 3 residual units] per upsample_rate
                   SnakeBeta -> CausalConv1d(-> 1 channel)
      -> clamp to [-1, 1]                                              (batch, samples)

Every stage is causal except that each decoder transposed conv needs one input step of lookahead, so N frames
decode to N * samples_per_frame minus the lookahead tail (555 samples for the released config). That tail is not
lost in a stream: it becomes final when the next frame arrives. `Code2WavStream` therefore emits, after each call,
exactly the one-shot decode of all frames so far, minus what it emitted before.
"""

import math

import torch
from torch import nn

from ..config import Code2WavConfig
from ..layers.attention import Attention, AttentionMeta
from ..layers.conv import CausalConv1d, CausalTransposeConv1d, ConvNeXtBlock, SnakeBeta, StreamState
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding

# Vocoder architecture constants (not in the config): conv kernel widths and the residual units' dilations.
DECODER_KERNEL = 7
RESIDUAL_DILATIONS = (1, 3, 9)


class LayerScale(nn.Module):
    """Per-channel learnt scale of a residual branch (Touvron et al. 2021)."""

    def __init__(self, channels: int, initial: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), initial))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class SlidingKV:
    """Per layer, rotated keys and values of the last sliding_window - 1 frames: all a new frame attends to."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers


class TransformerLayer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_heads
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, head_dim, cfg.rms_norm_eps,
                                   qk_norm=False)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)

    def forward(self, x: torch.Tensor, meta: AttentionMeta,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), meta, cache))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Code2WavTransformer(nn.Module):
    """Pre-norm decoder whose every layer attends to the last `sliding_window` frames (itself included)."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.window = cfg.sliding_window
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.hidden_size // cfg.num_heads, cfg.rope_theta)

    def forward(self, x: torch.Tensor, start: int = 0, kv: SlidingKV | None = None) -> torch.Tensor:
        """x: (batch, frames, hidden) at absolute frame positions start.. ; kv carries a stream's past frames."""
        batch, frames, _ = x.shape
        positions = torch.arange(start, start + frames, device=x.device)
        cos, sin = self.rotary(positions.expand(batch, frames), x.dtype)
        past = 0 if kv is None or kv.k[0] is None else kv.k[0].shape[2]
        key_positions = torch.arange(start - past, start + frames, device=x.device)
        # (1, 1, frames, past + frames): a frame sees keys 0 .. window-1 frames back
        lag = positions.view(-1, 1) - key_positions.view(1, -1)
        mask = ((lag >= 0) & (lag < self.window)).view(1, 1, frames, -1)
        if kv is None:
            meta = AttentionMeta(cos=cos, sin=sin, mask=mask)
            for layer in self.layers:
                x = layer(x, meta)
            return self.norm(x)
        slots = torch.arange(past, past + frames, device=x.device).expand(batch, frames)
        meta = AttentionMeta(cos=cos, sin=sin, mask=mask, slots=slots)
        for i, layer in enumerate(self.layers):
            k, v = self._extend(kv, i, layer.self_attn, x, frames)
            x = layer(x, meta, (k, v))  # writes this call's keys and values into k, v at meta.slots
            keep = min(self.window - 1, k.shape[2])
            kv.k[i], kv.v[i] = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]
        return self.norm(x)

    def forward_rows(self, x: torch.Tensor, starts: list[int], kvs: list[SlidingKV]) -> torch.Tensor:
        """Several streams at once, each continuing its own past: x (rows, frames, hidden), row r's frames at
        absolute positions starts[r].., its past in kvs[r] (with at least one frame). Each row's pasts are left-padded
        to the longest and masked, so a row sees exactly what it would alone. -> (rows, frames, hidden)"""
        rows, frames, _ = x.shape
        device = x.device
        pasts = torch.tensor([kv.k[0].shape[2] for kv in kvs], device=device)  # (rows,)
        longest = int(pasts.max())
        positions = torch.tensor(starts, device=device).view(-1, 1) + torch.arange(frames, device=device)
        cos, sin = self.rotary(positions, x.dtype)
        # key slot j of row r holds absolute frame starts[r] - longest + j (slots before its own past are padding)
        slots = torch.arange(longest + frames, device=device)
        key_positions = positions[:, :1] - longest + slots.view(1, -1)  # (rows, longest + frames)
        lag = positions.unsqueeze(-1) - key_positions.unsqueeze(1)  # (rows, frames, keys)
        real = slots.view(1, 1, -1) >= (longest - pasts).view(-1, 1, 1)
        mask = (real & (lag >= 0) & (lag < self.window)).unsqueeze(1)  # (rows, 1, frames, keys)
        meta = AttentionMeta(cos=cos, sin=sin, mask=mask,
                             slots=torch.arange(longest, longest + frames, device=device).expand(rows, frames))
        for i, layer in enumerate(self.layers):
            room = x.new_zeros(rows, layer.self_attn.num_kv_heads, frames, layer.self_attn.head_dim)
            k = torch.cat((torch.cat([_left_pad(kv.k[i], longest) for kv in kvs]), room), 2)
            v = torch.cat((torch.cat([_left_pad(kv.v[i], longest) for kv in kvs]), room.clone()), 2)
            x = layer(x, meta, (k, v))  # writes the rows' new keys and values at meta.slots
            for r, kv in enumerate(kvs):  # each row keeps its own last window - 1 frames
                keep = min(self.window - 1, kv.k[i].shape[2] + frames)
                kv.k[i], kv.v[i] = k[r:r + 1, :, k.shape[2] - keep:], v[r:r + 1, :, v.shape[2] - keep:]
        return self.norm(x)

    @staticmethod
    def _extend(kv: SlidingKV, i: int, attn: Attention, x: torch.Tensor,
                frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's past keys and values followed by room for `frames` new ones: (batch, kv_heads, past+frames, d)."""
        room = x.new_zeros(x.shape[0], attn.num_kv_heads, frames, attn.head_dim)
        if kv.k[i] is None:
            return room, room.clone()
        return torch.cat((kv.k[i], room), dim=2), torch.cat((kv.v[i], room), dim=2)


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """(1, heads, n, d) -> (1, heads, length, d), zeros before (masked out where it is used)."""
    return torch.nn.functional.pad(t, (0, 0, length - t.shape[2], 0))


class ResidualUnit(nn.Module):
    """x + conv2(SnakeBeta(conv1(SnakeBeta(x)))), conv1 dilated and causal, conv2 pointwise."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv1d(dim, dim, DECODER_KERNEL, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x), state)), state)


class DecoderBlock(nn.Module):
    """SnakeBeta -> transposed conv (x rate, halves channels) -> residual units; `block` matches the checkpoint."""

    def __init__(self, in_dim: int, out_dim: int, rate: int):
        super().__init__()
        units = [ResidualUnit(out_dim, d) for d in RESIDUAL_DILATIONS]
        self.block = nn.ModuleList([SnakeBeta(in_dim), CausalTransposeConv1d(in_dim, out_dim, 2 * rate, rate), *units])

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        act, upsample, *units = self.block
        x = upsample(act(x), state)
        for unit in units:
            x = unit(x, state)
        return x


class Code2Wav(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        hidden, dim = cfg.hidden_size, cfg.decoder_dim
        # one table for all quantizers: quantizer q's codes are rows q * codebook_size ..
        self.code_embedding = nn.Embedding(cfg.codebook_size * cfg.num_quantizers, hidden)
        self.pre_transformer = Code2WavTransformer(cfg)
        self.upsample = nn.ModuleList(
            nn.ModuleList([CausalTransposeConv1d(hidden, hidden, r, r), ConvNeXtBlock(hidden)])
            for r in cfg.upsampling_ratios
        )
        rates = cfg.upsample_rates
        blocks = [DecoderBlock(dim // 2**i, dim // 2 ** (i + 1), rate) for i, rate in enumerate(rates)]
        out_dim = dim // 2 ** len(rates)
        self.decoder = nn.ModuleList([
            CausalConv1d(hidden, dim, DECODER_KERNEL),
            *blocks,
            SnakeBeta(out_dim),
            CausalConv1d(out_dim, 1, DECODER_KERNEL),
        ])

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        # codes: (batch, Q, frames) -> (batch, frames, hidden), the mean over quantizers
        if codes.shape[1] != self.cfg.num_quantizers:
            raise ValueError(f"expected {self.cfg.num_quantizers} codebooks, got codes of shape {tuple(codes.shape)}")
        offsets = torch.arange(self.cfg.num_quantizers, device=codes.device).view(1, -1, 1) * self.cfg.codebook_size
        return self.code_embedding(codes + offsets).mean(1)

    def vocode(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        # x: (batch, hidden, frames) transformer output -> (batch, samples) waveform
        for upsample, convnext in self.upsample:
            x = convnext(upsample(x, state), state)
        first, *blocks, act, last = self.decoder
        x = first(x, state)
        for block in blocks:
            x = block(x, state)
        return last(act(x), state).clamp(-1, 1).squeeze(1)

    def num_samples(self, frames: int) -> int:
        """Samples `decode` yields for `frames` frames: N * 1920 - 555 for the released config.

        The upsample convs (kernel == stride) lose nothing; each decoder transposed conv (kernel 2 * rate) turns L
        inputs into (L - 1) * rate final outputs.
        """
        length = frames * math.prod(self.cfg.upsampling_ratios)
        for rate in self.cfg.upsample_rates:
            length = max(0, length - 1) * rate
        return length

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (batch, Q, frames) LongTensor -> (batch, num_samples(frames)) waveform in [-1, 1]."""
        x = self.pre_transformer(self.embed(codes))
        return self.vocode(x.transpose(1, 2))


class Code2WavStream:
    """Incremental decoding: `feed` any number of frames, get the samples they make final.

    Concatenating all `feed` outputs and `finish()` equals `Code2Wav.decode` of all frames. Carried state: the
    transformer's keys/values within the sliding window, each causal conv's left context, and each transposed conv's
    lookahead input. Absolute frame positions keep counting, so rotary phases match the one-shot decode.
    """

    def __init__(self, model: Code2Wav):
        self.model = model
        self.frames = 0
        self.kv = SlidingKV(len(model.pre_transformer.layers))
        self.convs = StreamState()
        self.batch: int | None = None

    @torch.no_grad()
    def feed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (batch, Q, n) with n >= 0 -> (batch, new samples)."""
        if self.batch is not None and codes.shape[0] != self.batch:
            raise ValueError(f"stream started with batch {self.batch}, got codes of shape {tuple(codes.shape)}")
        self.batch = codes.shape[0]
        frames = codes.shape[-1]
        if frames == 0:
            return self.model.code_embedding.weight.new_zeros(self.batch, 0)
        x = self.model.pre_transformer(self.model.embed(codes), start=self.frames, kv=self.kv)  # (batch, n, hidden)
        self.frames += frames
        return self.model.vocode(x.transpose(1, 2), self.convs)

    @property
    def started(self) -> bool:
        """It has decoded a frame: its carried state has the shapes a batched call needs (feed_rows)."""
        return self.frames > 0

    def finish(self) -> torch.Tensor:
        """The samples still held back: (batch, 0).

        Each call already emitted everything the one-shot decode of the frames so far contains; the samples after
        that depend on frames that never came, and the one-shot decode drops them too.
        """
        weight = self.model.code_embedding.weight
        return weight.new_zeros(self.batch or 1, 0)


@torch.no_grad()
def feed_rows(model: Code2Wav, streams: list[Code2WavStream], codes: torch.Tensor) -> torch.Tensor:
    """One Code2Wav call for several started one-row streams, each fed the same number of frames: codes
    (rows, Q, n) -> (rows, new samples), row r exactly what streams[r].feed(codes[r:r+1]) returns.

    The transformer attends per row over its own past (forward_rows); every convolution's carried context is the
    rows' contexts stacked (all of one length once a stream has started), then split back."""
    assert all(s.started and s.batch == 1 for s in streams) and codes.shape[0] == len(streams)
    frames = codes.shape[-1]
    x = model.pre_transformer.forward_rows(model.embed(codes), [s.frames for s in streams], [s.kv for s in streams])
    for stream in streams:
        stream.frames += frames
    joint = StreamState()
    modules = streams[0].convs.modules()
    for module in modules:
        joint.keep(module, torch.cat([s.convs.context(module) for s in streams]))
    out = model.vocode(x.transpose(1, 2), joint)
    for module in modules:
        for r, stream in enumerate(streams):
            stream.convs.keep(module, joint.context(module)[r:r + 1])
    return out
