"""The Triton quantized products (thinktalk/quant/triton_kernels.py) against plain torch, run by Triton's interpreter.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton (transformers does, while
pytest collects), so the kernels run interpreted on CPU tensors; with a GPU they run compiled, on it. Reference: F.linear with `matrices.dequantize(index)` in
float32, from matrices built as on CUDA ("plain" int4 layout) and moved to the CPU. Sizes are small: the interpreter
runs every program in numpy. The interpreter gets bfloat16 dots wrong, so a bfloat16 x is multiplied in float32 there
(see the kernel module); bfloat16 cases check everything else (loads, scales, casts, stores).
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install triton; its interpreter runs on the CPU)")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from thinktalk.quant import triton_kernels as tk  # noqa: E402
from thinktalk.quant.decoded import IntMatrix, quantize_fp8, quantize_int  # noqa: E402
from thinktalk.quant.matrices import matrices_for  # noqa: E402
from thinktalk.quant.spec import WeightSpec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before triton was imported (tests/conftest.py sets it)",
                allow_module_level=True)

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # of the reference's largest |value|

INT4_G32 = WeightSpec("int", bits=4, group_size=32, symmetric=False)
INT4_G128 = WeightSpec("int", bits=4, group_size=128, symmetric=False)
INT4_G32_ACT = WeightSpec("int", bits=4, group_size=32, symmetric=False, act_order=True)
INT4_G128_ACT = WeightSpec("int", bits=4, group_size=128, symmetric=True, act_order=True)
INT8_SYM = WeightSpec("int", bits=8)
INT8_ASYM = WeightSpec("int", bits=8, symmetric=False)
INT8_G64 = WeightSpec("int", bits=8, group_size=64, symmetric=False)
FP8_BLOCK = WeightSpec("fp8", block=(128, 128))
FP8_CHANNEL = WeightSpec("fp8", block=None)


def decoded(spec: WeightSpec, n: int, k: int, generator: torch.Generator):
    """A random matrix in the decoded form a checkpoint gives (act-order: groups scattered over the inputs)."""
    w = torch.randn(n, k, generator=generator) / k ** 0.5
    if spec.kind == "fp8":
        return quantize_fp8(w, spec.block or (1, k))
    if not spec.act_order:
        return quantize_int(w, spec.bits, spec.group_size, spec.symmetric)
    groups = k // spec.group_size
    q = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    scale = torch.rand(n, groups, generator=generator) * 0.02 + 0.005
    zero = torch.full((n, groups), 8.0) if spec.symmetric else \
        torch.randint(0, 16, (n, groups), generator=generator).float()
    group_of = torch.arange(k)[torch.randperm(k, generator=generator)] // spec.group_size
    return IntMatrix(q, scale, zero, 4, group_of)


def build(spec: WeightSpec, count, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    matrices = matrices_for(spec, count, n, k, dtype, device_type="cuda").to_empty(device=DEVICE)
    for index in [None] if count is None else range(count):
        matrices.store(decoded(spec, n, k, generator), index)
    return matrices


def product(matrices, x):
    """The single-matrix kernel for `matrices`, called as QuantMatrices.matmul calls it on CUDA."""
    if hasattr(matrices, "packed"):
        if matrices.perm is not None:
            x = x.index_select(-1, matrices.perm)
        return tk.int4_matmul(x, matrices.packed, matrices.scale_zero, matrices.group)
    if hasattr(matrices, "q"):
        out = tk.int8_matmul(x, matrices.q, matrices.scale[:, 0])
        return out if matrices.offset is None else out + x.sum(-1, keepdim=True) * matrices.offset[:, 0]
    return tk.fp8_matmul(x, matrices.bits, matrices.scale, matrices.block_k)


def assert_close(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    error = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert error < TOLERANCE[dtype], error


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels run compiled")
def test_kernels_run_interpreted():
    assert isinstance(tk._quant_gemm_kernel, InterpretedFunction)


@pytest.mark.parametrize("spec", [INT4_G32, INT4_G128, INT4_G32_ACT, INT4_G128_ACT, INT8_SYM, INT8_ASYM, FP8_BLOCK,
                                  FP8_CHANNEL], ids=lambda s: s.describe())
@pytest.mark.parametrize("m", [1, 5, 40])
def test_single_matrix_float32(spec, m):
    matrices = build(spec, None, 80, 256, torch.float32)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    assert_close(product(matrices, x), F.linear(x, matrices.dequantize()), torch.float32)


@pytest.mark.parametrize("spec", [INT4_G32, INT4_G128_ACT, INT8_ASYM, FP8_BLOCK], ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_single_matrix_half_dtypes(spec, dtype):
    matrices = build(spec, None, 64, 256, dtype)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    assert_close(product(matrices, x), F.linear(x.float(), matrices.dequantize().float()), dtype)


@pytest.mark.parametrize("spec", [INT8_SYM, FP8_BLOCK], ids=lambda s: s.describe())
def test_width_not_a_multiple_of_the_block(spec):
    """K = 320: the last K block is masked (and for fp8, the last 128-wide scale block is partial)."""
    matrices = build(spec, None, 48, 320, torch.float32)
    x = torch.randn(4, 320, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert_close(product(matrices, x), F.linear(x, matrices.dequantize()), torch.float32)


@pytest.mark.parametrize("sms", [1, 64])
def test_split_k_matches_one_split(monkeypatch, sms):
    """The interpreter's SM count sets the split: 1 SM -> 2 splits here, 64 -> 8 (K blocks of 32, group 32)."""
    if DEVICE == "cuda":
        pytest.skip("the split follows the GPU's own SM count there")
    monkeypatch.setattr(tk, "INTERPRETER_SMS", sms)
    matrices = build(INT4_G32, None, 64, 256, torch.float32)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(3))
    assert tk._split_k(1, 8, x.device)[0] == (2 if sms == 1 else 8)
    assert_close(product(matrices, x), F.linear(x, matrices.dequantize()), torch.float32)


