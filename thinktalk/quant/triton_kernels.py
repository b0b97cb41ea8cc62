"""CUDA products with quantized weights: y = x @ W.T computed from int4 / int8 / fp8 codes, one Triton kernel.

UNVERIFIED ON A GPU: these kernels have only been run by Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors
(tests/test_triton_kernels.py), never compiled for or timed on a GPU; the block sizes below are reasoned, not measured.

Every form is a "scaled code" matrix: W[n, k] = c[n, k] * s[g, n] (+ o[g, n]) with g = k // span the scale group of k
and c a small integer (or e4m3 value) that the dot's input dtype holds exactly. So each (BM, BN) tile computes

    acc += (x_tile @ c_tile) * s[g] + x_tile.sum(-1) * o[g]          (fp32 accumulation, BK never straddles a group)

which dequantises nothing per element beyond the code itself (int4: 2 codes a byte; int8: the byte; fp8: its bits
placed in a float16, exactly 2**-8 of the e4m3 value, the 256 restored on the fp32 accumulator).

    int4_matmul     codes (N, K/2) uint8 "plain", scale_zero (K/g, N, 2)    W = (q - 8) * scale + offset
    int8_matmul     q (N, K) int8, scale (N,)                                 W = q * scale
    fp8_matmul      bits (N, K) uint8 e4m3, scale (N, ceil(K/block_k))        W = e4m3 * scale
    grouped_matmul  sorted MoE rows x E experts of any of the three (act-order and asymmetric int8 included)

Sync-free: no host reads of device tensors and shapes fixed by (R, E, N, K), so a CUDA graph can hold them. Grid is
(row tiles, N tiles, K splits). Decode (a few rows) is memory-bound, so K is split until the grid covers ~2 waves of
SMs; the splits' fp32 partials are summed by torch in a fixed order (bit-identical runs, no atomics). Block sizes are
fixed per row count, not autotuned: autotuning times configs on its first call, which may fall inside a graph capture.

The interpreter stores bfloat16 as raw uint16 and gets int -> bfloat16 casts and bfloat16 tl.dot wrong (only the
bfloat16 <-> float32 casts, loads and stores are right), so on CPU tensors a bfloat16 x is multiplied in float32
(DOT_DT); on the GPU the dot takes x's dtype. Products are exact either way, only the summation order differs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

INT4, INT8, FP8 = 0, 1, 2  # FORMAT of the codes
INTERPRETER_SMS = 4  # the "SM count" used to size split-K on CPU tensors (interpreter): small grids, still split
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _tile_of(ends_ptr, tile, E, BM: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile `tile` of the sorted rows -> (expert, first row, end of the expert's rows); expert >= E: no such tile.
    Each expert's rows [ends[e-1], ends[e]) are cut into ceil(count / BM) tiles, so no tile mixes experts."""
    e = tl.arange(0, BLOCK_E)
    ends = tl.load(ends_ptr + e, mask=e < E, other=0)  # (BLOCK_E,) padding experts: 0 rows
    starts = tl.load(ends_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
    tiles = (ends - starts + BM - 1) // BM  # tiles per expert
    tile_ends = tl.cumsum(tiles, 0)
    expert = tl.sum((tile_ends <= tile).to(tl.int32), 0)  # first expert whose tiles reach past `tile`
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)
    row0 = tl.sum(tl.where(mine, starts, 0), 0) + (tile - first_tile) * BM
    return expert, row0, tl.sum(tl.where(mine, ends, 0), 0)


@triton.jit
def _load_x(x_ptr, perm_base, rows, rmask, k, kmask, sxm, sxk, HAS_PERM: tl.constexpr):
    """(BM, len(k)) activations; act-order reads input channel perm[k] for position k."""
    if HAS_PERM:
        k = tl.load(perm_base + k, mask=kmask, other=0)
    ptrs = x_ptr + rows[:, None].to(tl.int64) * sxm + k[None, :] * sxk
    return tl.load(ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)


