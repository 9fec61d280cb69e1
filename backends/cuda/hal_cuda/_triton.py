"""Triton setup and small device helpers shared by the kernels (imported lazily, after the probe).

Triton 3.9's interpreter (what CI runs the kernels on) gets three conversions wrong, found by
the conformance suite and checked in isolation:
- fp32 -> float8e4nv: ties not to even, mantissa overflow not carried (-127.998 -> -64), NaN -> 384;
  so the fp8 rounding is done by hand (:func:`round_to_e4m3`: nearest even on the e4m3 grid in fp32,
  then an exact cast); on a GPU the hardware conversion agrees with it, so both modes give the same codes;
- fp32 -> bfloat16 stores are not rounded to nearest even; so under the interpreter kernels write
  fp32 and torch rounds (:func:`out_buffer` / :func:`finish`); on a GPU kernels store bf16 directly;
- ``tl.dot`` on bfloat16 operands returns garbage; so under the interpreter bf16 operands are
  upcast to fp32 before the dot (``UPCAST`` constexpr); on a GPU they stay bf16 (tensor cores).
"""
from __future__ import annotations

import os

if os.environ.get("HAL_CUDA_INTERPRET", "") not in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
FP8_MAX = 448.0


@triton.jit
def round_to_e4m3(v):
    """fp32 -> the nearest float8_e4m3fn value (ties to even), still in fp32; NaN stays NaN."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)         # subnormals share the 2^-6 exponent
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    y = tl.abs(v / step)
    r = ((y + 12582912.0) - 12582912.0) * step               # 1.5 * 2^23: round half to even
    r = tl.where(v < 0, -r, r)
    return tl.where(v != v, v, r)


@triton.jit
def e4m3_bits(v):
    """The uint8 code of fp32 ``v`` (already clamped to +-448): NaN -> 0x7F, -0 -> 0x80."""
    r = round_to_e4m3(v)
    code = r.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    code = tl.where(v != v, 0x7F, code)
    neg_zero = (r == 0) & (v.to(tl.int32, bitcast=True) < 0)
    return tl.where(neg_zero, 0x80, code).to(tl.uint8)


if hasattr(tl, "div_rn"):
    @triton.jit
    def div_rn(a, b):
        """IEEE division (Triton's ``/`` may be approximate on the GPU)."""
        return tl.div_rn(a, b)
else:  # older Triton releases keep it under tl.math
    @triton.jit
    def div_rn(a, b):
        """IEEE division (Triton's ``/`` may be approximate on the GPU)."""
        return tl.math.div_rn(a, b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def out_buffer(shape, dtype, device):
    """The kernel's output buffer: fp32 under the interpreter for half types (see above)."""
    import torch
    if INTERPRET and dtype in (torch.bfloat16, torch.float16):
        return torch.empty(shape, dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def finish(buf, dtype):
    """The buffer rounded to the op's output dtype (a no-op on the GPU path)."""
    return buf if buf.dtype == dtype else buf.to(dtype)
