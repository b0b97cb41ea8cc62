"""Static, preallocated KV caches."""

import torch

from ..config import DecoderConfig


class LayerCaches:
    """Preallocated static KV cache of one decoder stack: k and v per layer, (batch, kv_heads, max_len, head_dim)."""

    def __init__(self, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self._use([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
                  [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)])

    def _use(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        self.k, self.v = k, v
        self.batch, self.max_len = k[0].shape[0], k[0].shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def first_rows(self, rows: int) -> "LayerCaches":
        """The same memory seen as a cache of rows [0, rows) (views, no copy): a decode step over the leading rows
        of a batch reads and writes only those rows."""
        assert 1 <= rows <= self.batch, (rows, self.batch)
        if rows == self.batch:
            return self
        view = object.__new__(LayerCaches)  # no allocation: the views share this cache's memory
        view._use([t[:rows] for t in self.k], [t[:rows] for t in self.v])
        return view

    def row(self, row: int) -> "LayerCaches":
        """Row `row` seen as a one-row cache (views, no copy): a prefill writes a row of a shared batch in place."""
        assert 0 <= row < self.batch, (row, self.batch)
        view = object.__new__(LayerCaches)
        view._use([t[row:row + 1] for t in self.k], [t[row:row + 1] for t in self.v])
        return view

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_row(self, row: int, source: "LayerCaches", source_row: int, length: int) -> None:
        """Slots [0, length) of `source`'s row `source_row` -> this cache's row `row`, every layer (device copies).
        Lets a prompt prefilled alone join a shared batch; the row's later slots keep stale values that its
        cursor never lets a query see."""
        assert length <= min(self.max_len, source.max_len), (length, self.max_len, source.max_len)
        for mine, theirs in zip(self.k + self.v, source.k + source.v, strict=True):
            mine[row, :, :length].copy_(theirs[source_row, :, :length])


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

    def place(self, row: int, length: torch.Tensor, rope_delta: torch.Tensor) -> None:
        """Row `row` now holds a prompt of `length` tokens (0-d device tensors: no host synchronisation)."""
        self.lengths[row] = length
        self.rope_deltas[row] = rope_delta

    def park(self, idle: torch.Tensor, slot: int = 0) -> None:
        """idle: (batch,) bool. Idle rows stand at `slot`, so that the harmless writes of a step they take part in
        (static shapes) stay inside the cache however long they idle, at a slot nothing of theirs needs (slot 0 for
        a free row; the last slot for a row being prefilled in place, which its prompt and reply never reach with
        data: the reply's final token is never written)."""
        self.lengths.masked_fill_(idle, slot)

    def step(self, rows: int | None = None,
             advance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step of rows [0, rows) (default: all): (slots (rows, 1), positions (3, rows, 1),
        mask (rows, 1, 1, max_len)); then those rows advance by one. advance: (rows,) bool, the rows that advance
        (default: all); a row held back writes its next slot again at its next step, so this step's write there
        is overwritten before any query of the row sees it."""
        lengths = self.lengths if rows is None else self.lengths[:rows]  # a view: add_ advances the cursor itself
        deltas = self.rope_deltas if rows is None else self.rope_deltas[:rows]
        slots = lengths.unsqueeze(1).clone()
        positions = (lengths + deltas).view(1, -1, 1).expand(3, -1, 1)
        mask = self.key_slots.view(1, 1, 1, -1) <= slots.view(-1, 1, 1, 1)
        lengths.add_(1 if advance is None else advance.long())
        return slots, positions, mask
