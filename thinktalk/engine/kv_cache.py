"""Static, preallocated KV caches."""

import torch

from ..config import DecoderConfig


class LayerCaches:
    """Preallocated static KV cache of one decoder stack: k and v per layer, (batch, kv_heads, max_len, head_dim)."""

    def __init__(self, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.batch, self.max_len = batch, max_len

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
