"""Token2Wav: codec tokens -> mel (DiT flow matching) -> 24 kHz wave (BigVGAN), one-shot and streaming.

One-shot (the reference's Token2Wav):
    y0 = initial noise (1, frames = tokens * repeats, mel_dim)
    time grid t_0..t_{n-1} = linspace(0, 1, num_steps), swayed: t + s (cos(pi t / 2) - 1 + t)   (finer near 0)
    for each interval: one RK4 step (the 3/8 rule: k1..k4 at t, t + h/3, t + 2h/3, t + h) of the guided field
    mel = y_final transposed (1, mel_dim, frames) -> BigVGAN -> wave (1, frames * 240)

Streaming (`Token2WavStream`): tokens arrive as the talker makes them. Mel is produced a chunk at a time
(`chunk_blocks` DiT blocks of `block_size` frames): once the tokens of a chunk and of `future_blocks` blocks after
it have arrived, the ODE runs on a window of the chunk plus `past_blocks` blocks before and `future_blocks` after
(whole blocks, so the window's block grid is the one-shot's), starting from the one-shot's noise on those frames,
and the chunk's frames are kept. The vocoder then streams exactly (bigvgan.VocoderStream).

Why the streamed mel is not always the one-shot mel: one evaluation of the field at a block reads two blocks before
and one after, but the ODE evaluates the field 4 times per step, 36 times in all, each time on the whole state, so
in the one-shot decode every block's final mel depends (weakly, through those 36 hops) on every token of the reply.
No finite window can reproduce that except the whole utterance. So the stream equals the one-shot decode exactly
when its first window already spans the utterance (a reply of at most chunk + future blocks, or one that finished
before the first chunk was due), and otherwise differs by the influence of the tokens outside each window; the
streaming tests measure that difference. The vocoder stage adds none.

The initial noise is explicit: `BlockNoise` draws it block by block from a generator, so a stream and a one-shot
decode given the same seed start from the same noise whatever the reply's length.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from ...config_qwen2_5 import Token2WavConfig
from .bigvgan import BigVGAN, VocoderStream
from .dit import DiT
from .voices import Voice


def ode_time_grid(num_steps: int, sway: float | None, device: torch.device) -> torch.Tensor:
    """(num_steps,) float32 flow times from 0 to 1, swayed towards 0 when `sway` < 0."""
    t = torch.linspace(0, 1, num_steps, device=device, dtype=torch.float32)
    if sway is not None:
        t = t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


def rk4_step(field, t0: torch.Tensor, t1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y(t1) from y(t0) by one Runge-Kutta step of the 3/8 rule, with the reference's order of operations."""
    h, third = t1 - t0, 1 / 3
    k1 = field(t0, y)
    k2 = field(t0 + h * third, y + h * k1 * third)
    k3 = field(t0 + h * (2 / 3), y + h * (k2 - k1 * third))
    k4 = field(t1, y + h * (k1 - k2 + k3))
    return y + (k1 + 3 * (k2 + k3) + k4) * h / 8


class BlockNoise:
    """The ODE's initial noise, drawn one DiT block at a time (block_size frames) from one generator, so any prefix
    of it is the same whether a stream asks for it piecewise or a one-shot decode asks for it at once."""

    def __init__(self, mel_dim: int, block_size: int, seed: int, device: torch.device | str = "cpu"):
        self.mel_dim, self.block_size, self.device = mel_dim, block_size, torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.blocks: list[torch.Tensor] = []

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """(1, stop - start, mel_dim) float32 noise of frames [start, stop)."""
        while len(self.blocks) * self.block_size < stop:
            self.blocks.append(torch.randn(1, self.block_size, self.mel_dim, generator=self.generator,
                                           device=self.device))
        return torch.cat(self.blocks, dim=1)[:, start:stop]


