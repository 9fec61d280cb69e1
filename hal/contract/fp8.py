"""Contract family 3: FP8 e4m3 GEMM with DeepSeek-style 1x128 / 128x128 block scales."""
from __future__ import annotations

from typing import Optional

import torch

from hal.contract import _checks as c
from hal.contract import _samples as smp
from hal.contract._spec import FloatBudget, TensorMeta, data_checks, op_spec
from hal.errors import ContractError

FP8_MAX = 448.0
SCALE_FORMATS = ("fp32", "ue8m0")
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@op_spec(family="fp8", summary="per-token, per-128-channel e4m3 quantization: s = amax/448 (fp32 or ue8m0), "
         "q = clamp(x/s) -> (q, scale)",
         outputs={"q": FloatBudget(multiple=1.0, abs_floor=0.0, calc_diff_floor=0.0, kind="fp8"),
                  "scale": FloatBudget(multiple=1.0, abs_floor=0.0, calc_diff_floor=1e-12)},
         returns="tuple",
         meta=lambda a: (TensorMeta(tuple(a.x.shape), torch.float8_e4m3fn),
                         TensorMeta((*a.x.shape[:-1], c.ceil_div(a.x.shape[-1], a.group_size)), torch.float32)),
         sample=lambda g: ((smp.rnd(g, 4, 130),), dict(scale_format="ue8m0")))
def fp8_quantize(x: torch.Tensor, *, group_size: int = 128, scale_format: str = "fp32"):
    """Quantize activations to float8_e4m3fn, one scale per token per group of channels.

    x [..., K] bf16/fp16/fp32. For each group g of ``group_size`` channels along the last dim
    (a last partial group is legal; 1 <= group_size <= 65536): ``s = amax(|x_g|).clamp_min(1e-4) / 448`` in fp32;
    ``scale_format="ue8m0"`` rounds s up to the smallest power of two >= s, read off the fp32
    bits as DeepGEMM's ``ceil_to_ue8m0`` does: biased exponent of s, plus 1 when its mantissa is
    not zero, clamped to [2^-126, 2^127] (not ``exp2(ceil(log2 s))`` in fp32, whose ``log2``
    rounds ``log2(2^n * (1 + 2^-23))`` down to n); a non-finite s stays non-finite (DeepGEMM
    clamps it to 2^127). ``q = clamp(x_g / s, -448, 448).to(float8_e4m3fn)`` (a true division,
    round to nearest even; DeepGEMM multiplies by ``1 / s``: one code apart in about 0.05% of
    values with fp32 scales, never with ue8m0 scales).
    Returns q [..., K] float8_e4m3fn and scale [..., ceil(K / group_size)] fp32.
    NaN in a group makes the whole group NaN (and its scale NaN); an Inf makes its element NaN and
    the group's other elements 0 (scale Inf). Values beyond 448 are fine: the scale covers them
    and the clamp saturates rounding overshoot (torch's own cast saturates in some versions and
    turns 465 into NaN in others: the clamp is what the contract defines).
    """
    op = "fp8_quantize"
    c.tensor(op, "x", x, min_ndim=1, dtypes=c.FLOAT_DTYPES, dims="[..., K]")
    c.integer(op, "group_size", group_size, lo=1, hi=c.MAX_GROUP)
    c.choice(op, "scale_format", scale_format, SCALE_FORMATS)


@op_spec(family="fp8", summary="128x128-block e4m3 weight quantization [N,K] -> (q [N,K], scale [ceil(N/128), ceil(K/128)])",
         outputs={"q": FloatBudget(multiple=1.0, abs_floor=0.0, calc_diff_floor=0.0, kind="fp8"),
                  "scale": FloatBudget(multiple=1.0, abs_floor=0.0, calc_diff_floor=1e-12)},
         returns="tuple",
         meta=lambda a: (TensorMeta(tuple(a.w.shape), torch.float8_e4m3fn),
                         TensorMeta((c.ceil_div(a.w.shape[0], a.block), c.ceil_div(a.w.shape[1], a.block)), torch.float32)),
         sample=lambda g: ((smp.rnd(g, 130, 128),), {}))
def fp8_quantize_weight(w: torch.Tensor, *, block: int = 128):
    """Quantize a weight matrix to float8_e4m3fn with one fp32 scale per ``block x block`` tile.

    w [N, K] bf16/fp16/fp32, 1 <= block <= 65536 -> q [N, K] float8_e4m3fn, scale
    [ceil(N/block), ceil(K/block)] fp32 (the checkpoint's ``weight_scale_inv``: dequant =
    q * scale[n // block, k // block]).
    Per tile: ``s = amax(|w_tile|).clamp_min(1e-4) / 448``, ``q = clamp(w / s, -448, 448)``.
    Partial tiles (N or K not multiples of block, e.g. 576 rows) use the same rule: element (n, k)
    always belongs to tile (n // block, k // block). Non-finite values behave as in
    ``fp8_quantize``, per tile: a NaN makes its tile (and scale) NaN; an Inf makes its element
    NaN and the tile's other elements 0 (scale Inf).
    """
    op = "fp8_quantize_weight"
    c.tensor(op, "w", w, ndim=2, dtypes=c.FLOAT_DTYPES, dims="[N, K]")
    c.integer(op, "block", block, lo=1, hi=c.MAX_GROUP)


