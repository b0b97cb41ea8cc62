"""Conversation prefixes kept across turns: the thinker's K/V of a finished stream's tokens, keyed by those tokens.

A stream that continues a conversation (the Realtime socket's next turn; a chat request whose messages extend the
previous one) starts with the K/V of the longest cached token prefix it shares with an entry, so its prefill runs
only from there and the media inside the prefix are not encoded again (engine/encoding.py).

    cache.store(tokens, group.row_cache(row), kept)  after a stream's thinker is done: its prompt + reply tokens
                                                     (the reply's last token was never fed, so it is not cached)
    hit = cache.lookup(token_ids, need_kept)         the longest usable prefix: (entry, length) or None
    hit.entry.write(row_cache, length)               its K/V for positions [0, length) into a row

An entry holds the K/V of every thinker layer (2 * layers * kv_heads * head_dim values a token) and, when the stream
was spoken, the hidden states its prefill kept for the talker (the talker prompt of a later turn reads the user
turns' media through them). Entries are evicted least recently used first, to stay under `max_bytes`; a prefix
shorter than MIN_TOKENS is not worth a copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..layers.kv_cache import LayerCaches

MIN_TOKENS = 16  # shorter prefixes cost more to copy and look up than to prefill


@dataclass
class PrefixEntry:
    tokens: tuple[int, ...]
    k: list[torch.Tensor]  # per layer (kv_heads, length, head_dim)
    v: list[torch.Tensor]
    kept: torch.Tensor | None  # (prompt length, hidden) hidden states kept for the talker, or None
    kept_length: int  # how many leading positions `kept` covers

    @property
    def nbytes(self) -> int:
        kept = 0 if self.kept is None else self.kept.numel() * self.kept.element_size()
        return sum(t.numel() * t.element_size() for t in self.k + self.v) + kept

    def write(self, cache: LayerCaches, length: int) -> None:
        """Positions [0, length) into a one-row cache (cache.row(r) of a batch)."""
        for layer in range(len(self.k)):
            k, v = cache.layer(layer)
            k[0, :, :length].copy_(self.k[layer][:, :length])
            v[0, :, :length].copy_(self.v[layer][:, :length])


@dataclass(frozen=True)
class PrefixHit:
    entry: PrefixEntry
    length: int


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def lookup(self, token_ids: list[int], need_kept: bool) -> PrefixHit | None:
        """The entry sharing the longest prefix with `token_ids` (at most all but its last token, which must be
        prefilled for its logits); with `need_kept`, only as far as the entry's kept hidden states reach."""
        best: PrefixHit | None = None
        for entry in self.entries.values():
            limit = min(len(entry.tokens), len(token_ids) - 1, entry.kept_length if need_kept else len(entry.tokens))
            length = _common_prefix(entry.tokens, token_ids, limit)
            if length >= MIN_TOKENS and (best is None or length > best.length):
                best = PrefixHit(entry, length)
        if best is None:
            self.misses += 1
            return None
        self.entries.move_to_end(best.entry.tokens)
        self.hits += 1
        return best

    @torch.inference_mode()
    def store(self, tokens: list[int], cache: LayerCaches, kept: torch.Tensor | None) -> None:
        """tokens: what the row's slots [0, len(tokens)) hold; cache: that row (a one-row view); kept: (1, n, hidden)
        kept hidden states of its first n positions, or None."""
        key = tuple(tokens)
        if len(key) < MIN_TOKENS or self.max_bytes <= 0:
            return
        length = len(key)
        k = [cache.layer(i)[0][0, :, :length].clone() for i in range(len(cache.k))]
        v = [cache.layer(i)[1][0, :, :length].clone() for i in range(len(cache.v))]
        entry = PrefixEntry(key, k, v, None if kept is None else kept[0].clone(), 0 if kept is None else kept.shape[1])
        if entry.nbytes > self.max_bytes:
            return
        self.entries.pop(key, None)
        # A stored conversation usually extends an older entry of its own: the older one is now redundant.
        for old in [t for t in self.entries if len(t) <= length and key[:len(t)] == t]:
            del self.entries[old]
        self.entries[key] = entry
        while self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n
