"""``fp8_gemm``: cuBLAS block-scaled FP8 where the device and torch support it, a Triton
block-scaled FP8 GEMM everywhere else.

Triton kernel: one program per (BLOCK_M x BLOCK_N) output tile; the K loop walks 128-wide blocks
(the scale granularity), each block's fp8 x fp8 dot accumulates in fp32 and is promoted with
``a_scale[m, kb] * b_scale[n // 128, kb]`` (DeepGEMM's per-block promotion); partial M, N, K are
masked; row offsets are int64 (M * K passes 2^31 in long prefills); tiles from
:func:`hal_cuda.launch.fp8_gemm_config`. cuBLAS path (SM90, cuBLASLt >= 12.9, K % 128 == 0,
N % 16 == 0): ``torch._scaled_mm`` with 1x128 activation scales laid out column-major [M, K/128] and ``b_scale.t()`` as 128x128 weight
scales; :func:`plan_cublas` decides and :func:`cublas_scales` builds the layouts (both tested on
the CPU; the numbers only on a GPU through ci/gpu_check.sh).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hal_cuda._triton import finish, interpreting, jit, out_buffer
from hal_cuda.launch import fp8_gemm_config, fp8_gemm_grid


@jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, KB,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * K          # M * K, N * K and M * N may pass 2^31
    b_rows = b_ptr + rn.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * BLOCK_K + rk
        a = tl.load(a_rows + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_rows + k[None, :], mask=(rn[:, None] < N) & (k[None, :] < K), other=0.0)
        part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
        sa = tl.load(as_ptr + rm.to(tl.int64) * KB + kb, mask=rm < M, other=0.0)
        sb = tl.load(bs_ptr + (rn // 128) * KB + kb, mask=rn < N, other=0.0)
        acc += part * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_fp8_gemm(a, a_scale, b, b_scale, out_dtype, bias=None):
    M, K = a.shape
    N = b.shape[0]
    interp = interpreting(a)
    c = out_buffer((M, N), out_dtype, a.device, interpret=interp)
    if M == 0:
        return finish(c, out_dtype)
    cfg = fp8_gemm_config(M, interpret=interp)
    _fp8_gemm_kernel[fp8_gemm_grid(M, N, cfg)](a, a_scale.contiguous(), b, b_scale.contiguous(),
                                              bias.float().contiguous() if bias is not None else a_scale, c, M, N, K,
                                              triton.cdiv(K, 128), HAS_BIAS=bias is not None, BLOCK_M=cfg.BLOCK_M,
                                              BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                                              **({} if interp else {"num_warps": cfg.num_warps,
                                                                    "num_stages": cfg.num_stages}))
    return finish(c, out_dtype)


def plan_cublas(*, device_type: str, capability, torch_version: str, cublaslt_version, M: int, N: int, K: int):
    """(use_cublas, reason): whether torch's block-scaled FP8 GEMM (cuBLASLt) takes this call."""
    if os.environ.get("HAL_CUDA_FP8_GEMM", "") == "triton":
        return False, "HAL_CUDA_FP8_GEMM=triton"
    if device_type != "cuda":
        return False, "not a CUDA device (Triton interpreter)"
    if tuple(capability or (0, 0)) != (9, 0):
        return False, f"block-scaled cuBLAS FP8 needs SM90, device is SM{capability[0]}{capability[1]}"
    major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 9):
        return False, f"torch {torch_version} has no 1x128/128x128 scaled_mm"
    if cublaslt_version is not None and cublaslt_version < 12090:
        return False, f"CUDA {cublaslt_version // 1000}.{cublaslt_version % 1000 // 10} < 12.9 (cuBLASLt block scaling)"
    if K % 128 or N % 16 or K % 16:
        return False, f"K={K} (needs % 128) or N={N} (needs % 16) outside cuBLAS block-scaled shapes"
    if M == 0:
        return False, "M = 0"
    return True, "cuBLAS block-scaled FP8 (torch._scaled_mm)"


def cublas_scales(a_scale: torch.Tensor, b_scale: torch.Tensor):
    """(scale_a, scale_b) as cuBLAS wants them: scale_a [M, K/128] column-major (outer stride 1
    along M), scale_b = b_scale.t() [K/128, N/128] (a transposed view)."""
    scale_a = a_scale.t().contiguous().t()
    return scale_a, b_scale.t()


def _cublaslt_version():
    """The CUDA toolkit torch was built with (1000 * major + 10 * minor), cuBLASLt ships with it."""
    try:
        return torch._C._cuda_getCompiledVersion()
    except Exception:  # noqa: BLE001
        return None


def fp8_gemm(a, a_scale, b, b_scale, *, out_dtype, bias):
    M, K = a.shape
    N = b.shape[0]
    dev = a.device
    device_type = "cpu" if interpreting(a) else dev.type      # an interpreted instance: the Triton kernel, always
    use, _ = plan_cublas(device_type=device_type, capability=torch.cuda.get_device_capability(dev) if dev.type == "cuda"
                         else None, torch_version=torch.__version__, cublaslt_version=_cublaslt_version(), M=M, N=N, K=K)
    if use:
        scale_a, scale_b = cublas_scales(a_scale, b_scale)
        y = torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=out_dtype if bias is None else torch.float32)
        return y if bias is None else (y + bias.float()).to(out_dtype)
    return triton_fp8_gemm(a, a_scale, b, b_scale, out_dtype, bias)
