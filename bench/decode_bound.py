"""The memory-bandwidth bound of a thinker decode step on this machine (shared by the CPU benches).

    bound tokens/s per row = read bandwidth / bytes one decode step must read

A step reads every layer's attention matrices, norms and router, the experts its rows chose (with `batch` rows
drawing top_k of E experts each, uniformly, E * (1 - (1 - top_k / E) ** batch) distinct experts in expectation), the
final norm and lm_head, one embedding row per row, and each row's KV cache up to its context length. Weights are
counted in their stored form (int4 codes with their scales, ...), so the bound is per precision.
"""

from __future__ import annotations

import time

import torch

from thinktalk.models.thinker import Thinker

BANDWIDTH_BYTES = 2**30
BANDWIDTH_RUNS = 5


def read_bandwidth() -> float:
    """Bytes per second a torch reduction reads here (best of BANDWIDTH_RUNS over 1 GiB, current thread count)."""
    x = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(BANDWIDTH_RUNS):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return BANDWIDTH_BYTES / best


def copy_bandwidth() -> float:
    """Bytes per second moved by a 1 GiB tensor copy (read + write), best of BANDWIDTH_RUNS."""
    a = torch.ones(BANDWIDTH_BYTES, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(BANDWIDTH_RUNS):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * BANDWIDTH_BYTES / best


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def decode_step_bytes(thinker: Thinker, batch: int, context: int) -> float:
    """Bytes one decode step of `batch` rows, each attending `context` cache slots, must read (the cache in the
    model's float dtype)."""
    text = thinker.cfg.text
    cache_bytes_per_value = thinker.model.embed_tokens.weight.element_size()
    total = 0.0
    for layer in thinker.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        total += _bytes(layer) - (_bytes(experts) if experts is not None else 0)
        if experts is not None:
            e, k = text.moe.num_experts, text.moe.top_k
            total += _bytes(experts) / e * e * (1 - (1 - k / e) ** batch)
    total += _bytes(thinker.model.norm) + _bytes(thinker.lm_head)
    total += batch * text.hidden_size * thinker.model.embed_tokens.weight.element_size()
    total += batch * context * 2 * text.num_layers * text.num_kv_heads * text.head_dim * cache_bytes_per_value
    return total
