"""The stored forms of quantized matrices (thinktalk/quant/matrices.py) and the MoE paths around them."""

from __future__ import annotations

import pytest
import torch

from thinktalk.layers.moe import Experts, ExpertPath, grouped_mm_is_fast
from thinktalk.quant.decoded import IntMatrix, quantize_fp8, quantize_int
from thinktalk.quant.int4_layout import pack_cpu, pack_plain, unpack_cpu, unpack_plain
from thinktalk.quant.matrices import fp8_e4m3_bits_to_half, matrices_for
from thinktalk.quant.modules import QuantExperts
from thinktalk.quant.spec import QuantizationError, WeightSpec

SPECS = {
    "int4 g32 sym": WeightSpec("int", bits=4, group_size=32, symmetric=True),
    "int4 g128 asym": WeightSpec("int", bits=4, group_size=128, symmetric=False),
    "int4 per-channel": WeightSpec("int", bits=4, group_size=None, symmetric=True),
    "int8 per-channel sym": WeightSpec("int", bits=8),
    "int8 per-channel asym": WeightSpec("int", bits=8, symmetric=False),
    "int8 g64 asym": WeightSpec("int", bits=8, group_size=64, symmetric=False),
    "fp8 128x128 blocks": WeightSpec("fp8", block=(128, 128)),
    "fp8 per-channel": WeightSpec("fp8"),
}


def decoded(spec: WeightSpec, w: torch.Tensor):
    if spec.kind == "fp8":
        return quantize_fp8(w, spec.block or (1, w.shape[1]))
    return quantize_int(w, spec.bits, spec.group_size, spec.symmetric)


@pytest.mark.parametrize("rows, cols", [(64, 64), (128, 96), (48, 64), (96, 32), (192, 256), (16, 8)])
def test_cpu_int4_layout_is_torchs_own(rows, cols):
    q = torch.randint(0, 16, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows + cols))
    packed = pack_cpu(q)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
    assert torch.equal(unpack_cpu(packed), q)
    assert torch.equal(unpack_plain(pack_plain(q)), q)


def test_fp8_bits_decode_exactly_every_finite_code():
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    finite = values.isfinite()
    decoded_values = fp8_e4m3_bits_to_half(codes).float() * 256
    assert torch.equal(decoded_values[finite], values[finite])


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_product_equals_the_dequantised_matrix(name, dtype):
    spec, gen = SPECS[name], torch.Generator().manual_seed(1)
    w, x = torch.randn(96, 256, generator=gen) / 16, torch.randn(5, 256, generator=gen)
    matrix = decoded(spec, w)
    stored = matrices_for(spec, 3, 96, 256, dtype, "cpu").to_empty(device="cpu")
    stored.store(matrix, 1)
    exact = matrix.dequantize()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2 * exact.abs().max().item()
    torch.testing.assert_close(stored.dequantize(1).float(), exact, atol=tolerance, rtol=0)
    expected = x.to(dtype).float() @ exact.t()
    got = stored.matmul(x.to(dtype), 1).float()
    torch.testing.assert_close(got, expected, atol=1e-4 if dtype == torch.float32 else 0.05 * expected.abs().max(),
                               rtol=0 if dtype == torch.float32 else 1e-2)


def test_act_order_groups_are_made_contiguous_exactly():
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(64, 128, generator=gen), torch.randn(3, 128, generator=gen)
    plain = quantize_int(w, 4, 32, symmetric=False)
    groups = torch.randperm(128, generator=gen) // 32  # each input channel's group, in a shuffled order
    matrix = IntMatrix(plain.q, plain.scale, plain.zero, 4, groups)
    stored = matrices_for(WeightSpec("int", 4, 32, False, act_order=True), None, 64, 128, torch.float32, "cpu")
    stored = stored.to_empty(device="cpu")
    stored.store(matrix)
    torch.testing.assert_close(stored.dequantize(), matrix.dequantize(), atol=1e-6, rtol=0)
    torch.testing.assert_close(stored.matmul(x), x @ matrix.dequantize().t(), atol=1e-4, rtol=0)


