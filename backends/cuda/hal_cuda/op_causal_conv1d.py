"""``causal_conv1d``: a Triton depthwise causal convolution over time, prefill and decode alike.

``_conv_kernel``: one program per (sequence, block of BLOCK_T tokens, block of BLOCK_D channels).
Input position ``p = t + j - (K-1)`` of tap j reads x[b, p] when p >= 0 and the cached window
(``conv_state`` row ``state_indices[b]`` or b, position ``t + j``) otherwise, so the window and
the new tokens are never concatenated in memory. Taps accumulate in fp32 in the reference's
order (j = 0 .. K-1), then bias and SiLU; tokens at or past ``seq_lens[b]`` store 0.
``_conv_state_kernel``: new_state row r is input position ``seq_lens[b] + r`` of
``cat(window, x)``: a load and a store in x's dtype, so the copies are bit-exact.
Both kernels are memory-bound (K multiply-adds per element read): no tensor cores.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from hal_cuda._triton import finish, interpreting, jit, next_pow2, out_buffer


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """Tiles of the conv kernels: BLOCK_T tokens x BLOCK_D channels per program."""
    BLOCK_T: int
    BLOCK_D: int
    num_warps: int


def conv_config(T: int, D: int, *, interpret: bool) -> ConvConfig:
    """One token per program for a decode step (T = 1), 16 otherwise; 256 channels (contiguous
    bf16 rows of 512 bytes) per program on the GPU."""
    if interpret:
        return ConvConfig(min(16, next_pow2(max(T, 1))), min(64, max(16, next_pow2(D))), 4)
    return ConvConfig(1 if T <= 1 else 16, 256, 4)


def conv_grid(B: int, T: int, D: int, cfg: ConvConfig) -> tuple:
    """(B * ceil(T / BLOCK_T), ceil(D / BLOCK_D)): tokens on x, channel blocks on y."""
    from hal_cuda.launch import cdiv, check_grid
    return check_grid("_conv_kernel", (B * cdiv(T, cfg.BLOCK_T), cdiv(D, cfg.BLOCK_D)))


@jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, st_ptr, idx_ptr, len_ptr, out_ptr, T, D, K, NTB,
                 HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENS: tl.constexpr,
                 SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = (tl.program_id(0) // NTB).to(tl.int64)
    t = (tl.program_id(0) % NTB) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    n = tl.load(len_ptr + b).to(tl.int32) if HAS_LENS else T
    live = t < n
    row = tl.load(idx_ptr + b).to(tl.int64) if HAS_INDEX else b
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(0, K):
        p = t + j - (K - 1)                                             # < 0: a row of the cached window
        xm = (live & (p >= 0))[:, None] & md[None, :]
        xv = tl.load(x_ptr + (b * T + p)[:, None] * D + d[None, :], mask=xm, other=0.0).to(tl.float32)
        if HAS_STATE:
            sm = (live & (p < 0))[:, None] & md[None, :]
            sv = tl.load(st_ptr + (row * (K - 1) + t + j)[:, None] * D + d[None, :], mask=sm, other=0.0)
            xv = tl.where(sm, sv.to(tl.float32), xv)
        wj = tl.load(w_ptr + d.to(tl.int64) * K + j, mask=md, other=0.0).to(tl.float32)
        acc = acc + wj[None, :] * xv
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    acc = tl.where(live[:, None], acc, 0.0)
    tl.store(out_ptr + (b * T + t)[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & md[None, :])


@jit
def _conv_state_kernel(x_ptr, st_ptr, idx_ptr, len_ptr, new_ptr, T, D, W,
                       HAS_STATE: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENS: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < D
    n = tl.load(len_ptr + b).to(tl.int32) if HAS_LENS else T
    row = tl.load(idx_ptr + b).to(tl.int64) if HAS_INDEX else b
    for r in range(0, W):                                               # W = K - 1 window rows
        p = n + r + tl.zeros_like(d)                                    # position in cat(window, x)
        from_x = p >= W
        val = tl.load(x_ptr + (b * T + p - W) * D + d, mask=md & from_x, other=0.0)
        if HAS_STATE:
            sv = tl.load(st_ptr + (row * W + p) * D + d, mask=md & (p < W), other=0.0)
            val = tl.where(from_x, val, sv)
        tl.store(new_ptr + (b * W + r) * D + d, val, mask=md)


def causal_conv1d(x, weight, *, bias=None, conv_state=None, state_indices=None, seq_lens=None, activation="none"):
    """Shapes, dtypes and semantics: :func:`hal.contract.linear_attention.causal_conv1d`."""
    B, T, D = x.shape
    K = weight.shape[1]
    interp = interpreting(x)
    out = out_buffer((B, T, D), x.dtype, x.device, interpret=interp)
    new_state = torch.zeros((B, K - 1, D), dtype=x.dtype, device=x.device)
    if B == 0:
        return finish(out, x.dtype), new_state
    x = x.contiguous()
    dummy = new_state if new_state.numel() else x                       # never read when its flag is off
    st = conv_state.contiguous() if conv_state is not None else dummy
    idx = state_indices.contiguous() if state_indices is not None else dummy
    lens = seq_lens.contiguous() if seq_lens is not None else dummy
    flags = dict(HAS_STATE=conv_state is not None, HAS_INDEX=state_indices is not None, HAS_LENS=seq_lens is not None)
    cfg = conv_config(T, D, interpret=interp)
    opts = {} if interp else {"num_warps": cfg.num_warps}
    if T:
        ntb = triton.cdiv(T, cfg.BLOCK_T)
        _conv_kernel[conv_grid(B, T, D, cfg)](x, weight.contiguous(), bias.contiguous() if bias is not None else dummy,
                                              st, idx, lens, out, T, D, K, ntb, HAS_BIAS=bias is not None,
                                              SILU=activation == "silu", BLOCK_T=cfg.BLOCK_T, BLOCK_D=cfg.BLOCK_D,
                                              **flags, **opts)
    if K > 1:
        from hal_cuda.launch import cdiv, check_grid
        grid = check_grid("_conv_state_kernel", (B, cdiv(D, cfg.BLOCK_D)))
        _conv_state_kernel[grid](x, st, idx, lens, new_state, T, D, K - 1, BLOCK_D=cfg.BLOCK_D, **flags, **opts)
    return finish(out, x.dtype), new_state
