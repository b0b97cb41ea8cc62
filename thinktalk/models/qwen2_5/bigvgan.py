"""BigVGAN (Lee et al. 2022), the vocoder of Qwen2.5-Omni's Token2Wav: log-mel (batch, mel_dim, frames) -> 24 kHz.

    mel -> exp -> dB (floor -115 dB, -20 dB offset) -> normalised to [-1, 1]
      -> conv_pre (k7)                                                        (batch, C, frames)
      -> per stage i: ConvTranspose1d (stride = rate_i) -> mean of the AMP resblocks     C / 2^(i+1) channels
         AMP block, 3 times: x + conv2(act(conv1(act(x)))), conv1 dilated, each act anti-aliased:
             upsample 2x (Kaiser-windowed sinc) -> SnakeBeta -> downsample 2x (same filter)
      -> anti-aliased SnakeBeta -> conv_post (k7, no bias) -> clamp to [-1, 1]          (batch, frames * prod(rates))

Every convolution is centred ('same' zero padding; the resamplers pad by replication), so an output sample depends
on the mel frames within `vocoder_reach(cfg)` of its own frame. `VocoderStream` uses that: it runs the vocoder on
windows of the mel with that much context each side and keeps only the samples the window's edges cannot reach,
so the streamed wave equals the one-shot vocoding of the same mel. The filters are computed, not stored (no
buffers); module names match the checkpoint keys under `token2wav.code2wav_bigvgan_model.`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config_qwen2_5 import BigVGANConfig
from ...layers.conv import SnakeBeta

RESAMPLE_RATIO = 2  # the anti-aliased activations run at twice the stage's rate
RESAMPLE_TAPS = 12  # taps of the up- and down-sampling filters
MIN_DB, DB_OFFSET = -115.0, -20.0  # the mel's amplitude floor in dB, and the offset subtracted before normalising
CONV_PRE_POST_KERNEL = 7


def kaiser_sinc_filter(cutoff: float, half_width: float, taps: int) -> torch.Tensor:
    """(taps,) float32 low-pass filter: a sinc at `cutoff` (cycles per sample) under a Kaiser window whose beta comes
    from the transition band `half_width` (Kaiser's attenuation formula), normalised to unit DC gain."""
    half = taps // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(taps, beta=beta, periodic=False, dtype=torch.float32)
    # tap times, centred: an even filter sits between samples
    times = torch.arange(-half, half) + 0.5 if taps % 2 == 0 else torch.arange(taps) - half
    filt = 2 * cutoff * window * torch.sinc(2 * cutoff * times)
    return filt / filt.sum()


def resampling_filter(x: torch.Tensor) -> torch.Tensor:
    """The 2x resampler's filter, (channels, 1, taps), for depthwise convolution of x (batch, channels, time)."""
    cutoff, half_width = 0.5 / RESAMPLE_RATIO, 0.6 / RESAMPLE_RATIO
    taps = kaiser_sinc_filter(cutoff, half_width, RESAMPLE_TAPS).to(x.device, x.dtype)
    return taps.view(1, 1, -1).expand(x.shape[1], 1, -1)


class AntiAliasedSnake(nn.Module):
    """SnakeBeta at twice the rate: (batch, C, T) -> upsample to 2T -> SnakeBeta -> downsample to T."""

    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ratio, taps, channels = RESAMPLE_RATIO, RESAMPLE_TAPS, x.shape[1]
        filt = resampling_filter(x)
        # upsample: pad by replication, transposed depthwise conv, trim to exactly 2T (x ratio keeps the gain)
        pad = taps // ratio - 1
        trim_left = pad * ratio + (taps - ratio) // 2
        trim_right = pad * ratio + (taps - ratio + 1) // 2
        up = ratio * F.conv_transpose1d(F.pad(x, (pad, pad), mode="replicate"), filt, stride=ratio, groups=channels)
        up = self.act(up[..., trim_left:up.shape[-1] - trim_right])
        # downsample: pad by replication, strided depthwise conv back to T
        left = taps // 2 - int(taps % 2 == 0)
        return F.conv1d(F.pad(up, (left, taps // 2), mode="replicate"), filt, stride=ratio, groups=channels)


class AMPBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel - 1) * d // 2)
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                    for _ in dilations)
        # activations 2j and 2j+1 precede convs1[j] and convs2[j]
        self.activations = nn.ModuleList(AntiAliasedSnake(channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2)):
            x = x + conv2(self.activations[2 * j + 1](conv1(self.activations[2 * j](x))))
        return x


def normalised_db(mel: torch.Tensor) -> torch.Tensor:
    """Natural-log mel amplitude -> dB with a -115 dB floor and -20 dB offset -> [-1, 1] over [-115, 0] dB."""
    floor = torch.exp(torch.tensor(MIN_DB / 20.0 * math.log(10), device=mel.device, dtype=mel.dtype))
    db = 20 * torch.log10(torch.clamp(mel.exp(), min=floor)) + DB_OFFSET
    return torch.clamp(2 * ((db - MIN_DB) / -MIN_DB) - 1, -1.0, 1.0)


class BigVGAN(nn.Module):
    def __init__(self, cfg: BigVGANConfig):
        super().__init__()
        self.cfg = cfg
        channels = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.mel_dim, channels, CONV_PRE_POST_KERNEL, padding=CONV_PRE_POST_KERNEL // 2)
        # ups.{i}.0: the checkpoint nests each transposed conv in a one-element list
        self.ups = nn.ModuleList(
            nn.ModuleList([nn.ConvTranspose1d(channels // 2 ** i, channels // 2 ** (i + 1), kernel, rate,
                                              padding=(kernel - rate) // 2)])
            for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(
            AMPBlock(channels // 2 ** (i + 1), kernel, dilations)
            for i in range(len(cfg.upsample_rates))
            for kernel, dilations in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        final = channels // 2 ** len(cfg.upsample_rates)
        self.activation_post = AntiAliasedSnake(final)
        self.conv_post = nn.Conv1d(final, 1, CONV_PRE_POST_KERNEL, padding=CONV_PRE_POST_KERNEL // 2, bias=False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (batch, mel_dim, frames) -> wave (batch, frames * samples_per_frame), in [-1, 1]."""
        x = self.conv_pre(normalised_db(mel))
        per_stage = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            blocks = self.resblocks[i * per_stage:(i + 1) * per_stage]
            x = sum(block(x) for block in blocks) / per_stage
        wave = self.conv_post(self.activation_post(x))
        return torch.clamp(wave, -1.0, 1.0).squeeze(1)


def vocoder_reach(cfg: BigVGANConfig) -> int:
    """Mel frames each side that an output sample can depend on (an upper bound, rounded up).

    Summed over the layers, each one's one-sided reach in its own samples divided by its samples per mel frame:
    conv_pre and conv_post 3; a transposed conv ceil(kernel / rate) input samples; an anti-aliased activation at
    most taps/2 samples for the upsampler plus taps/4 for the downsampler; a conv (kernel - 1) * dilation / 2."""
    act = RESAMPLE_TAPS // 2 + RESAMPLE_TAPS // 4
    per_frame, reach = 1, CONV_PRE_POST_KERNEL // 2
    for rate, kernel in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
        reach += math.ceil(kernel / rate) / per_frame
        per_frame *= rate
        block = max(sum(2 * act + (k - 1) * d // 2 + (k - 1) // 2 for d in dilations)
                    for k, dilations in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        reach += block / per_frame
    reach += (act + CONV_PRE_POST_KERNEL // 2) / per_frame
    return math.ceil(reach)


class VocoderStream:
    """Vocodes a mel that arrives in pieces, exactly as the one-shot vocoding of the whole mel.

    Keeps the mel received so far (only what later windows still need); each `push` emits the samples of the frames
    that have `reach` frames of right context, `finish` the rest. Every window also has `reach` frames of left
    context (or starts at frame 0, as the one-shot does)."""

    def __init__(self, vocoder: BigVGAN, context: int | None = None):
        self.vocoder = vocoder
        self.reach = vocoder_reach(vocoder.cfg) if context is None else context
        self.per_frame = vocoder.cfg.samples_per_frame
        self.mel: torch.Tensor | None = None  # (batch, mel_dim, kept frames): frames [offset, received)
        self.offset = 0  # absolute index of self.mel's first frame
        self.emitted = 0  # frames whose samples have been emitted

    def push(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (batch, mel_dim, new frames) -> the samples now final, (batch, samples) (possibly none)."""
        self.mel = mel if self.mel is None else torch.cat((self.mel, mel), dim=2)
        return self._emit(self.offset + self.mel.shape[2] - self.reach, last=False)

    def finish(self) -> torch.Tensor:
        if self.mel is None:
            raise ValueError("nothing was pushed to the vocoder stream")
        return self._emit(self.offset + self.mel.shape[2], last=True)

    def _emit(self, until: int, last: bool) -> torch.Tensor:
        """Samples of frames [emitted, until), from a window reaching `reach` frames beyond them on each side."""
        received = self.offset + self.mel.shape[2]
        if until <= self.emitted:
            return self.mel.new_zeros(self.mel.shape[0], 0)
        start = max(self.emitted - self.reach, self.offset)
        stop = received if last else min(received, until + self.reach)
        wave = self.vocoder(self.mel[:, :, start - self.offset:stop - self.offset])
        first, end = (self.emitted - start) * self.per_frame, (until - start) * self.per_frame
        self.emitted = until
        keep_from = max(self.emitted - self.reach, self.offset)  # the left context the next window needs
        self.mel, self.offset = self.mel[:, :, keep_from - self.offset:], keep_from
        return wave[:, first:end]