@triton.jit
def _e4m3_as_half(bits):
    """uint8 e4m3 bit patterns -> float16 holding 2**-8 times their value, exactly (sign, then the 4 exponent and 3
    mantissa bits into the float16's fields; subnormals keep the ratio). Integer ops only: any GPU, the interpreter."""
    b = bits.to(tl.int32)
    return (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _block_product(x_ptr, w_base, perm_base, rows, rmask, cols, nmask, k0, K, sxm, sxk, swn, swk,
                   FORMAT: tl.constexpr, HAS_PERM: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr,
                   BK: tl.constexpr):
    """One K block: (x_tile @ codes_tile, x_tile row sums), both fp32, (BM, BN) and (BM,)."""
    wmask = nmask[None, :]
    if FORMAT == 0:  # int4: byte j holds k = 2j (low nibble) and 2j + 1, so two half-width dots, no interleave
        k_even = k0 + 2 * tl.arange(0, BK // 2)  # (BK/2,)
        kmask = k_even < K  # K is even
        b = tl.load(w_base + cols[None, :] * swn + (k_even // 2)[:, None] * swk, mask=kmask[:, None] & wmask,
                    other=0)  # (BK/2, BN) uint8
        xe = _load_x(x_ptr, perm_base, rows, rmask, k_even, kmask, sxm, sxk, HAS_PERM)
        xo = _load_x(x_ptr, perm_base, rows, rmask, k_even + 1, kmask, sxm, sxk, HAS_PERM)
        lo = ((b & 15).to(tl.int8) - 8).to(DOT_DT)
        hi = ((b >> 4).to(tl.int8) - 8).to(DOT_DT)
        part = tl.dot(xe.to(DOT_DT), lo, input_precision=PRECISION)
        part = tl.dot(xo.to(DOT_DT), hi, part, input_precision=PRECISION)
        return part, tl.sum(xe.to(tl.float32), 1) + tl.sum(xo.to(tl.float32), 1)
    k = k0 + tl.arange(0, BK)
    kmask = k < K
    c = tl.load(w_base + cols[None, :] * swn + k[:, None] * swk, mask=kmask[:, None] & wmask, other=0)  # (BK, BN)
    if FORMAT == 1:
        c = c.to(DOT_DT)  # int8 codes: exact in bf16 / fp16 / fp32
    else:
        c = _e4m3_as_half(c).to(DOT_DT)  # 2**-8 * e4m3: 3 mantissa bits, exact in bf16 / fp32
    xt = _load_x(x_ptr, perm_base, rows, rmask, k, kmask, sxm, sxk, HAS_PERM)
    return tl.dot(xt.to(DOT_DT), c, input_precision=PRECISION), tl.sum(xt.to(tl.float32), 1)


@triton.jit
def _quant_gemm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, perm_ptr, ends_ptr, y_ptr,
                       M, N, K, E, span, kb_per_split,
                       sxm, sxk, swe, swn, swk, sse, ssg, ssn, spe, sys_, sym, syn,
                       FORMAT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_PERM: tl.constexpr,
                       GROUPED: tl.constexpr, ONE_GROUP: tl.constexpr, DOT_DT: tl.constexpr,
                       PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       BLOCK_E: tl.constexpr):
    """y[split, rows, cols] = x[rows] @ W[expert][cols].T over this split's K blocks (fp32 partial or final)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if GROUPED:
        expert, row0, row_end = _tile_of(ends_ptr, pid_m, E, BM, BLOCK_E)
        if expert >= E:  # a spare tile of the static grid: nothing to do
            return
    else:
        expert, row0, row_end = pid_m * 0, pid_m * BM, M
    rows = row0 + tl.arange(0, BM)  # (BM,) all in one expert
    cols = pid_n * BN + tl.arange(0, BN)  # (BN,) output features
    rmask, nmask = rows < row_end, cols < N
    e64 = expert.to(tl.int64)  # expert offsets can pass 2**31 elements
    w_base, s_base, o_base = w_ptr + e64 * swe, s_ptr + e64 * sse, o_ptr + e64 * sse
    perm_base = perm_ptr + e64 * spe
    kb0 = pid_k * kb_per_split
    kb1 = tl.minimum(kb0 + kb_per_split, tl.cdiv(K, BK))
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    xsum = tl.zeros((BM,), dtype=tl.float32)
    for kb in range(kb0, kb1):
        part, psum = _block_product(x_ptr, w_base, perm_base, rows, rmask, cols, nmask, kb * BK, K, sxm, sxk, swn,
                                    swk, FORMAT, HAS_PERM, DOT_DT, PRECISION, BK)
        if ONE_GROUP:  # one scale per row of W: applied once, after the loop
            acc += part
            xsum += psum
        else:  # BK divides span, so the whole block is in group g
            g = kb * BK // span
            s = tl.load(s_base + g * ssg + cols * ssn, mask=nmask, other=0.0).to(tl.float32)
            acc += part * s[None, :]
            if HAS_OFFSET:
                o = tl.load(o_base + g * ssg + cols * ssn, mask=nmask, other=0.0).to(tl.float32)
                acc += psum[:, None] * o[None, :]
    if ONE_GROUP:
        acc = acc * tl.load(s_base + cols * ssn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if HAS_OFFSET:
            acc += xsum[:, None] * tl.load(o_base + cols * ssn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if FORMAT == 2:
        acc = acc * 256.0  # the float16 codes held 2**-8 of each e4m3 value (exact power of two)
    ptrs = y_ptr + pid_k * sys_ + rows[:, None].to(tl.int64) * sym + cols[None, :] * syn
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


def _sm_count(device: torch.device) -> int:
    return INTERPRETER_SMS if device.type != "cuda" else _cuda_sms(device.index)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count  # host-side query, no sync


def _blocks(rows_per_tile: float, k: int, span: int, fmt: int, dtype: torch.dtype) -> tuple[int, ...]:
    """(BM, BN, BK, num_warps, num_stages) for tiles of about `rows_per_tile` rows (reasoned for H100/H200)."""
    if rows_per_tile <= 16:  # decode: a GEMV in effect; BM 16 is tl.dot's least M, the grid is made by split-K
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif rows_per_tile <= 32:
        bm, bn, bk, warps, stages = 32, 64, 128, 4, 4
    elif rows_per_tile <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:  # prefill: compute-bound, a Hopper-sized tile (wgmma needs BM >= 64 and warps in fours)
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    least = 32 if fmt == INT4 else 16  # tl.dot's least K (int4 dots half blocks)
    if span >= k:  # one group: any block, masked at K
        bk = max(least, min(bk, triton.next_power_of_2(k)))
    else:  # the largest power of two <= bk dividing the group, so no block straddles two scales
        while bk > least and span % bk:
            bk //= 2
        if span % bk:
            raise ValueError(f"a scale group of {span} inputs is not a multiple of {least}; the Triton quantized "
                             f"kernels need groups in multiples of {least}")
    if dtype == torch.float32:
        stages = min(stages, 2)  # fp32 tiles are twice the shared memory
    return bm, bn, bk, warps, stages


def _split_k(programs: int, k_blocks: int, device: torch.device) -> tuple[int, int]:
    """(splits, K blocks per split): double the splits until the grid covers ~2 waves of SMs or K runs out."""
    split, target = 1, 2 * _sm_count(device)
    while programs * split < target and split * 2 <= k_blocks:
        split *= 2
    per_split = triton.cdiv(k_blocks, split)
    return triton.cdiv(k_blocks, per_split), per_split  # no empty splits


def _launch(x, fmt, w, w_strides, scale, s_strides, offset, perm, group_ends, n, span):
    """x (R, K) -> (R, N). w: codes, strides (expert, n, k-element or byte); scale / offset: strides (expert, group,
    n); perm (E, K) or None; group_ends (E,) or None (one matrix); span: inputs per scale group."""
    rows, k = x.shape
    experts = 1 if group_ends is None else group_ends.shape[0]
    if rows == 0:
        return x.new_empty((0, n))
    bm, bn, bk, warps, stages = _blocks(rows / experts, k, span, fmt, x.dtype)
    # static row tiles: an expert with c rows takes ceil(c / BM) <= c // BM + 1 tiles, idle experts none
    tiles = triton.cdiv(rows, bm) if group_ends is None else rows // bm + min(experts, rows)
    n_tiles, k_blocks = triton.cdiv(n, bn), triton.cdiv(k, bk)
    split, per_split = _split_k(tiles * n_tiles, k_blocks, x.device)
    y = torch.empty((split, rows, n), device=x.device, dtype=x.dtype if split == 1 else torch.float32)
    interpreted = x.device.type == "cpu"  # GPU kernels never see CPU tensors: this is the interpreter
    dot_dt = tl.float32 if interpreted and x.dtype == torch.bfloat16 else TL_DTYPES[x.dtype]
    _quant_gemm_kernel[(tiles, n_tiles, split)](
        x, w, scale, scale if offset is None else offset, w if perm is None else perm,
        w if group_ends is None else group_ends, y,
        rows, n, k, experts, span, per_split,
        x.stride(0), x.stride(1), *w_strides, *s_strides, 0 if perm is None else perm.stride(0), *y.stride(),
        FORMAT=fmt, HAS_OFFSET=offset is not None, HAS_PERM=perm is not None, GROUPED=group_ends is not None,
        ONE_GROUP=span >= k, DOT_DT=dot_dt, PRECISION="ieee" if dot_dt == tl.float32 else "tf32",
        BM=bm, BN=bn, BK=bk, BLOCK_E=triton.next_power_of_2(experts), num_warps=warps, num_stages=stages)
    return y[0] if split == 1 else y.sum(0).to(x.dtype)  # fixed-order sum of the splits' fp32 partials


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int) -> torch.Tensor:
    """x (M, K); packed uint8 (N, K/2) plain layout; scale_zero (K/group, N, 2) -> x @ W.T, (M, N)."""
    n = packed.shape[0]
    assert x.shape[1] == 2 * packed.shape[1], (x.shape, packed.shape)
    sz = scale_zero
    return _launch(x, INT4, packed, (0, packed.stride(0), packed.stride(1)), sz[..., 0],
                   (0, sz.stride(0), sz.stride(1)), sz[..., 1], None, None, n, group)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K); q int8 (N, K); scale (N,) -> x @ (q * scale[:, None]).T, (M, N)."""
    assert x.shape[1] == q.shape[1], (x.shape, q.shape)
    return _launch(x, INT8, q, (0, q.stride(0), q.stride(1)), scale, (0, 0, scale.stride(0)), None, None, None,
                   q.shape[0], q.shape[1])


def fp8_matmul(x: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor, block_k: int) -> torch.Tensor:
    """x (M, K); bits uint8 (N, K) e4m3 patterns; scale (N, ceil(K / block_k)) -> x @ W.T, (M, N)."""
    assert x.shape[1] == bits.shape[1], (x.shape, bits.shape)
    return _launch(x, FP8, bits, (0, bits.stride(0), bits.stride(1)), scale, (0, scale.stride(1), scale.stride(0)),
                   None, None, None, bits.shape[0], block_k)


def grouped_matmul(rows: torch.Tensor, matrices, group_ends: torch.Tensor) -> torch.Tensor:
    """rows (R, K) sorted by expert, group_ends (E,) int32 cumulative (ends[-1] == R) -> (R, N), row r times its
    expert's W.T. matrices: an Int4Matrices / Int8Matrices / Fp8Matrices with count E."""
    from .matrices import Fp8Matrices, Int4Matrices, Int8Matrices

    n, k = matrices.out_features, matrices.in_features
    assert matrices.count == group_ends.shape[0] and rows.shape[1] == k, (matrices.count, group_ends.shape, k)
    if isinstance(matrices, Int4Matrices):
        w, sz = matrices.packed, matrices.scale_zero  # (E, N, K/2), (E, K/g, N, 2)
        return _launch(rows, INT4, w, w.stride(), sz[..., 0], sz.stride()[:3], sz[..., 1], matrices.perm,
                       group_ends, n, matrices.group)
    if isinstance(matrices, Int8Matrices):
        s = matrices.scale  # (E, N, G); offset the same shape
        return _launch(rows, INT8, matrices.q, matrices.q.stride(), s, (s.stride(0), s.stride(2), s.stride(1)),
                       matrices.offset, None, group_ends, n, k // matrices.groups)
    if isinstance(matrices, Fp8Matrices):
        s = matrices.scale  # (E, N, ceil(K / block_k))
        return _launch(rows, FP8, matrices.bits, matrices.bits.stride(), s, (s.stride(0), s.stride(2), s.stride(1)),
                       None, None, group_ends, n, matrices.block_k)
    raise TypeError(f"grouped_matmul takes int4 / int8 / fp8 matrices, not {type(matrices).__name__}")
