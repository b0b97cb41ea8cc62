"""Rotary position embeddings: plain 1-D RoPE and TM-RoPE (time, height, width) in its two layouts.

TM-RoPE gives every token a 3-D position (t, h, w) and splits the head_dim/2 rotary frequencies among the three axes
by `mrope_section` = (section_t, section_h, section_w), in one of two layouts:
  - interleaved (Qwen3-Omni): frequency i rotates by the H position if i % 3 == 1 and i < 3 * section_h, by the W
    position if i % 3 == 2 and i < 3 * section_w, and by the T position otherwise;
  - contiguous (Qwen2.5-Omni, Qwen2-VL): the first section_t frequencies follow T, the next section_h follow H,
    the last section_w follow W.
For text all three positions are equal, so TM-RoPE reduces to ordinary RoPE. The cos/sin tables use the "rotate
half" layout: (..., head_dim) = two copies of the head_dim/2 frequencies.
"""

import torch
from torch import nn


def mrope_axis_of_frequency(num_freqs: int, section: tuple[int, int, int] | None,
                            device: torch.device | None = None, interleaved: bool = True) -> torch.Tensor:
    """(num_freqs,) long tensor on `device`: which position axis (0=T, 1=H, 2=W) drives each rotary frequency.
    Built on the device with where() (a boolean-mask assignment would synchronise with the host, and a copy from
    the host per forward could not be captured in a CUDA graph)."""
    i = torch.arange(num_freqs, device=device)
    axis = torch.zeros_like(i)
    if section is None:
        return axis
    if not interleaved:  # [T]*section_t, [H]*section_h, [W]*section_w
        axis = torch.where(i >= section[0], 1, axis)
        return torch.where(i >= section[0] + section[1], 2, axis)
    axis = torch.where((i % 3 == 1) & (i < 3 * section[1]), 1, axis)
    return torch.where((i % 3 == 2) & (i < 3 * section[2]), 2, axis)


class RotaryEmbedding(nn.Module):
    """Maps positions to (cos, sin) tables of shape (batch, seq, head_dim).

    Holds no buffers: the frequency table is rebuilt on the positions' device at each call (head_dim/2 numbers,
    once per forward, not per layer), so a model built on the meta device needs nothing re-initialised.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, int, int] | None = None,
                 mrope_interleaved: bool = True):
        super().__init__()
        self.head_dim, self.theta, self.mrope_section = head_dim, theta, mrope_section
        self.mrope_interleaved = mrope_interleaved

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (3, batch, seq) for TM-RoPE or (batch, seq) for 1-D.
        device = positions.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device)
                                         / self.head_dim))
        if positions.dim() == 2:
            positions = positions.unsqueeze(0)
        # angles per axis: (3|1, batch, seq, head_dim/2); then pick each frequency's axis.
        angles = positions.float().unsqueeze(-1) * inv_freq
        if positions.shape[0] == 3:
            axis = mrope_axis_of_frequency(self.head_dim // 2, self.mrope_section, device, self.mrope_interleaved)
            freqs = angles.gather(0, axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:])).squeeze(0)
        else:
            freqs = angles[0]
        emb = torch.cat((freqs, freqs), dim=-1)  # (batch, seq, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def axial_rotary(rows: torch.Tensor, cols: torch.Tensor, head_dim: int,
                 theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary tables (patches, head_dim) float32 for image patches at (rows, cols), as the Qwen ViTs use them:
    a quarter of head_dim's angles follow the row, a quarter the column, each pair at the same head_dim/4
    frequencies; laid out [row | col | row | col] for rotate-half."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(quarter, dtype=torch.float, device=rows.device) / quarter))
    angles = torch.stack((rows, cols), dim=1).float()[:, :, None] * inv_freq  # (patches, 2, quarter)
    angles = angles.flatten(1)  # (patches, head_dim/2) = [row angles | col angles]
    emb = torch.cat((angles, angles), dim=1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin
