"""``fp8_quantize_weight``: one Triton program per 128x128 tile (partial tiles masked)."""
import torch
import triton
import triton.language as tl

from hal_cuda._triton import div_rn, e4m3_bits, jit, next_pow2


@jit
def _weight_kernel(w_ptr, q_ptr, s_ptr, N, K, KB, block, BLOCK: tl.constexpr):
    nb = tl.program_id(0).to(tl.int64)           # rows * K: 64-bit offsets (an expert-stacked weight passes 2^31)
    kb = tl.program_id(1)
    rows = nb * block + tl.arange(0, BLOCK)
    cols = kb * block + tl.arange(0, BLOCK)
    inside = (tl.arange(0, BLOCK) < block)
    mask = (inside[:, None] & (rows[:, None] < N)) & (inside[None, :] & (cols[None, :] < K))
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    has_nan = tl.sum(tl.sum((w != w).to(tl.int32), axis=1), axis=0) > 0
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    s = tl.where(has_nan, float("nan"), div_rn(tl.maximum(amax, 1e-4), 448.0))
    y = div_rn(w, s)
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -448.0), 448.0))
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], e4m3_bits(y), mask=mask)
    tl.store(s_ptr + nb * KB + kb, s)


def fp8_quantize_weight(w, *, block):
    N, K = w.shape
    NB, KB = triton.cdiv(N, block), triton.cdiv(K, block)
    q = torch.empty((N, K), dtype=torch.uint8, device=w.device)
    s = torch.empty((NB, KB), dtype=torch.float32, device=w.device)
    if N and K:
        _weight_kernel[(NB, KB)](w.contiguous(), q, s, N, K, KB, block, BLOCK=next_pow2(block))
    return q.view(torch.float8_e4m3fn), s