COUNTS = {1: [0, 0, 1, 0, 0, 0], 8: [0, 2, 1, 0, 5, 0], 100: [0, 37, 0, 50, 3, 10]}  # rows per expert, idle ones


def grouped_case(spec, rows, dtype, n=80, k=256):
    matrices = build(spec, len(COUNTS[rows]), n, k, dtype, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + 1)).to(DEVICE, dtype)
    group_ends = torch.tensor(COUNTS[rows]).cumsum(0).to(DEVICE, torch.int32)
    ref = torch.empty(rows, n, device=DEVICE)
    start = 0
    for expert, end in enumerate(group_ends.tolist()):
        ref[start:end] = F.linear(x[start:end].float(), matrices.dequantize(expert).float())
        start = end
    return tk.grouped_matmul(x, matrices, group_ends), ref


@pytest.mark.parametrize("spec", [INT4_G32, INT4_G128, INT4_G32_ACT, INT4_G128_ACT, INT8_SYM, INT8_ASYM, INT8_G64,
                                  FP8_BLOCK, FP8_CHANNEL], ids=lambda s: s.describe())
@pytest.mark.parametrize("rows", [1, 8, 100])
def test_grouped_float32(spec, rows):
    out, ref = grouped_case(spec, rows, torch.float32)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("spec", [INT4_G128_ACT, INT8_ASYM, FP8_BLOCK], ids=lambda s: s.describe())
def test_grouped_bfloat16(spec):
    out, ref = grouped_case(spec, 8, torch.bfloat16)
    assert_close(out, ref, torch.bfloat16)


def test_grouped_prefill_sized_tiles():
    """~67 rows per expert: 128-row tiles, two for expert 0 (the second partial), one for expert 2."""
    counts = [130, 0, 70]
    matrices = build(INT8_ASYM, 3, 32, 128, torch.float32)
    x = torch.randn(sum(counts), 128, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    group_ends = torch.tensor(counts).cumsum(0).to(DEVICE, torch.int32)
    out = tk.grouped_matmul(x, matrices, group_ends)
    ref = torch.cat([F.linear(x[:130], matrices.dequantize(0)), F.linear(x[130:], matrices.dequantize(2))])
    assert_close(out, ref, torch.float32)


def test_group_not_a_multiple_of_16_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        tk._blocks(1, 256, 24, tk.INT8, torch.float32)


@pytest.mark.parametrize("spec", [INT4_G32, INT4_G32_ACT, INT8_ASYM, FP8_BLOCK], ids=lambda s: s.describe())
def test_quantized_experts_on_the_cuda_path_equal_float_experts(spec):
    """QuantExperts built for CUDA (its GROUPED path: grouped_matmul for both projections) against the float
    Experts holding the dequantised weights; idle experts and uneven groups included."""
    from thinktalk.layers.moe import Experts, ExpertPath
    from thinktalk.quant.modules import QuantExperts

    gen = torch.Generator().manual_seed(5)
    num, hidden, inter, tokens, top_k = 6, 128, 64, 7, 2
    quantized = QuantExperts(num, hidden, inter, spec, spec, torch.float32, "cuda").to_empty(device=DEVICE)
    reference = Experts(num, hidden, inter).to(DEVICE)
    for e in range(num):
        quantized.gate_up_proj.store(decoded(spec, 2 * inter, hidden, gen), e)
        quantized.down_proj.store(decoded(spec, hidden, inter, gen), e)
        with torch.no_grad():
            reference.gate_up_proj[e] = quantized.gate_up_proj.dequantize(e)
            reference.down_proj[e] = quantized.down_proj.dequantize(e)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE)
    chosen = torch.stack([torch.tensor([0, 2, 5])[torch.randperm(3, generator=gen)[:top_k]] for _ in range(tokens)])
    chosen, weights = chosen.to(DEVICE), torch.rand(tokens, top_k, generator=gen).softmax(-1).to(DEVICE)
    assert quantized.choose_path(x) is ExpertPath.GROUPED
    with torch.inference_mode():
        ours, theirs = quantized(x, weights, chosen), reference(x, weights, chosen, path=ExpertPath.BLOCKS)
    torch.testing.assert_close(ours, theirs, atol=1e-4 * theirs.abs().max().item(), rtol=0)
