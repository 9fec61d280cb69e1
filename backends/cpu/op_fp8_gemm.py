"""Reference ``fp8_gemm``: y = sum_kb a_scale * b_scale * dot(a_kb, b_kb) in fp32 (+bias)."""
import torch

from ._precision import acc, rounded

BLOCK = 128


def block_scaled_matmul(a, a_scale, b, b_scale):
    """``a [M, K] e4m3`` with 1x128 scales ``a_scale [M, ceil(K/128)]``, ``b [N, K] e4m3`` with
    128x128 scales ``b_scale [ceil(N/128), ceil(K/128)]`` -> ``[M, N]`` in the accumulation dtype:
    ``y = sum_kb (a_scale[:, kb] * b_scale[n // 128, kb]) * dot(a[:, kb], b[:, kb])``, the sum over
    the K blocks taken in block order, each term rounded once to the accumulation dtype.

    Thread-count invariant, bit for bit: every e4m3 value is a multiple of 2^-9 below 2^9, so a
    product is a multiple of 2^-18 below 2^18 and the dot of one 128-wide block is a sum of
    integers (times 2^-18) below 2^43: float64 holds it exactly in any summation order, whatever
    the BLAS does with its threads. The scale product of two fp32 is exact in float64 too; the
    one rounding per block and the block-order sum are elementwise, hence deterministic."""
    M, K = a.shape
    N = b.shape[0]
    b_scale_rows = b_scale.repeat_interleave(BLOCK, 0)[:N].double()            # [N, KB]
    out = torch.zeros(M, N, dtype=acc(), device=a.device)
    for kb in range(-(-K // BLOCK)):
        cols = slice(kb * BLOCK, (kb + 1) * BLOCK)
        dot = a[:, cols].double() @ b[:, cols].double().T                      # exact
        scale = a_scale[:, kb, None].double() * b_scale_rows[None, :, kb]       # exact
        out = out + (dot * scale).to(acc())
    return out


def fp8_gemm(a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16, bias=None):
    y = block_scaled_matmul(a, a_scale, b, b_scale)
    if bias is not None:
        y = y + bias.to(acc())
    return rounded(y, out_dtype)
