"""Where the 4-bit values of a (N, K) matrix sit in its (N, K // 2) bytes, for each kernel that reads them.

    plain  byte [n, j] = q[n, 2j] | q[n, 2j + 1] << 4             (the CUDA kernels; row n's bytes contiguous)
    cpu    torch's `_weight_int4pack_mm_for_cpu` tile layout: rows in blocks of 64, the block stored k-major,
           byte [block, k, j] = q[64 block + j, k] | q[64 block + 32 + j, k] << 4    (j < 32)
           and a last block of t < 64 rows as byte [k, j] = q[base + 2j, k] | q[base + 2j + 1, k] << 4  (j < t/2)

The cpu layout was read off torch's own converter (`_convert_weight_to_int4pack_for_cpu`, which needs an int32
copy of the whole matrix) and is checked against it in tests/test_quant_matrices.py; packing here works on uint8
and needs no such copy. Every byte value is a valid pair of codes in either layout, which is how the full-size
bench draws random packed weights directly.
"""

import torch

CPU_BLOCK_ROWS = 64


def pack_plain(q: torch.Tensor) -> torch.Tensor:
    """q: (N, K) uint8 codes in [0, 16) -> (N, K // 2) uint8."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_plain(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


def pack_cpu(q: torch.Tensor) -> torch.Tensor:
    """q: (N, K) uint8 codes in [0, 16), N even -> (N, K // 2) uint8 in torch's CPU tile layout."""
    n, k = q.shape
    assert n % 2 == 0 and k % 2 == 0, (n, k)
    full = n // CPU_BLOCK_ROWS * CPU_BLOCK_ROWS
    pieces = []
    if full:
        blocks = q[:full].view(-1, 2, CPU_BLOCK_ROWS // 2, k)  # (blocks, low/high half, 32, K)
        pieces.append((blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).reshape(-1))  # (blocks, K, 32)
    if full < n:
        tail = q[full:]  # (t, K)
        pieces.append((tail[0::2] | (tail[1::2] << 4)).t().reshape(-1))  # (K, t / 2)
    return torch.cat(pieces).view(n, k // 2)


def unpack_cpu(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 in torch's CPU tile layout -> (N, K) uint8 codes."""
    n, half_k = packed.shape
    k = 2 * half_k
    flat = packed.reshape(-1)
    full = n // CPU_BLOCK_ROWS * CPU_BLOCK_ROWS
    rows = []
    if full:
        blocks = flat[:full * half_k].view(-1, k, CPU_BLOCK_ROWS // 2).transpose(1, 2)  # (blocks, 32, K)
        rows.append(torch.stack((blocks & 0xF, blocks >> 4), dim=1).reshape(full, k))
    if full < n:
        tail = flat[full * half_k:].view(k, (n - full) // 2).t()  # (t / 2, K)
        rows.append(torch.stack((tail & 0xF, tail >> 4), dim=1).reshape(n - full, k))
    return torch.cat(rows)


def pack(q: torch.Tensor, layout: str) -> torch.Tensor:
    return pack_cpu(q) if layout == "cpu" else pack_plain(q)


def unpack(packed: torch.Tensor, layout: str) -> torch.Tensor:
    return unpack_cpu(packed) if layout == "cpu" else unpack_plain(packed)
