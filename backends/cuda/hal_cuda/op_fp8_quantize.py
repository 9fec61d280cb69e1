"""``fp8_quantize``: one fused Triton kernel (amax, scale, optional ue8m0 rounding, saturating cast).

One program per (token row, 128-channel group); scales in fp32 (amax / 448 with a round-to-nearest
division) or ue8m0 (rounded up from the scale's bits); NaN in a group makes the whole group NaN,
Inf makes its element NaN and the rest 0, exactly as the contract says.
"""
import torch
import triton
import triton.language as tl

from hal_cuda._triton import div_rn, e4m3_bits, jit, next_pow2


@jit
def ceil_to_ue8m0(s):
    """fp32 s > 0 -> the smallest power of two >= s, from the bits (biased exponent + 1 when the
    mantissa is not zero, clamped to 2^-126 .. 2^127; exp2(ceil(log2 s)) rounds down just above a
    power of two); inf and NaN stay as they are."""
    bits = s.to(tl.int32, bitcast=True)
    biased = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    p2 = (tl.minimum(tl.maximum(biased, 1), 254) << 23).to(tl.float32, bitcast=True)
    return tl.where(((bits >> 23) & 0xFF) == 0xFF, s, p2)


@jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, K, G, group_size, UE8M0: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)          # row * K passes 2^31 at T*k*H > 2^31 (FP8 moe_forward prefill)
    g = tl.program_id(1)
    offs = g * group_size + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < group_size) & (offs < K)
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    has_nan = tl.sum((x != x).to(tl.int32), axis=0) > 0
    amax = tl.max(tl.abs(x), axis=0)
    s = div_rn(tl.maximum(amax, 1e-4), 448.0)
    if UE8M0:
        s = ceil_to_ue8m0(s)
    s = tl.where(has_nan, float("nan"), s)
    y = div_rn(x, s)
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -448.0), 448.0))
    tl.store(q_ptr + row * K + offs, e4m3_bits(y), mask=mask)
    tl.store(s_ptr + row * G + g, s)


def quantize_rows(x2d: torch.Tensor, group_size: int, ue8m0: bool):
    """x2d [M, K] -> (q [M, K] e4m3, scale [M, ceil(K/group)] fp32)."""
    M, K = x2d.shape
    G = triton.cdiv(K, group_size)
    q = torch.empty((M, K), dtype=torch.uint8, device=x2d.device)
    s = torch.empty((M, G), dtype=torch.float32, device=x2d.device)
    if M and K:
        _quantize_kernel[(M, G)](x2d.contiguous(), q, s, K, G, group_size, UE8M0=ue8m0, BLOCK=next_pow2(group_size))
    return q.view(torch.float8_e4m3fn), s


def fp8_quantize(x, *, group_size, scale_format):
    K = x.shape[-1]
    q, s = quantize_rows(x.reshape(-1, K), group_size, scale_format == "ue8m0")
    return q.view(*x.shape), s.view(*x.shape[:-1], s.shape[-1])


