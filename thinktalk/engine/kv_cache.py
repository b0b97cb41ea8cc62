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


class CacheCursor:
    """Where each row of a batch stands in a static KV cache, and the per-step metadata that follows from it.

    Row b's prompt fills slots [0, length_b); decode step n writes slot length_b + n at rope position
    length_b + n + rope_delta_b. Everything stays on the device: a decode step needs no host synchronisation.
    """

    def __init__(self, batch: int, max_len: int, device: torch.device):
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.rope_deltas = torch.zeros(batch, dtype=torch.float32, device=device)
        self.key_slots = torch.arange(max_len, device=device)

    def start(self, lengths: torch.Tensor, rope_deltas: torch.Tensor, seq: int) -> torch.Tensor:
        """After a prefill of `seq` (right-padded) tokens per row: returns the prefill's slots (batch, seq)."""
        assert seq <= self.max_len, (seq, self.max_len)
        self.lengths.copy_(lengths)
        self.rope_deltas.copy_(rope_deltas)
        return torch.arange(seq, device=self.key_slots.device).expand(lengths.numel(), seq)

    def step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step: (slots (batch, 1), positions (3, batch, 1), mask (batch, 1, 1, max_len)); then the
        rows advance by one."""
        slots = self.lengths.unsqueeze(1).clone()
        positions = (self.lengths + self.rope_deltas).view(1, -1, 1).expand(3, -1, 1)
        mask = self.key_slots.view(1, 1, 1, -1) <= slots.view(-1, 1, 1, 1)
        self.lengths.add_(1)
        return slots, positions, mask