def test_groups_of_uneven_size_are_refused():
    plain = quantize_int(torch.randn(32, 64), 4, 32, symmetric=True)
    groups = torch.zeros(64, dtype=torch.long)
    groups[40:] = 1  # 40 channels in one group, 24 in the other: no kernel group of 32 fits
    stored = matrices_for(WeightSpec("int", 4, 32, True, act_order=True), None, 32, 64, torch.float32, "cpu")
    with pytest.raises(QuantizationError, match="groups .* not 32 contiguous input channels"):
        stored.to_empty(device="cpu").store(IntMatrix(plain.q, plain.scale, plain.zero, 4, groups))


def test_widths_the_int4_kernels_cannot_take_are_refused():
    with pytest.raises(QuantizationError, match="group_size 16"):
        matrices_for(WeightSpec("int", 4, 16), None, 32, 64, torch.float32, "cpu")
    with pytest.raises(QuantizationError, match="rows in multiples of 16"):
        matrices_for(WeightSpec("int", 4, 32), None, 40, 64, torch.float32, "cpu")


def _experts(num, hidden, inter, gen):
    experts = Experts(num, hidden, inter)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) / hidden ** 0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) / inter ** 0.5)
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_experts_equal_float_experts_on_the_dequantised_weights(dtype):
    """QuantExperts routes exactly as Experts does: with the dequantised weights in a float Experts, the outputs
    agree (float32: to rounding; the routing and combine are the same code)."""
    gen = torch.Generator().manual_seed(3)
    num, hidden, inter, tokens, top_k = 6, 64, 32, 9, 2
    reference = _experts(num, hidden, inter, gen)
    spec = WeightSpec("int", bits=8, symmetric=False)
    quantized = QuantExperts(num, hidden, inter, spec, spec, dtype, "cpu").to_empty(device="cpu")
    for e in range(num):
        quantized.gate_up_proj.store(quantize_int(reference.gate_up_proj[e].detach(), 8, None, False), e)
        quantized.down_proj.store(quantize_int(reference.down_proj[e].detach(), 8, None, False), e)
        with torch.no_grad():
            reference.gate_up_proj[e] = quantized.gate_up_proj.dequantize(e).float()
            reference.down_proj[e] = quantized.down_proj.dequantize(e).float()
    reference = reference.to(dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    chosen = torch.stack([torch.randperm(num, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1).to(dtype)
    with torch.inference_mode():
        ours = quantized(x, weights, chosen).float()
        theirs = reference(x, weights, chosen, path=ExpertPath.BLOCKS).float()
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0 if dtype == torch.float32 else 2e-2)


def test_moe_combine_is_bit_identical_run_to_run_and_sums_in_float32():
    gen = torch.Generator().manual_seed(4)
    experts = _experts(8, 32, 16, gen).bfloat16()
    x = torch.randn(33, 32, generator=gen).bfloat16()
    chosen = torch.stack([torch.randperm(8, generator=gen)[:4] for _ in range(33)])
    weights = torch.rand(33, 4, generator=gen).softmax(-1).bfloat16()
    with torch.inference_mode():
        runs = [experts(x, weights, chosen, path=ExpertPath.BLOCKS) for _ in range(3)]
        per_slot = [torch.nn.functional.linear(  # each (token, slot)'s expert output, exactly as the block path
            torch.nn.functional.silu(g) * u, experts.down_proj[e]) for e, (g, u) in (
            (e, torch.nn.functional.linear(x[t:t + 1], experts.gate_up_proj[e]).chunk(2, -1))
            for t in range(33) for e in chosen[t].tolist())]
    assert all(torch.equal(runs[0], run) for run in runs[1:])
    products = torch.cat(per_slot).view(33, 4, 32) * weights.unsqueeze(-1)  # rounded to bf16, as the reference
    expected = products.float().sum(1).bfloat16()  # float32 sum, one rounding
    torch.testing.assert_close(runs[0], expected, atol=0, rtol=1e-2)


@pytest.mark.parametrize("capability, fast", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True),
                                              ((12, 0), False)])
def test_grouped_gemm_only_where_torch_has_a_fast_one(capability, fast):
    assert grouped_mm_is_fast(torch.bfloat16, capability) is fast
    assert grouped_mm_is_fast(torch.float32, capability) is False
