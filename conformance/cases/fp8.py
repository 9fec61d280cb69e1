"""Cases for the FP8 family (fp8_quantize, fp8_quantize_weight, fp8_gemm, fp8_linear)."""
from __future__ import annotations

import torch

from hal.conformance.cases._case import Case, randn

# GEMM (name, M, N, K): quick tiny (incl. N, K not multiples of 128 and M = 0); full = the models' GEMMs
GEMM_QUICK = [("M0", 0, 64, 128), ("M1", 1, 128, 256), ("aligned", 16, 256, 384), ("ragged", 7, 160, 200),
              ("mla_576_rows", 4, 576, 160)]
GEMM_FULL = [("4096x7168x2048", 4096, 7168, 2048), ("4096x2048x7168", 4096, 2048, 7168),
             ("1024x24576x1536", 1024, 24576, 1536), ("128x7168x2048", 128, 7168, 2048),
             ("kv_a_proj_576x7168", 256, 576, 7168)]
WITH_BIAS = ("ragged", "128x7168x2048")          # the GEMMs whose cases add a bias


def _quantize_cases(level):
    out = []
    shapes = [("T0", (0, 256)), ("tokens", (9, 384)), ("partial_group", (5, 200)), ("3d", (2, 3, 256))] \
        if level == "quick" else [("prefill_7168", (4096, 7168)), ("decode_6144", (64, 6144))]
    for name, shape in shapes:
        for fmt in ("fp32", "ue8m0"):
            for dtype in ((torch.bfloat16, torch.float32) if level == "quick" else (torch.bfloat16,)):
                def build(g, shape=shape, fmt=fmt, dtype=dtype):
                    return (randn(g, *shape, dtype=dtype, scale=3.0),), dict(group_size=128, scale_format=fmt)
                out.append(Case("fp8_quantize", f"{name}_{fmt}_{str(dtype)[6:]}", build, (fmt,)))
    if level == "quick":
        def beyond_448(g):
            return (randn(g, 6, 256, scale=2000.0),), dict(group_size=128, scale_format="fp32")

        def non_finite(g):
            x = randn(g, 4, 256)
            x[0, 3], x[1, 130], x[2, 7] = float("nan"), float("inf"), float("-inf")
            return (x,), dict(group_size=128, scale_format="fp32")

        def fp16_small_groups(g):
            return (randn(g, 5, 96, dtype=torch.float16),), dict(group_size=32, scale_format="fp32")
        out += [Case("fp8_quantize", "beyond_448", beyond_448, ("beyond_448",)),
                Case("fp8_quantize", "nan_inf", non_finite, ("nan", "inf")),
                Case("fp8_quantize", "fp16_group32", fp16_small_groups, ("fp16",))]
    return out


def _weight_cases(level):
    shapes = [("aligned", 256, 384), ("mla_576x160", 576, 160), ("tiny", 3, 5)] if level == "quick" \
        else [("7168x2048", 7168, 2048), ("576x7168", 576, 7168)]
    out = []
    for name, N, K in shapes:
        for dtype in (torch.bfloat16, torch.float32) + ((torch.float16,) if name == "tiny" else ()):
            out.append(Case("fp8_quantize_weight", f"{name}_{str(dtype)[6:]}",
                            lambda g, N=N, K=K, dtype=dtype: ((randn(g, N, K, dtype=dtype, scale=0.05),), dict(block=128))))
    if level == "quick":                  # a block other than 128, partial in both dims
        out.append(Case("fp8_quantize_weight", "block64_ragged",
                        lambda g: ((randn(g, 150, 100, scale=0.05),), dict(block=64)), ("block64",)))
    return out


def _gemm_cases(level):
    from hal.backends.cpu import KERNELS
    out = []
    for name, M, N, K in (GEMM_QUICK if level == "quick" else GEMM_FULL):
        for out_dtype in ((torch.bfloat16, torch.float32) if level == "quick" else (torch.bfloat16,)):
            def build(g, M=M, N=N, K=K, out_dtype=out_dtype, with_bias=name in WITH_BIAS):
                a, a_s = KERNELS["fp8_quantize"](randn(g, M, K, scale=2.0), group_size=128, scale_format="fp32")
                b, b_s = KERNELS["fp8_quantize_weight"](randn(g, N, K, scale=0.05), block=128)
                bias = randn(g, N) if with_bias else None
                return (a, a_s, b, b_s), dict(out_dtype=out_dtype, bias=bias)
            out.append(Case("fp8_gemm", f"{name}_{str(out_dtype)[6:]}", build, ("bias",) if name in WITH_BIAS else ()))

        def linear(g, M=M, N=N, K=K, with_bias=name in WITH_BIAS):
            w, w_s = KERNELS["fp8_quantize_weight"](randn(g, N, K, scale=0.05), block=128)
            bias = randn(g, N, dtype=torch.bfloat16) if with_bias else None
            return (randn(g, M, K, dtype=torch.bfloat16, scale=2.0), w, w_s), dict(bias=bias)
        out.append(Case("fp8_linear", name, linear, ("bias",) if name in WITH_BIAS else ()))
    if level == "quick":
        def fp16_out(g):
            a, a_s = KERNELS["fp8_quantize"](randn(g, 5, 256, scale=2.0), group_size=128, scale_format="fp32")
            b, b_s = KERNELS["fp8_quantize_weight"](randn(g, 96, 256, scale=0.05), block=128)
            return (a, a_s, b, b_s), dict(out_dtype=torch.float16, bias=randn(g, 96, dtype=torch.float16))
        out.append(Case("fp8_gemm", "fp16_out_bias", fp16_out, ("fp16", "bias")))

        def linear_dtype(g, dtype, shape):
            w, w_s = KERNELS["fp8_quantize_weight"](randn(g, 72, shape[-1], scale=0.05), block=128)
            return (randn(g, *shape, dtype=dtype, scale=2.0), w, w_s), dict(bias=None)
        out.append(Case("fp8_linear", "fp16_x", lambda g: linear_dtype(g, torch.float16, (6, 192)), ("fp16",)))
        out.append(Case("fp8_linear", "fp32_x_3d", lambda g: linear_dtype(g, torch.float32, (2, 3, 130)), ("fp32",)))

        def ue8m0(g):
            a, a_s = KERNELS["fp8_quantize"](randn(g, 8, 256), group_size=128, scale_format="ue8m0")
            b, b_s = KERNELS["fp8_quantize_weight"](randn(g, 64, 256, scale=0.05), block=128)
            return (a, a_s, b, b_s), dict(out_dtype=torch.bfloat16, bias=None)
        out.append(Case("fp8_gemm", "ue8m0_activation_scales", ue8m0, ("ue8m0",)))
    return out


def cases(level: str) -> list[Case]:
    return _quantize_cases(level) + _weight_cases(level) + _gemm_cases(level)
