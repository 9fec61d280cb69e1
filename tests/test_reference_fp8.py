"""The CPU reference for FP8: hand-computed quantization, partial blocks, GEMM against loops."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hal import ops
from hal.backends.cpu import KERNELS, float64_evaluation

NAN, INF = float("nan"), float("inf")


def test_quantize_hand_computed():
    # amax 896 -> s = 896 / 448 = 2 -> q = [448, -224, 0.5, 0]  (all exact in e4m3)
    q, s = ops.fp8_quantize(torch.tensor([[896.0, -448.0, 1.0, 0.0]]), group_size=4)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.tolist() == [[2.0]] and q.float().tolist() == [[448.0, -224.0, 0.5, 0.0]]
    # amax 600 -> s = 600/448; ue8m0 rounds s up to 2: q = [300 -> 288 (nearest e4m3: 288 or 320), 0.5]
    q, s = ops.fp8_quantize(torch.tensor([[600.0, 1.0]]), group_size=2, scale_format="ue8m0")
    assert s.tolist() == [[2.0]] and q.float().tolist() == [[288.0, 0.5]]
    q, s = ops.fp8_quantize(torch.tensor([[600.0, 1.0]]), group_size=2)
    assert s.item() == pytest.approx(600 / 448) and q.float()[0, 0] == 448.0
    # an all-zero group uses the 1e-4 floor: s = 1e-4 / 448, q = 0
    q, s = ops.fp8_quantize(torch.zeros(1, 3))
    assert s.item() == pytest.approx(1e-4 / 448) and q.float().abs().sum() == 0


def test_quantize_groups_and_partial_last_group():
    # K = 5 with groups of 2: groups [1, -4], [8, 2], [16] -> s = [4, 8, 16] / 448
    x = torch.tensor([[1.0, -4.0, 8.0, 2.0, 16.0]])
    q, s = ops.fp8_quantize(x, group_size=2)
    torch.testing.assert_close(s, torch.tensor([[4.0, 8.0, 16.0]]) / 448)
    assert q.float()[0, [1, 2, 4]].tolist() == [-448.0, 448.0, 448.0]
    assert q.shape == (1, 5) and q.is_contiguous()


def test_quantize_non_finite():
    q, s = ops.fp8_quantize(torch.tensor([[NAN, 1.0, 2.0, 3.0, 5.0, 6.0]]), group_size=3)
    assert torch.isnan(q.float()[0, :3]).all() and math.isnan(s[0, 0]) and not torch.isnan(q.float()[0, 3:]).any()
    q, s = ops.fp8_quantize(torch.tensor([[INF, 1.0, -2.0, 3.0]]), group_size=4)
    assert math.isnan(q.float()[0, 0]) and q.float()[0, 1:].tolist() == [0.0, 0.0, 0.0] and s[0, 0] == INF
    # huge finite values saturate through the scale, never NaN (a raw cast would overflow)
    q, _ = ops.fp8_quantize(torch.tensor([[1e30, -3e29]]))
    assert torch.isfinite(q.float()).all() and q.float()[0, 0] == 448.0


def _e4m3_bound(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """|x - dequant| <= half an e4m3 step: 2^-4 relative for normals (3 mantissa bits), 2^-10 * s
    absolute in the subnormal range (|x/s| < 2^-6, step 2^-9); a little slack for the fp32 division."""
    return torch.maximum(x.abs() * 2.0 ** -4, s * 2.0 ** -10) * (1 + 1e-6) + 1e-30


@settings(max_examples=30, deadline=None)
@given(M=st.integers(0, 5), K=st.integers(1, 300), group=st.sampled_from([32, 128]),
       fmt=st.sampled_from(["fp32", "ue8m0"]), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       mag=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_quantize_round_trip_bound_and_ue8m0_powers(M, K, group, fmt, dtype, mag, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * mag).to(dtype)
    q, s = ops.fp8_quantize(x, group_size=group, scale_format=fmt)
    G = -(-K // group)
    assert q.shape == (M, K) and s.shape == (M, G)
    per_elem = s.repeat_interleave(group, -1)[:, :K]
    deq = q.float() * per_elem
    assert (deq - x.float()).abs().le(_e4m3_bound(x.float(), per_elem)).all()
    if fmt == "ue8m0":
        assert torch.equal(torch.exp2(torch.round(torch.log2(s))), s)
    else:
        amax = torch.nn.functional.pad(x.float().abs(), (0, G * group - K)).view(M, G, group).amax(-1)
        torch.testing.assert_close(s, amax.clamp_min(1e-4) / 448, rtol=0, atol=0)


def test_quantize_weight_partial_blocks():
    # 576 x 160: blocks [5, 2]; every element of block (i, j) has magnitude (i+1)*10 + j, so each
    # scale is that value / 448 and every q is +-448 -- in the partial last row block (rows 512..575)
    # and the partial column block (cols 128..159) too.
    n = torch.arange(576)[:, None] // 128
    k = torch.arange(160)[None, :] // 128
    sign = torch.where((torch.arange(576)[:, None] + torch.arange(160)[None, :]) % 2 == 0, 1.0, -1.0)
    w = ((n + 1) * 10 + k).float() * sign
    q, s = ops.fp8_quantize_weight(w)
    assert s.shape == (5, 2)
    torch.testing.assert_close(s, ((torch.arange(5)[:, None] + 1) * 10 + torch.arange(2)[None, :]).float() / 448)
    assert torch.equal(q.float(), 448.0 * sign)


def _gemm_loops(a, a_s, b, b_s, bias=None):
    """y[m, n] = sum_kb a_s[m, kb] * b_s[n // 128, kb] * dot(a[m, kb], b[n, kb]), in float64 loops."""
    M, K = a.shape
    N = b.shape[0]
    af, bf = a.double(), b.double()
    y = torch.zeros(M, N, dtype=torch.float64)
    for kb in range(-(-K // 128)):
        blk = slice(kb * 128, min(K, (kb + 1) * 128))
        dot = af[:, blk] @ bf[:, blk].T
        y += a_s[:, kb, None].double() * b_s[torch.arange(N) // 128, kb][None, :].double() * dot
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("M,N,K", [(3, 5, 7), (4, 130, 200), (1, 256, 384), (5, 576, 160)])
def test_gemm_against_block_loops(M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    a, a_s = ops.fp8_quantize(torch.randn(M, K, generator=g) * 3)
    b, b_s = ops.fp8_quantize_weight(torch.randn(N, K, generator=g))
    bias = torch.randn(N, generator=g)
    want = _gemm_loops(a, a_s, b, b_s, bias)
    with float64_evaluation():
        y64 = KERNELS["fp8_gemm"](a, a_s, b, b_s, out_dtype=torch.bfloat16, bias=bias)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, want, rtol=1e-12, atol=1e-10)
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        y = ops.fp8_gemm(a, a_s, b, b_s, out_dtype=out_dtype, bias=bias)
        assert y.dtype == out_dtype and y.shape == (M, N)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[out_dtype]
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_gemm_close_to_unquantized_product():
    # DeepGEMM's bar: calc_diff against the unquantized product < 1e-3
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(64, 512, generator=g), torch.randn(256, 512, generator=g)
    y = ops.fp8_linear(x, *ops.fp8_quantize_weight(w))
    ref = (x.double() @ w.double().T)
    diff = 1 - 2 * (y.double() * ref).sum() / (y.double() ** 2 + ref ** 2).sum()
    assert diff < 1e-3 and y.dtype == torch.float32


def test_linear_is_quantize_then_gemm_with_leading_dims():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 200, generator=g).bfloat16()
    w_q, w_s = ops.fp8_quantize_weight(torch.randn(40, 200, generator=g))
    y = ops.fp8_linear(x, w_q, w_s, bias=torch.ones(40))
    a, a_s = ops.fp8_quantize(x.reshape(-1, 200))
    want = ops.fp8_gemm(a, a_s, w_q, w_s, out_dtype=torch.bfloat16, bias=torch.ones(40)).reshape(2, 3, 40)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16 and torch.equal(y, want)


def test_fp8_empty_inputs_and_determinism():
    q, s = ops.fp8_quantize(torch.zeros(0, 300))
    assert q.shape == (0, 300) and s.shape == (0, 3)
    b, b_s = ops.fp8_quantize_weight(torch.randn(8, 300))
    assert ops.fp8_gemm(q, s, b, b_s).shape == (0, 8)
    assert ops.fp8_linear(torch.zeros(0, 300), b, b_s).shape == (0, 8)
    x = torch.randn(6, 300)
    assert torch.equal(ops.fp8_linear(x, b, b_s), ops.fp8_linear(x, b, b_s))
