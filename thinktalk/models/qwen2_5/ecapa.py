"""ECAPA-TDNN speaker encoder (Desplanques et al. 2020): a voice's reference mel -> one conditioning vector.

    ref_mel (batch, frames, mel) -> (batch, mel, frames)
      -> TDNN: Conv1d (k, dilation; 'same' reflect padding) -> ReLU                        (batch, c0, frames)
      -> SE-Res2Net blocks: 1x1 TDNN -> Res2Net (channel groups, each fed the previous group's output)
                            -> 1x1 TDNN -> squeeze-excitation (time mean -> 1x1 -> ReLU -> 1x1 -> sigmoid gate)
                            -> + input
      -> multi-layer aggregation: the SE-Res2Net outputs concatenated -> TDNN (mfa)        (batch, c_last, frames)
      -> attentive statistics pooling: per-channel attention over time, from the frames and their global mean and
         std; the attention-weighted mean and std concatenated                            (batch, 2 c_last, 1)
      -> fc (1x1 conv) -> (batch, enc_dim)

Every convolution pads 'same' by reflection, as the checkpoint was trained. Module names match the checkpoint keys
under `token2wav.code2wav_dit_model.input_embed.spk_encoder.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config_qwen2_5 import DiTConfig

STD_EPS = 1e-12  # variance floor of the statistics pooling


def same_conv(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Conv1d:
    return nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, padding="same", padding_mode="reflect")


class TDNN(nn.Module):
    """ReLU(Conv1d) with 'same' reflect padding: (batch, in, frames) -> (batch, out, frames)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.conv = same_conv(in_channels, out_channels, kernel_size, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class Res2Net(nn.Module):
    """Channels in `scale` groups: group 0 passes through, group 1 -> TDNN, group i -> TDNN(group i + output i-1)."""

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int):
        super().__init__()
        self.scale = scale
        self.blocks = nn.ModuleList(TDNN(channels // scale, channels // scale, kernel_size, dilation)
                                    for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.chunk(self.scale, dim=1)
        outputs = [groups[0]]
        for i, block in enumerate(self.blocks):
            outputs.append(block(groups[i + 1] if i == 0 else groups[i + 1] + outputs[-1]))
        return torch.cat(outputs, dim=1)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = same_conv(channels, se_channels)
        self.conv2 = same_conv(se_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(x.mean(dim=2, keepdim=True)))))  # (batch, channels, 1)
        return x * gate


class SERes2NetBlock(nn.Module):
    def __init__(self, channels: int, scale: int, se_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.tdnn1 = TDNN(channels, channels, 1, 1)
        self.res2net_block = Res2Net(channels, scale, kernel_size, dilation)
        self.tdnn2 = TDNN(channels, channels, 1, 1)
        self.se_block = SqueezeExcitation(channels, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


def weighted_stats(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, weights: (batch, channels, frames), weights summing to 1 over frames -> mean, std (batch, channels)."""
    mean = (weights * x).sum(dim=2)
    var = (weights * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2)
    return mean, var.clamp(STD_EPS).sqrt()


class AttentiveStatsPool(nn.Module):
    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TDNN(3 * channels, attention_channels, 1, 1)
        self.conv = same_conv(attention_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, channels, frames) -> (batch, 2 * channels, 1)
        frames = x.shape[2]
        mean, std = weighted_stats(x, torch.full_like(x, 1.0 / frames))
        context = torch.cat((x, mean.unsqueeze(2).expand_as(x), std.unsqueeze(2).expand_as(x)), dim=1)
        attention = F.softmax(self.conv(torch.tanh(self.tdnn(context))), dim=2)  # per channel, over time
        mean, std = weighted_stats(x, attention)
        return torch.cat((mean, std), dim=1).unsqueeze(2)


class EcapaTDNN(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        channels, kernels, dilations = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        if any(channels[i] != channels[i - 1] for i in range(1, len(channels) - 1)) or \
                sum(channels[1:-1]) != channels[-1]:
            raise ValueError(f"enc_channels {channels}: the SE-Res2Net blocks keep their width (residual) and their "
                             "outputs, concatenated, must give the last width")
        self.blocks = nn.ModuleList([TDNN(cfg.mel_dim, channels[0], kernels[0], dilations[0])])
        for i in range(1, len(channels) - 1):
            self.blocks.append(SERes2NetBlock(channels[i], cfg.enc_res2net_scale, cfg.enc_se_channels, kernels[i],
                                              dilations[i]))
        self.mfa = TDNN(channels[-1], channels[-1], kernels[-1], dilations[-1])
        self.asp = AttentiveStatsPool(channels[-1], cfg.enc_attention_channels)
        self.fc = same_conv(2 * channels[-1], cfg.enc_dim)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: (batch, frames, mel_dim) -> (batch, enc_dim)."""
        x = mel.transpose(1, 2)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        x = self.mfa(torch.cat(outputs[1:], dim=1))
        return self.fc(self.asp(x)).squeeze(-1)