def _gemm_operands(op, a, a_scale, b, b_scale, bias):
    c.tensor(op, "a", a, ndim=2, dtypes=(c.FP8,), dims="[M, K] (quantize with fp8_quantize first)")
    M, K = a.shape
    c.tensor(op, "b", b, ndim=2, dtypes=(c.FP8,), dims="[N, K]")
    N = b.shape[0]
    if b.shape[1] != K:
        raise ContractError(op, "b", f"shape [N, K={K}] (K as a)", f"shape {tuple(b.shape)}")
    if K < 1 or N < 1:
        raise ContractError(op, "b", "K >= 1 and N >= 1", f"shape {tuple(b.shape)}")
    kb = c.ceil_div(K, 128)
    c.tensor(op, "a_scale", a_scale, ndim=2, dtypes=(torch.float32,), dims="[M, ceil(K/128)]")
    c.shape(op, "a_scale", a_scale, (M, kb), "[M, ceil(K/128)]")
    c.tensor(op, "b_scale", b_scale, ndim=2, dtypes=(torch.float32,), dims="[ceil(N/128), ceil(K/128)]")
    c.shape(op, "b_scale", b_scale, (c.ceil_div(N, 128), kb), "[ceil(N/128), ceil(K/128)]")
    if bias is not None:
        c.tensor(op, "bias", bias, ndim=1, dtypes=c.FLOAT_DTYPES, dims="[N]")
        c.shape(op, "bias", bias, (N,), "[N]")
    c.same_device(op, "a", a, a_scale=a_scale, b=b, b_scale=b_scale, bias=bias)
    if data_checks(a_scale):
        c.finite_positive_scales(op, "a_scale", a_scale)
        c.finite_positive_scales(op, "b_scale", b_scale)


@op_spec(family="fp8", summary="y = A @ B.T with 1x128 (A) and 128x128 (B) block scales, fp32 accumulate (+bias) -> [M, N]",
         outputs={"out": FloatBudget(abs_floor=1e-5, calc_diff_max=1e-5)},
         meta=lambda a: (TensorMeta((a.a.shape[0], a.b.shape[0]), a.out_dtype),),
         sample=lambda g: ((smp.fp8_codes(g, 4, 256), smp.scales(g, 4, 2), smp.fp8_codes(g, 16, 256), smp.scales(g, 1, 2)),
                           dict(bias=smp.rnd(g, 16))))
def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *,
             out_dtype: torch.dtype = torch.bfloat16, bias: Optional[torch.Tensor] = None):
    """Block-scaled FP8 GEMM ("NT": y = A @ B.T), DeepSeek-V3 / DeepGEMM recipe.

    a [M, K] float8_e4m3fn, a_scale [M, ceil(K/128)] fp32 (per token per 128 channels);
    b [N, K] float8_e4m3fn, b_scale [ceil(N/128), ceil(K/128)] fp32 (per 128x128 block);
    ``y[m,n] = sum_kb a_scale[m,kb] * b_scale[n//128,kb] * dot(a[m,kb], b[n,kb])`` in fp32, plus
    bias [N] (any float dtype, added in fp32), cast to out_dtype (bf16, fp16 or fp32).
    M = 0 is legal; any K, N >= 1. Scales must be finite and positive.
    """
    op = "fp8_gemm"
    _gemm_operands(op, a, a_scale, b, b_scale, bias)
    if out_dtype not in OUT_DTYPES:
        raise ContractError(op, "out_dtype", "torch.bfloat16, torch.float16 or torch.float32", out_dtype)


@op_spec(family="fp8", summary="fp8_gemm(*fp8_quantize(x), w_q, w_scale) for x [..., K] -> [..., N] in x's dtype",
         outputs={"out": FloatBudget(abs_floor=1e-5)},
         meta=lambda a: (TensorMeta((*a.x.shape[:-1], a.w_q.shape[0]), a.x.dtype),),
         sample=lambda g: ((smp.rnd(g, 2, 3, 256, dtype=torch.bfloat16), smp.fp8_codes(g, 16, 256), smp.scales(g, 1, 2)),
                           dict(bias=smp.rnd(g, 16, dtype=torch.bfloat16))))
def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *, bias: Optional[torch.Tensor] = None):
    """A linear layer with 128x128 block-scaled FP8 weights.

    x [..., K] bf16/fp16/fp32, w_q [N, K] float8_e4m3fn, w_scale [ceil(N/128), ceil(K/128)] fp32,
    bias [N] or None. Equals ``fp8_gemm(*fp8_quantize(x.reshape(-1, K)), w_q, w_scale,
    out_dtype=x.dtype, bias=bias).reshape(*x.shape[:-1], N)``; backends may fuse the quantization.
    """
    op = "fp8_linear"
    c.tensor(op, "x", x, min_ndim=1, dtypes=c.FLOAT_DTYPES, dims="[..., K]")
    c.tensor(op, "w_q", w_q, ndim=2, dtypes=(c.FP8,), dims="[N, K]")
    N, K = w_q.shape
    if x.shape[-1] != K:
        raise ContractError(op, "x", f"last dim K={K} (as w_q)", f"shape {tuple(x.shape)}")
    if K < 1 or N < 1:
        raise ContractError(op, "w_q", "K >= 1 and N >= 1", f"shape {tuple(w_q.shape)}")
    c.tensor(op, "w_scale", w_scale, ndim=2, dtypes=(torch.float32,), dims="[ceil(N/128), ceil(K/128)]")
    c.shape(op, "w_scale", w_scale, (c.ceil_div(N, 128), c.ceil_div(K, 128)), "[ceil(N/128), ceil(K/128)]")
    if bias is not None:
        c.tensor(op, "bias", bias, ndim=1, dtypes=c.FLOAT_DTYPES, dims="[N]")
        c.shape(op, "bias", bias, (N,), "[N]")
    c.same_device(op, "x", x, w_q=w_q, w_scale=w_scale, bias=bias)
    if data_checks(w_scale):
        c.finite_positive_scales(op, "w_scale", w_scale)


