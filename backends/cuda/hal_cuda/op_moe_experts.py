"""``moe_experts``: grouped GEMMs over the plan's expert segments.

One Triton kernel, ``_grouped_gemm_kernel``, serves both GEMMs of the SwiGLU FFN: grid
(row tiles, column tiles, experts); a program reads its expert's segment start and row count from
``offsets`` / ``tokens_per_expert`` on the device (no host sync) and returns early past the
segment's real rows (padding rows stay zero). bf16 weights: a plain dot; FP8 weights: activations
are quantized per token per 128 channels first (the fused quantize kernel) and each 128-wide K
block's fp8 dot is promoted with its activation and 128x128 weight scales. Between the GEMMs ``h``
and ``silu(g) * u`` are rounded to the activation dtype, as the contract's working precision says.
"""
import torch
import triton
import triton.language as tl

from hal_cuda._triton import finish, interpreting, jit
from hal_cuda.launch import grouped_gemm_config, grouped_gemm_grid, grouped_gemm_precision
from hal_cuda.op_fp8_quantize import quantize_rows


@jit
def _grouped_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, offsets_ptr, counts_ptr, N, K, KB, NB,
                         FP8: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2)
    start = tl.load(offsets_ptr + e).to(tl.int64)
    count = tl.load(counts_ptr + e)
    if pid_m * BLOCK_M >= count:
        return
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row = start + rm                                   # int64: T * k * H passes 2^31 in prefill
    rmask = rm < count
    w_base = w_ptr + e.to(tl.int64) * N * K
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + rk
        a = tl.load(x_ptr + row[:, None] * K + k[None, :], mask=rmask[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(w_base + rn64[:, None] * K + k[None, :], mask=(rn[:, None] < N) & (k[None, :] < K), other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        part = tl.dot(a, tl.trans(b), out_dtype=tl.float32, input_precision=PRECISION)
        if FP8:
            sa = tl.load(xs_ptr + row * KB + kb, mask=rmask, other=0.0)
            sb = tl.load(ws_ptr + e.to(tl.int64) * NB * KB + (rn // 128) * KB + kb, mask=rn < N, other=0.0)
            acc += part * sa[:, None] * sb[None, :]
        else:
            acc += part
    tl.store(out_ptr + row[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (rn[None, :] < N))


def grouped_gemm(x, w, plan, w_scale=None, out_dtype=None):
    """out[r] = x[r] @ w[e].T for every real row r of expert e's segment; padding rows 0."""
    R, K = x.shape
    E, N, _ = w.shape
    dtype = out_dtype or x.dtype
    interp = interpreting(x)
    interp_half = interp and dtype in (torch.bfloat16, torch.float16)
    out = torch.zeros((R, N), dtype=torch.float32 if interp_half else dtype, device=x.device)
    if R == 0:
        return finish(out, dtype)
    fp8 = w_scale is not None
    if fp8:
        xq, xs = quantize_rows(x, 128, False)
    else:
        if x.dtype != w.dtype:                   # mixed activation / weight dtypes: compute in fp32
            x, w = x.float(), w.float()
        xq, xs = x.contiguous(), x
    cfg = grouped_gemm_config(fp8=fp8, interpret=interp, fp32=xq.dtype == torch.float32)
    precision = grouped_gemm_precision("fp32" if xq.dtype == torch.float32 else "other", interpret=interp)
    launch = {} if interp else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    _grouped_gemm_kernel[grouped_gemm_grid(R, N, E, cfg)](
        xq, xs, w.contiguous(), w_scale.contiguous() if fp8 else w, out, plan.offsets, plan.tokens_per_expert, N, K,
        triton.cdiv(K, 128), triton.cdiv(N, 128), FP8=fp8,
        PRECISION=precision, UPCAST=interp and not fp8,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, **launch)
    return finish(out, dtype)


def _torch_grouped_mm_ok(x, w, plan) -> bool:
    """torch._grouped_mm (CUTLASS, SM90) takes bf16 segments that are 16-row aligned."""
    return (x.device.type == "cuda" and not interpreting(x) and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
            and w.dtype == torch.bfloat16 and plan.align % 16 == 0
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def moe_experts(plan, w_gate_up, w_down, *, activation, w_gate_up_scale, w_down_scale):
    x = plan.hidden
    dtype = x.dtype
    if _torch_grouped_mm_ok(x, w_gate_up, plan):
        ends = plan.offsets[1:].to(torch.int32)
        h = torch._grouped_mm(x, w_gate_up.transpose(1, 2), offs=ends)
    else:
        h = grouped_gemm(x, w_gate_up, plan, w_gate_up_scale, out_dtype=dtype)
    g, u = h.float().chunk(2, dim=-1)
    a = (torch.nn.functional.silu(g) * u).to(dtype)
    if _torch_grouped_mm_ok(a, w_down, plan):
        y = torch._grouped_mm(a, w_down.transpose(1, 2), offs=plan.offsets[1:].to(torch.int32))
    else:
        y = grouped_gemm(a, w_down, plan, w_down_scale, out_dtype=dtype)
    return torch.where((plan.source >= 0)[:, None], y, torch.zeros((), dtype=dtype, device=y.device))