class Token2Wav(nn.Module):
    """Module names match the checkpoint keys under `token2wav.`."""

    def __init__(self, cfg: Token2WavConfig):
        super().__init__()
        self.cfg = cfg
        self.code2wav_dit_model = DiT(cfg.dit)
        self.code2wav_bigvgan_model = BigVGAN(cfg.bigvgan)

    def mel(self, codes: torch.Tensor, voice: Voice, noise: torch.Tensor) -> torch.Tensor:
        """codes (1, tokens) -> mel (1, mel_dim, tokens * repeats), from `noise` (1, tokens * repeats, mel_dim)."""
        cfg, dit = self.cfg, self.code2wav_dit_model
        frames = codes.shape[1] * cfg.dit.repeats
        if frames > cfg.dit.max_position_embeddings:
            raise ValueError(f"{codes.shape[1]} codec tokens make {frames} mel frames, more than the DiT's "
                             f"max_position_embeddings ({cfg.dit.max_position_embeddings})")
        if noise.shape != (codes.shape[0], frames, cfg.dit.mel_dim):
            raise ValueError(f"noise must have shape {(codes.shape[0], frames, cfg.dit.mel_dim)}, "
                             f"got {tuple(noise.shape)}")
        if int(codes.min()) < 0 or int(codes.max()) > cfg.dit.num_embeds:
            raise ValueError(f"codec tokens must lie in [0, {cfg.dit.num_embeds}] (codec control codes such as "
                             f"the end code must be cut off first), got {int(codes.min())}..{int(codes.max())}")
        weight = dit.proj_out.weight
        cond = voice.cond.to(weight.device, weight.dtype).expand(codes.shape[0], -1)
        ref_mel = voice.ref_mel.to(weight.device, weight.dtype).expand(codes.shape[0], -1, -1)
        codes = codes.to(weight.device)

        def field(t, y):
            return dit.guided_velocity(y, t, cond, ref_mel, codes, cfg.guidance_scale)

        times = ode_time_grid(cfg.num_steps, cfg.sway_coefficient, weight.device)
        y = noise.to(weight.device, weight.dtype)
        for t0, t1 in zip(times[:-1], times[1:]):
            y = rk4_step(field, t0, t1, y)
        return y.transpose(1, 2)

    def forward(self, codes: torch.Tensor, voice: Voice, noise: torch.Tensor) -> torch.Tensor:
        """One-shot decode: codes (1, tokens) -> wave (1, tokens * repeats * samples_per_frame)."""
        return self.code2wav_bigvgan_model(self.mel(codes, voice, noise))

    def stream(self, voice: Voice, noise: BlockNoise, chunk_blocks: int = 3, past_blocks: int | None = None,
               future_blocks: int | None = None) -> "Token2WavStream":
        return Token2WavStream(self, voice, noise, chunk_blocks, past_blocks, future_blocks)


class Token2WavStream:
    """Codec tokens in as they come (`push`), wave out as soon as a chunk of mel is decoded; `finish` flushes.

    Defaults: chunks of 3 blocks (72 mel frames, 0.72 s), 2 blocks of past context (the released DiT's two
    look-back layers) and 1 of future context (its look-ahead layer). The first audio comes once
    chunk + future blocks of tokens have arrived (48 tokens at the released sizes), plus the vocoder's right context.
    """

    def __init__(self, token2wav: Token2Wav, voice: Voice, noise: BlockNoise, chunk_blocks: int = 3,
                 past_blocks: int | None = None, future_blocks: int | None = None):
        dit = token2wav.cfg.dit
        self.token2wav, self.voice, self.noise = token2wav, voice, noise
        self.block, self.repeats = dit.block_size, dit.repeats
        if chunk_blocks < 1 or (self.block * chunk_blocks) % self.repeats or self.block % self.repeats:
            raise ValueError(f"chunks must be >= 1 block and blocks ({self.block} frames) whole codec tokens "
                             f"({self.repeats} frames each)")
        self.chunk = chunk_blocks * self.block
        self.past = self.block * (len(dit.look_backward_layers) if past_blocks is None else past_blocks)
        self.future = self.block * (len(dit.look_ahead_layers) if future_blocks is None else future_blocks)
        self.codes: list[int] = []
        self.decoded = 0  # mel frames decoded (and handed to the vocoder) so far
        self.vocoder = VocoderStream(token2wav.code2wav_bigvgan_model)
        self.finished = False

    def push(self, codes: list[int] | torch.Tensor) -> torch.Tensor:
        """More codec tokens (content codes only: stop codes are not pushed). -> the wave now final, (samples,)."""
        if self.finished:
            raise ValueError("the stream is finished")
        self.codes += [int(c) for c in codes]
        pieces = []
        while (self.decoded + self.chunk + self.future) <= len(self.codes) * self.repeats:
            pieces.append(self._decode_chunk(self.decoded + self.chunk, len(self.codes) * self.repeats))
        return torch.cat(pieces) if pieces else self._no_samples()

    def finish(self) -> torch.Tensor:
        """The rest of the wave once the last token has been pushed, (samples,)."""
        if self.finished:
            raise ValueError("the stream is already finished")
        self.finished = True
        total = len(self.codes) * self.repeats
        if total == 0:
            return self._no_samples()
        pieces = []
        if self.decoded < total:
            pieces.append(self.vocoder.push(self._decode_until(total, total))[0])
        pieces.append(self.vocoder.finish()[0])
        return torch.cat(pieces)

    def _decode_chunk(self, end: int, known: int) -> torch.Tensor:
        return self.vocoder.push(self._decode_until(end, known))[0]

    def _decode_until(self, end: int, known: int) -> torch.Tensor:
        """Mel frames [decoded, end) from a window [decoded - past, min(end + future, known)) -> (1, mel, n)."""
        start = max(self.decoded - self.past, 0)
        stop = min(end + self.future, known)
        codes = torch.tensor([self.codes[start // self.repeats: stop // self.repeats]])
        mel = self.token2wav.mel(codes, self.voice, self.noise.frames(start, stop))
        out = mel[:, :, self.decoded - start:end - start]
        self.decoded = end
        return out

    def _no_samples(self) -> torch.Tensor:
        return self.token2wav.code2wav_bigvgan_model.conv_post.weight.new_zeros(0)


def first_audio_tokens(stream: Token2WavStream) -> int:
    """Tokens a stream needs before its first chunk of mel is decoded."""
    return math.ceil((stream.chunk + stream.future) / stream.repeats)
