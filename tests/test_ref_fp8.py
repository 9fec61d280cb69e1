"""Proofs for the FP8 reference ops through ``hal.ops`` (validation + reference kernel).

Independent expectations: numbers worked out by hand, and numpy/ml_dtypes loops that share no code
with the reference (ml_dtypes' float8_e4m3fn cast is an implementation of e4m3 rounding separate
from torch's).
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hal import ops
from hal.backends.cpu import KERNELS, float64_evaluation

F8 = torch.float8_e4m3fn
NAN, INF = float("nan"), float("inf")


# ---- independent numpy implementations ----------------------------------------------------------

def _pow2_at_least(s: float) -> float:
    """The smallest power of two >= s (exact, by frexp), non-finite values unchanged."""
    if not math.isfinite(s):
        return s
    m, e = math.frexp(s)                      # s = m * 2**e, 0.5 <= m < 1
    return s if m == 0.5 else math.ldexp(1.0, e)


def _np_quantize(x: np.ndarray, group: int, ue8m0: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row by row, group by group, in float32: s = max(amax, 1e-4) / 448, q = e4m3(clip(x / s))."""
    M, K = x.shape
    G = -(-K // group)
    q = np.zeros((M, K), np.float32)
    s = np.zeros((M, G), np.float32)
    for m in range(M):
        for g in range(G):
            chunk = x[m, g * group:(g + 1) * group].astype(np.float32)
            amax = np.abs(chunk).max()
            sc = np.float32(np.maximum(amax, np.float32(1e-4)) / np.float32(448.0))
            if ue8m0:
                sc = np.float32(_pow2_at_least(float(sc)))
            with np.errstate(invalid="ignore", divide="ignore"):
                y = np.clip(chunk / sc, np.float32(-448.0), np.float32(448.0))
            q[m, g * group:(g + 1) * group] = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            s[m, g] = sc
    return q, s


def _np_quantize_weight(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile by tile (partial tiles at the edges), in float32."""
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    q = np.zeros((N, K), np.float32)
    s = np.zeros((nb, kb), np.float32)
    for i in range(nb):
        for j in range(kb):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].astype(np.float32)
            sc = np.float32(np.maximum(np.abs(tile).max(), np.float32(1e-4)) / np.float32(448.0))
            y = np.clip(tile / sc, np.float32(-448.0), np.float32(448.0))
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            s[i, j] = sc
    return q, s


def _np_gemm(a, a_s, b, b_s, bias=None) -> np.ndarray:
    """y[m, n] = sum_kb a_s[m, kb] * b_s[n // 128, kb] * dot(a[m, kb-block], b[n, kb-block]), float64 loops."""
    a, b = a.float().double().numpy(), b.float().double().numpy()
    a_s, b_s = a_s.double().numpy(), b_s.double().numpy()
    M, K = a.shape
    N = b.shape[0]
    y = np.zeros((M, N))
    for m in range(M):
        for n in range(N):
            for kb in range(-(-K // 128)):
                blk = slice(kb * 128, (kb + 1) * 128)
                y[m, n] += a_s[m, kb] * b_s[n // 128, kb] * float(np.dot(a[m, blk], b[n, blk]))
    if bias is not None:
        y += bias.double().numpy()[None, :]
    return y


def _same(t: torch.Tensor, expected: np.ndarray) -> bool:
    """Equal values and equal NaN positions."""
    return bool(torch.equal(torch.isnan(t), torch.from_numpy(np.isnan(expected)))
                and torch.equal(torch.nan_to_num(t), torch.from_numpy(np.nan_to_num(expected))))


# ---- fp8_quantize: hand-computed ---------------------------------------------------------------

def test_quantize_fp32_scale_by_hand():
    # group [896, -448, 1, 0]: amax 896 -> s = 896/448 = 2 -> x/s = [448, -224, 0.5, 0], all e4m3 values
    # group [3, 0.1]:          amax 3   -> s = 3/448;  x/s = [448, 14.933..] -> e4m3 [448, 15] (spacing 1 in [8, 16))
    q, s = ops.fp8_quantize(torch.tensor([[896.0, -448.0, 1.0, 0.0, 3.0, 0.1]]), group_size=4)
    assert q.dtype == F8 and s.dtype == torch.float32 and q.shape == (1, 6) and s.shape == (1, 2)
    assert s[0, 0].item() == 2.0 and s[0, 1].item() == pytest.approx(3 / 448, rel=1e-7)
    assert q.float().tolist() == [[448.0, -224.0, 0.5, 0.0, 448.0, 15.0]]


def test_quantize_ue8m0_scale_by_hand():
    # amax 1000 -> s = 1000/448 = 2.23 -> ue8m0: 4. x/s = [250, 2.5, -0.01]
    # e4m3: 250 -> 256 (spacing 16 in [128, 256): 240 or 256, 250 is nearer 256); 2.5 exact;
    # -0.01 -> subnormal spacing 2^-9 = 0.001953: -0.01 / 0.001953 = -5.12 -> -5 * 2^-9 = -0.009765625
    q, s = ops.fp8_quantize(torch.tensor([[1000.0, 10.0, -0.04]]), group_size=3, scale_format="ue8m0")
    assert s.tolist() == [[4.0]]
    assert q.float().tolist() == [[256.0, 2.5, -5 * 2.0 ** -9]]
    # amax 896 -> s = 2 exactly, already a power of two: ue8m0 keeps 2 (not 4)
    _, s = ops.fp8_quantize(torch.tensor([[896.0, 1.0]]), scale_format="ue8m0")
    assert s.tolist() == [[2.0]]
    # s one fp32 step above a power of two must still round UP: amax = 448 * 1024 + 2^-4 (two fp32
    # steps above 458752) -> s = fl(amax / 448) = 1024 + 2^-13, the next float after 1024 -> 2048.
    # (An fp32 log2 rounds log2(1024 + 2^-13) to exactly 10 and would give 1024.)
    x = torch.tensor([[448.0 * 1024 + 2.0 ** -4]])
    _, s32 = ops.fp8_quantize(x)
    assert s32.item() == 1024 + 2.0 ** -13
    q, s = ops.fp8_quantize(x, scale_format="ue8m0")
    assert s.tolist() == [[2048.0]] and q.float().item() == 224.0     # 458752.06 / 2048 = 224.00003 -> 224


def test_quantize_saturates_values_beyond_448():
    # amax 1e30: s = 1e30/448; x/s for the amax element is 448 up to fp32 rounding -> clamped to 448
    # and never NaN (torch's own cast turns 465 into NaN in some versions; the clamp is the contract)
    q, s = ops.fp8_quantize(torch.tensor([[1e30, -3e29, 465.0]]))
    assert q.float()[0, 0].item() == 448.0 and torch.isfinite(q.float()).all()
    # -3e29 / (1e30/448) = -134.4 -> e4m3 spacing 16 in [128, 256): -128 (nearer than -144)
    assert q.float()[0, 1].item() == -128.0
    # 465 in a group with amax 465 -> s = 465/448, x/s = 448 -> 448
    q, _ = ops.fp8_quantize(torch.tensor([[465.0, 1.0]]))
    assert q.float()[0, 0].item() == 448.0


def test_quantize_partial_last_group_and_leading_dims():
    # K = 5, groups of 2: [1, -4] [8, 2] [16] -> s = [4/448, 8/448, 16/448]; the partial group [16]
    # has its own scale and its padding never shows: q = [112, -448, 448, 112, 448]
    x = torch.tensor([[1.0, -4.0, 8.0, 2.0, 16.0]])
    q, s = ops.fp8_quantize(x, group_size=2)
    assert q.shape == (1, 5) and s.shape == (1, 3)
    torch.testing.assert_close(s, torch.tensor([[4.0, 8.0, 16.0]]) / 448, rtol=0, atol=0)
    assert q.float().tolist() == [[112.0, -448.0, 448.0, 112.0, 448.0]]
    # [..., K]: a [2, 3, 5] input is three rows of the same rule per leading index
    x3 = x.expand(2, 3, 5) * torch.tensor([1.0, 2.0, 0.5])[None, :, None]
    q3, s3 = ops.fp8_quantize(x3, group_size=2)
    assert q3.shape == (2, 3, 5) and s3.shape == (2, 3, 3)
    assert torch.equal(q3.float(), q.float().expand(2, 3, 5))           # scaling a row scales only s
    torch.testing.assert_close(s3, s.expand(2, 3, 3) * torch.tensor([1.0, 2.0, 0.5])[None, :, None], rtol=0, atol=0)


def test_quantize_floor_for_tiny_groups():
    # amax below 1e-4 uses the floor: s = 1e-4/448; q = x / s: 2e-5 / (1e-4/448) = 89.6 -> 88 (spacing 8 in [64, 128))
    q, s = ops.fp8_quantize(torch.tensor([[2e-5, 0.0]]))
    assert s.item() == pytest.approx(1e-4 / 448, rel=1e-7) and q.float().tolist() == [[88.0, 0.0]]
    q, s = ops.fp8_quantize(torch.zeros(2, 3))
    assert q.float().abs().sum() == 0 and torch.all(s == s[0, 0])


def test_quantize_nan_and_inf_propagation():
    # groups of 3: [NaN, 1, 2] -> all NaN, scale NaN; [3, 5, 6] untouched by the NaN next door
    q, s = ops.fp8_quantize(torch.tensor([[NAN, 1.0, 2.0, 3.0, 5.0, 6.0]]), group_size=3)
    assert torch.isnan(q.float()[0, :3]).all() and math.isnan(s[0, 0].item())
    # [3, 5, 6]: s = 6/448 -> 3/s = 224, 5/s = 373.3 -> 384 (spacing 32 in [256, 448]), 6/s = 448
    assert q.float()[0, 3:].tolist() == [224.0, 384.0, 448.0] and s[0, 1].item() == pytest.approx(6 / 448)
    # Inf: its element NaN (inf/inf), the others 0 (finite/inf), scale Inf; -Inf likewise
    for inf in (INF, -INF):
        q, s = ops.fp8_quantize(torch.tensor([[1.0, inf, -2.0, 3.0]]), group_size=4)
        qf = q.float()[0]
        assert math.isnan(qf[1].item()) and qf[[0, 2, 3]].tolist() == [0.0, 0.0, 0.0] and s.item() == INF
    # NaN and Inf in one group: NaN wins (amax NaN) -> the whole group NaN
    q, s = ops.fp8_quantize(torch.tensor([[NAN, INF, 1.0]]))
    assert torch.isnan(q.float()).all() and math.isnan(s.item())
    # ue8m0 keeps the same propagation
    q, s = ops.fp8_quantize(torch.tensor([[1.0, INF], [NAN, 1.0]]), scale_format="ue8m0")
    assert s[0, 0].item() == INF and math.isnan(s[1, 0].item())
    assert q.float()[0, 0].item() == 0.0 and math.isnan(q.float()[0, 1].item()) and torch.isnan(q.float()[1]).all()


# ---- fp8_quantize: independent cross-check, bounds, invariants -----------------------------------

@settings(max_examples=30, deadline=None)
@given(M=st.integers(0, 4), K=st.integers(1, 300), group=st.sampled_from([1, 16, 100, 128]),
       fmt=st.sampled_from(["fp32", "ue8m0"]), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       log_mag=st.integers(-6, 6), seed=st.integers(0, 2**16))
def test_quantize_matches_numpy_ml_dtypes(M, K, group, fmt, dtype, log_mag, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 10.0 ** log_mag).to(dtype)
    q, s = ops.fp8_quantize(x, group_size=group, scale_format=fmt)
    want_q, want_s = _np_quantize(x.float().numpy(), group, fmt == "ue8m0")
    assert q.dtype == F8 and s.dtype == torch.float32
    assert _same(s, want_s) and _same(q.float(), want_q)


def _half_step(y: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at |y| (|y| <= 448): binade [2^e, 2^(e+1)) has 8 values, spacing
    2^(e-3); below the smallest normal 2^-6 the subnormal spacing is 2^-9."""
    e = torch.floor(torch.log2(y.abs().clamp_min(2.0 ** -6)))
    return torch.exp2(e - 4)


@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 4), K=st.integers(1, 260), group=st.sampled_from([32, 128]),
       fmt=st.sampled_from(["fp32", "ue8m0"]), log_mag=st.integers(-8, 8), seed=st.integers(0, 2**16))
def test_quantize_round_trip_error_bound(M, K, group, fmt, log_mag, seed):
    """|q*s - x| <= s * (half the e4m3 spacing at x/s) + the fp32 rounding of x/s, derived as:
    q = RNE_e4m3(y) with y = fl(x/s), |y| <= 448 (s >= amax/448), so |q - y| <= half a step; and
    |y - x/s| <= 2^-24 |x/s|. Per group this gives |q*s - x| <= 16 s (top binade [256, 448],
    spacing 32) = amax/28 for fp32 scales, and <= 2^-4 |x| for |x/s| >= 2^-6."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2.0 ** log_mag
    q, s = ops.fp8_quantize(x, group_size=group, scale_format=fmt)
    s_el = s.double().repeat_interleave(group, -1)[:, :K]
    xd = x.double()
    err = (q.double() * s_el - xd).abs()
    y = xd / s_el
    assert y.abs().max() <= 448 * (1 + 2.0 ** -23)
    bound = s_el * (_half_step(y) + 2.0 ** -24 * y.abs())
    assert (err <= bound * (1 + 1e-12)).all()
    assert (err <= 16 * s_el * (1 + 1e-6)).all()
    normal = y.abs() >= 2.0 ** -6
    assert (err[normal] <= 2.0 ** -4 * xd.abs()[normal] * (1 + 1e-6)).all()
    if fmt == "fp32":
        amax = torch.nn.functional.pad(x.abs(), (0, s.shape[1] * group - K)).view(M, -1, group).amax(-1)
        assert (err <= (amax.double().clamp_min(1e-4) / 28).repeat_interleave(group, -1)[:, :K] * (1 + 1e-6)).all()


@settings(max_examples=20, deadline=None)
@given(M=st.integers(1, 6), K=st.integers(1, 400), log_mag=st.integers(-20, 30), seed=st.integers(0, 2**16))
def test_ue8m0_scales_are_powers_of_two_at_least_amax_over_448(M, K, log_mag, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2.0 ** log_mag
    _, s = ops.fp8_quantize(x, scale_format="ue8m0")
    _, s32 = ops.fp8_quantize(x, scale_format="fp32")
    m, _ = torch.frexp(s)
    assert torch.all(m == 0.5)                                  # a power of two: mantissa exactly 1/2
    assert torch.all(s >= s32) and torch.all(s < 2 * s32)       # the smallest power of two >= amax/448


def test_quantize_empty_inputs():
    for shape, s_shape in (((0, 300), (0, 3)), ((3, 0), (3, 0)), ((2, 0, 5), (2, 0, 1))):
        q, s = ops.fp8_quantize(torch.zeros(shape))
        assert q.shape == shape and q.dtype == F8 and s.shape == s_shape and s.dtype == torch.float32


# ---- fp8_quantize_weight ----------------------------------------------------------------------

def test_quantize_weight_by_hand_partial_blocks():
    # 576 x 160 (DeepSeek-V3 kv_a_proj_with_mqa-like rows, K = 160): tiles [5 x 2], the last row
    # tile holds rows 512..575 (64 rows), the last column tile columns 128..159 (32 columns).
    # Fill tile (i, j) with +-(10 (i + 1) + j) except one element at 2x that magnitude:
    # scale[i, j] = 2 (10 (i + 1) + j) / 448; that element quantizes to +-448, the rest to +-224.
    n_blk = torch.arange(576)[:, None] // 128
    k_blk = torch.arange(160)[None, :] // 128
    mag = (10 * (n_blk + 1) + k_blk).float()
    sign = torch.where((torch.arange(576)[:, None] + torch.arange(160)[None, :]) % 3 == 0, -1.0, 1.0)
    w = mag * sign
    peaks = [(i * 128 + 5 * i + j, j * 128 + 7 * j) for i in range(5) for j in range(2)]
    for n, k in peaks:
        w[n, k] *= 2
    q, s = ops.fp8_quantize_weight(w)
    assert q.shape == (576, 160) and q.dtype == F8 and s.shape == (5, 2) and s.dtype == torch.float32
    want_s = 2 * (10 * (torch.arange(5)[:, None] + 1) + torch.arange(2)[None, :]).float() / 448
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    want_q = 224.0 * sign
    for n, k in peaks:
        want_q[n, k] *= 2
    assert torch.equal(q.float(), want_q)
    # dequant = q * scale[n // 128, k // 128] reproduces w exactly here (all values are exact)
    deq = q.float() * s[n_blk, k_blk]
    torch.testing.assert_close(deq, w, rtol=1e-6, atol=0)
    # a block size derived from the scale grid (160 // 2 = 80 columns) would read the wrong scale
    # for columns 80..127: the rule is element (n, k) -> scale[n // 128, k // 128], not k // 80
    wrong = q.float() * s[n_blk, torch.arange(160)[None, :] // 80]
    assert not torch.allclose(wrong, w)


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 300), K=st.integers(1, 300), block=st.sampled_from([32, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_quantize_weight_matches_numpy_tiles(N, K, block, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.05).to(dtype)
    q, s = ops.fp8_quantize_weight(w, block=block)
    want_q, want_s = _np_quantize_weight(w.float().numpy(), block)
    assert s.shape == (-(-N // block), -(-K // block))
    assert _same(s, want_s) and _same(q.float(), want_q)


def test_quantize_weight_nan_inf_and_empty():
    # like fp8_quantize, per tile: a NaN makes its tile NaN; an Inf makes its element NaN, the tile's rest 0
    w = torch.ones(4, 4)
    w[0, 0], w[3, 3] = NAN, INF
    q, s = ops.fp8_quantize_weight(w, block=2)
    qf = q.float()
    assert torch.isnan(qf[:2, :2]).all() and math.isnan(s[0, 0].item())
    assert math.isnan(qf[3, 3].item()) and qf[2:, 2:].flatten()[:3].tolist() == [0.0, 0.0, 0.0] and s[1, 1] == INF
    assert torch.equal(qf[:2, 2:], torch.full((2, 2), 448.0)) and torch.equal(qf[2:, :2], torch.full((2, 2), 448.0))
    for shape, s_shape in (((0, 5), (0, 1)), ((5, 0), (1, 0))):
        q, s = ops.fp8_quantize_weight(torch.zeros(shape))
        assert q.shape == shape and s.shape == s_shape


# ---- fp8_gemm ---------------------------------------------------------------------------------

def _f8(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).to(F8)


def test_gemm_by_hand_single_block():
    # a = [[1, 2]], a_scale 0.5; b = [[3, 4], [1, -1]], b_scale 2
    # y = 0.5 * 2 * [1*3 + 2*4, 1*1 + 2*(-1)] = [11, -1]; + bias [1, 0.5] = [12, -0.5]
    y = ops.fp8_gemm(_f8([[1, 2]]), torch.tensor([[0.5]]), _f8([[3, 4], [1, -1]]), torch.tensor([[2.0]]),
                     out_dtype=torch.float32, bias=torch.tensor([1.0, 0.5]))
    assert y.dtype == torch.float32 and y.tolist() == [[12.0, -0.5]]


def test_gemm_by_hand_block_scales_along_k_and_n():
    # K = 130: k-blocks [0, 128) and [128, 130). a = ones, a_scale = [[1, 2]].
    # N = 130: row n uses b_scale[n // 128]; b = ones, b_scale = [[3, 5], [7, 11]].
    # y[0, n <  128] = 1*3*128 + 2*5*2  = 384 + 20  = 404
    # y[0, n >= 128] = 1*7*128 + 2*11*2 = 896 + 44  = 940
    a = torch.ones(1, 130).to(F8)
    b = torch.ones(130, 130).to(F8)
    y = ops.fp8_gemm(a, torch.tensor([[1.0, 2.0]]), b, torch.tensor([[3.0, 5.0], [7.0, 11.0]]), out_dtype=torch.float32)
    assert y.shape == (1, 130)
    assert y[0, :128].eq(404.0).all() and y[0, 128:].eq(940.0).all()


@settings(max_examples=12, deadline=None)
@given(M=st.integers(0, 4), N=st.integers(1, 140), K=st.integers(1, 300), bias=st.booleans(),
       out_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), seed=st.integers(0, 2**16))
def test_gemm_matches_float64_block_loops(M, N, K, bias, out_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a, a_s = ops.fp8_quantize(torch.randn(M, K, generator=g) * 4)
    b, b_s = ops.fp8_quantize_weight(torch.randn(N, K, generator=g) * 0.1)
    bias_t = torch.randn(N, generator=g).bfloat16() if bias else None
    want = torch.from_numpy(_np_gemm(a, a_s, b, b_s, bias_t))
    with float64_evaluation():
        y64 = KERNELS["fp8_gemm"](a, a_s, b, b_s, out_dtype=out_dtype, bias=bias_t)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, want, rtol=1e-12, atol=1e-12)
    y = ops.fp8_gemm(a, a_s, b, b_s, out_dtype=out_dtype, bias=bias_t)
    y32 = ops.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32, bias=bias_t)
    assert y.dtype == out_dtype and y.shape == (M, N)
    # "in fp32, plus bias, cast to out_dtype": the out_dtype result is the fp32 result rounded once
    assert torch.equal(y, y32.to(out_dtype))
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(y32.double(), want, rtol=1e-5, atol=1e-5 * scale)


def test_gemm_equals_product_of_dequantized_operands():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(16, 300, generator=g), torch.randn(200, 300, generator=g) * 0.02
    a, a_s = ops.fp8_quantize(x)
    b, b_s = ops.fp8_quantize_weight(w)
    deq_a = a.double() * a_s.double().repeat_interleave(128, 1)[:, :300]
    deq_b = b.double() * b_s.double().repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    want = deq_a @ deq_b.T
    y = ops.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32)
    calc_diff = 1 - 2 * (y.double() * want).sum() / (y.double() ** 2 + want ** 2).sum()
    assert calc_diff < 1e-10                     # fp32 accumulation of an exact product: far below 1e-5
    unq = x.double() @ w.double().T
    calc_diff_unq = 1 - 2 * (y.double() * unq).sum() / (y.double() ** 2 + unq ** 2).sum()
    assert calc_diff_unq < 1e-3                  # DeepGEMM's bar against the unquantized product


# ---- fp8_linear -------------------------------------------------------------------------------

def test_linear_by_hand():
    # x = [[448, 224]] -> one group, s = 1, a = [448, 224]; w = [[1, 0.5], [0, -1]] (tile scale 1/448:
    # amax 1 -> q = [[448, 224], [0, -448]]); y = [448*1 + 224*0.5, -224] = [560, -224]
    x = torch.tensor([[448.0, 224.0]])
    w_q, w_s = ops.fp8_quantize_weight(torch.tensor([[1.0, 0.5], [0.0, -1.0]]))
    assert w_s.item() == pytest.approx(1 / 448)
    y = ops.fp8_linear(x, w_q, w_s, bias=torch.tensor([1.0, 2.0]))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.tensor([[561.0, -222.0]]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_is_quantize_then_gemm_in_x_dtype(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 260, generator=g).to(dtype)
    w_q, w_s = ops.fp8_quantize_weight(torch.randn(130, 260, generator=g) * 0.05)
    bias = torch.randn(130, generator=g)
    y = ops.fp8_linear(x, w_q, w_s, bias=bias)
    a, a_s = ops.fp8_quantize(x.reshape(6, 260))
    want = ops.fp8_gemm(a, a_s, w_q, w_s, out_dtype=dtype, bias=bias).reshape(2, 3, 130)
    assert y.dtype == dtype and y.shape == (2, 3, 130) and torch.equal(y, want)
    # and against the dequantized product in float64
    deq_b = w_q.double() * w_s.double().repeat_interleave(128, 0)[:130].repeat_interleave(128, 1)[:, :260]
    ref = (x.double().reshape(6, 260) @ deq_b.T + bias.double()).reshape(2, 3, 130)
    calc_diff = 1 - 2 * (y.double() * ref).sum() / (y.double() ** 2 + ref ** 2).sum()
    assert calc_diff < 1e-3


@settings(max_examples=10, deadline=None)
@given(lead=st.sampled_from([(), (3,), (2, 2)]), N=st.integers(1, 140), K=st.integers(1, 260), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_linear_matches_numpy_quantize_and_block_loops(lead, N, K, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    w_q, w_s = ops.fp8_quantize_weight(torch.randn(N, K, generator=g) * 0.05)
    bias_t = torch.randn(N, generator=g) if bias else None
    q, s = _np_quantize(x.float().reshape(-1, K).numpy(), 128, False)
    want = _np_gemm(torch.from_numpy(q), torch.from_numpy(s), w_q, w_s, bias_t).reshape(*lead, N)
    with float64_evaluation():
        y64 = KERNELS["fp8_linear"](x, w_q, w_s, bias=bias_t)
    assert y64.dtype == torch.float64 and y64.shape == (*lead, N)
    np.testing.assert_allclose(y64.numpy(), want, rtol=1e-12, atol=1e-12)
    y = ops.fp8_linear(x, w_q, w_s, bias=bias_t)
    assert y.dtype == dtype and y.shape == (*lead, N)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    np.testing.assert_allclose(y.double().numpy(), want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


def test_fp8_empty_inputs():
    b, b_s = ops.fp8_quantize_weight(torch.randn(8, 300))
    a, a_s = ops.fp8_quantize(torch.zeros(0, 300))
    y = ops.fp8_gemm(a, a_s, b, b_s)
    assert y.shape == (0, 8) and y.dtype == torch.bfloat16
    assert ops.fp8_linear(torch.zeros(0, 300), b, b_s).shape == (0, 8)
    assert ops.fp8_linear(torch.zeros(2, 0, 300).half(), b, b_s).shape == (2, 0, 8)


def test_fp8_ops_are_deterministic_and_leave_inputs_alone():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(33, 300, generator=g), torch.randn(70, 300, generator=g)
    x0, w0 = x.clone(), w.clone()
    runs = [(ops.fp8_quantize(x, scale_format="ue8m0"), ops.fp8_quantize_weight(w), ops.fp8_linear(x, *ops.fp8_quantize_weight(w)))
            for _ in range(2)]
    (qa, sa), (qw, sw), ya = runs[0]
    (qb, sb), (qw2, sw2), yb = runs[1]
    assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8)) and torch.equal(sa, sb)
    assert torch.equal(qw.view(torch.uint8), qw2.view(torch.uint8)) and torch.equal(sw, sw2)
    assert torch.equal(ya, yb)
    assert torch.equal(x, x0) and torch.equal(w, w0)
