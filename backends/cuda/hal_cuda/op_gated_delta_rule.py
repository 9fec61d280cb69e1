"""``gated_delta_rule``: a chunked Triton kernel (prefill) and a recurrent one (decode, per-channel g).

Chunked kernel (``_gdr_chunk_kernel``), the WY / UT-transform form: one program per (sequence,
value head, BLOCK_V columns of the state); the state tile S [Dk, BLOCK_V] stays in fp32 registers
for the whole sequence. For each chunk of C tokens with cumulative log-decays c (``tl.cumsum``)::

    A[t, j] = beta_t (k_t . k_j) e^{c_t - c_j}              j < t   (strictly lower)
    T       = (I + A)^{-1} diag(beta)                       forward substitution, C rows
    w, u    = T (k * e^c),  T v                             [C, Dk], [C, BLOCK_V]
    v'      = u - w S                                       the chunk's delta-rule updates
    out     = (q * e^c) S + ((q k^T) * e^{c_t - c_j}, j <= t) v'
    S       = e^{c_C} S + (k * e^{c_C - c})^T v'

Every exponent is <= 0, so g = 0 and g = -1e4 are both safe. The eight products are ``tl.dot`` s
on fp32 operands at ``PRECISION``: "tf32x3" on the GPU (tensor cores, about fp32 accuracy; the
state is fp32 and the contract's budget for it is 1e-4 absolute, which keys rounded to bf16 after
their l2 norm would exceed), "ieee" under the interpreter. The triangular solve is C steps of
[C, C] CUDA-core work. Padded tokens (t >= seq_lens[b]) load k = q = v = g = beta = 0: they
change neither the system nor the state, and their outputs are not stored (the buffer is zeros).

Recurrent kernel (``_gdr_recurrent_kernel``): the contract's recurrence token by token on the same
register-resident state tile; it takes per-channel g (KDA: the chunked form would need
e^{-c} per channel, which overflows, or FLA's sub-chunk rescaling; not done here).

Per call (:func:`gdr_mode`): per-channel g or T <= :data:`RECURRENT_MAX_T` tokens per sequence ->
recurrent; otherwise chunked with C = :func:`gdr_config`'s chunk (64 on the GPU, 16 under the
interpreter so tiny cases cross several chunks). Offsets are formed in int64.
"""
from __future__ import annotations

import dataclasses

import torch
import triton.language as tl

from hal_cuda._triton import finish, interpreting, jit, next_pow2, out_buffer

RECURRENT_MAX_T = 8                 # decode / speculative decode: the recurrence, no chunk padding
RECURRENT_WARPS = 4
MAX_DK = 256                        # the whole key dim of the state tile sits in registers
L2NORM_EPS = 1e-6
NO_FAULT, FAULT_DECAY_AFTER_UPDATE, FAULT_STATE_NOT_CARRIED = 0, 1, 2      # planted faults: tests only


@dataclasses.dataclass(frozen=True)
class GdrConfig:
    """Tiles of the gated-delta-rule kernels: C tokens per chunk, the key dim whole (BLOCK_DK),
    BLOCK_V state columns per program; dots at PRECISION."""
    C: int
    BLOCK_DK: int
    BLOCK_V: int
    PRECISION: str
    num_warps: int


def gdr_config(Dk: int, Dv: int, *, interpret: bool, chunk: "int | None" = None) -> GdrConfig:
    """The launcher's tiles for head dims Dk, Dv. ``chunk`` overrides C (a power of two >= 16)."""
    bdk = max(16, next_pow2(Dk))
    if interpret:
        return GdrConfig(chunk or 16, bdk, max(16, min(32, next_pow2(Dv))), "ieee", 4)
    # the state tile is BLOCK_DK x BLOCK_V fp32 (128 x 32: 16 registers per thread at 8 warps); the
    # chunk's [C, Dk] key / query / w tiles and the tf32x3 operand splits are what fill the register file
    bv = max(16, min(next_pow2(Dv), 4096 // bdk))
    return GdrConfig(chunk or 64, bdk, bv, "tf32x3", 8)


def gdr_mode(T: int, per_channel: bool) -> str:
    """"recurrent" for per-channel g or T <= RECURRENT_MAX_T, else "chunked"."""
    return "recurrent" if per_channel or T <= RECURRENT_MAX_T else "chunked"


def gdr_grid(B: int, Hv: int, Dv: int, block_v: int) -> tuple:
    """(B * Hv, ceil(Dv / BLOCK_V)): one program per (sequence, value head, column block)."""
    from hal_cuda.launch import cdiv, check_grid
    return check_grid("_gdr_kernel", (B * Hv, cdiv(Dv, block_v)))


def unsupported_reason(Dk: int) -> "str | None":
    """Why the kernels do not take key dim Dk on a GPU (None when they do)."""
    if next_pow2(Dk) > MAX_DK:
        return (f"Dk = {Dk} > {MAX_DK}: the [Dk, BLOCK_V] fp32 state tile and the [C, Dk] key tile of "
                "hal-cuda's gated_delta_rule kernels would not fit in registers")
    return None


@jit
def _l2norm_rows(x, axis: tl.constexpr):
    return x / tl.sqrt(tl.sum(x * x, axis=axis, keep_dims=True) + 1e-6)


@jit
def _program_start(h0_ptr, idx_ptr, Hv, G, Dk, Dv, BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr,
                   HAS_STATE: tl.constexpr, HAS_INDEX: tl.constexpr):
    """What both kernels' programs start from: program (b * Hv + h, value block) gives sequence b
    (int64), value head h, its key head hk, the key / value channel ranges rk / rv, the offsets
    of that state tile within one [Dk, Dv] state, and the tile of sequence b's initial state
    (row ``idx[b]`` of the pool with HAS_INDEX; zeros without a state), fp32."""
    bh = tl.program_id(0)
    b = (bh // Hv).to(tl.int64)
    h = bh % Hv
    rk = tl.arange(0, BLOCK_DK)
    rv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    state_off = (rk[:, None] * Dv + rv[None, :]).to(tl.int64)
    S = tl.zeros((BLOCK_DK, BLOCK_V), dtype=tl.float32)
    if HAS_STATE:
        row = tl.load(idx_ptr + b).to(tl.int64) if HAS_INDEX else b
        S = tl.load(h0_ptr + (row * Hv + h) * Dk * Dv + state_off, mask=(rk < Dk)[:, None] & (rv < Dv)[None, :],
                    other=0.0)
    return b, h, h // G, rk, rv, state_off, S


@jit
def _gdr_chunk_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr, idx_ptr, len_ptr, out_ptr, ht_ptr,
                      T, Hk, Hv, G, Dk, Dv, scale,
                      C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr, HAS_STATE: tl.constexpr,
                      HAS_INDEX: tl.constexpr, HAS_LENS: tl.constexpr, L2NORM: tl.constexpr,
                      PRECISION: tl.constexpr, FAULT: tl.constexpr):
    b, h, hk, rk, rv, state_off, S = _program_start(h0_ptr, idx_ptr, Hv, G, Dk, Dv, BLOCK_DK, BLOCK_V, HAS_STATE,
                                                    HAS_INDEX)
    mk, mv = rk < Dk, rv < Dv
    rc = tl.arange(0, C)
    S_init = S
    n = tl.load(len_ptr + b).to(tl.int32) if HAS_LENS else T
    causal = rc[:, None] >= rc[None, :]
    strict = rc[:, None] > rc[None, :]
    eye = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0)
    for c0 in range(0, n, C):
        if FAULT == 2:
            S = S_init
        mt = c0 + rc < n
        tok = b * T + c0 + rc                                           # int64 token rows
        kq_off = (tok * Hk + hk)[:, None] * Dk + rk[None, :]
        kk = tl.load(k_ptr + kq_off, mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + (tok * Hv + h)[:, None] * Dv + rv[None, :], mask=mt[:, None] & mv[None, :],
                     other=0.0).to(tl.float32)
        gg = tl.load(g_ptr + tok * Hv + h, mask=mt, other=0.0)
        bb = tl.load(beta_ptr + tok * Hv + h, mask=mt, other=0.0).to(tl.float32)
        if L2NORM:
            kk = _l2norm_rows(kk, 1)
        cq = tl.cumsum(gg, 0)                                           # c_t, from the chunk start
        ck = cq - gg if FAULT == 1 else cq                              # decay after the update: c_{t-1}
        last = tl.sum(tl.where(rc == C - 1, cq, 0.0), 0)                # padded tokens have g = 0
        kk_t = tl.trans(kk)
        A = tl.dot(kk, kk_t, input_precision=PRECISION)
        A = tl.where(strict, A * tl.exp(tl.where(strict, ck[:, None] - ck[None, :], 0.0)), 0.0) * bb[:, None]
        X = eye                                                         # X = (I + A)^{-1}, row by row
        for i in tl.range(1, C, loop_unroll_factor=1):
            a_i = tl.sum(tl.where(rc[:, None] == i, A, 0.0), 0)         # row i of A (zero from column i on)
            x_i = tl.sum(a_i[:, None] * X, 0)
            X = X - tl.where(rc[:, None] == i, x_i[None, :], 0.0)
        Tm = X * bb[None, :]
        w = tl.dot(Tm, kk * tl.exp(ck)[:, None], input_precision=PRECISION)
        u = tl.dot(Tm, vv, input_precision=PRECISION)
        vn = u - tl.dot(w, S, input_precision=PRECISION)
        qq = tl.load(q_ptr + kq_off, mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32)     # q late: fewer
        if L2NORM:                                                                                 # live tiles
            qq = _l2norm_rows(qq, 1)
        qq = qq * scale
        P = tl.dot(qq, kk_t, input_precision=PRECISION)
        P = tl.where(causal, P * tl.exp(tl.where(causal, cq[:, None] - ck[None, :], 0.0)), 0.0)
        o = tl.dot(qq * tl.exp(cq)[:, None], S, input_precision=PRECISION) + tl.dot(P, vn, input_precision=PRECISION)
        tl.store(out_ptr + (tok * Hv + h)[:, None] * Dv + rv[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])
        kd = tl.trans(kk * tl.exp(last - ck)[:, None])
        S = S * tl.exp(last) + tl.dot(kd, vn, input_precision=PRECISION)
    tl.store(ht_ptr + (b * Hv + h) * Dk * Dv + state_off, S, mask=mk[:, None] & mv[None, :])


@jit
def _gdr_recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr, idx_ptr, len_ptr, out_ptr, ht_ptr,
                          T, Hk, Hv, G, Dk, Dv, scale,
                          BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr, PER_CHANNEL: tl.constexpr,
                          HAS_STATE: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENS: tl.constexpr,
                          L2NORM: tl.constexpr, FAULT: tl.constexpr):
    b, h, hk, rk, rv, state_off, S = _program_start(h0_ptr, idx_ptr, Hv, G, Dk, Dv, BLOCK_DK, BLOCK_V, HAS_STATE,
                                                    HAS_INDEX)
    mk, mv = rk < Dk, rv < Dv
    n = tl.load(len_ptr + b).to(tl.int32) if HAS_LENS else T
    for t in range(0, n):
        tok = b * T + t
        kq_off = (tok * Hk + hk) * Dk + rk
        kk = tl.load(k_ptr + kq_off, mask=mk, other=0.0).to(tl.float32)
        qq = tl.load(q_ptr + kq_off, mask=mk, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + (tok * Hv + h) * Dv + rv, mask=mv, other=0.0).to(tl.float32)
        bt = tl.load(beta_ptr + tok * Hv + h).to(tl.float32)
        if PER_CHANNEL:
            d = tl.exp(tl.load(g_ptr + (tok * Hv + h) * Dk + rk, mask=mk, other=0.0))[:, None]
        else:
            d = tl.exp(tl.load(g_ptr + tok * Hv + h))
        if L2NORM:
            kk = _l2norm_rows(kk, 0)
            qq = _l2norm_rows(qq, 0)
        if FAULT == 1:
            u = bt * (vv - tl.sum(S * kk[:, None], 0))
            S = (S + kk[:, None] * u[None, :]) * d
        else:
            S = S * d                                                   # decay first, then the delta update
            u = bt * (vv - tl.sum(S * kk[:, None], 0))
            S = S + kk[:, None] * u[None, :]
        o = tl.sum(S * (qq * scale)[:, None], 0)
        tl.store(out_ptr + (tok * Hv + h) * Dv + rv, o.to(out_ptr.dtype.element_ty), mask=mv)
    tl.store(ht_ptr + (b * Hv + h) * Dk * Dv + state_off, S, mask=mk[:, None] & mv[None, :])


def launch(q, k, v, g, beta, *, scale, initial_state=None, state_indices=None, seq_lens=None, qk_l2norm=False,
           mode=None, chunk=None, fault=NO_FAULT):
    """The op with the launcher's choices open: ``mode`` "chunked" / "recurrent" (default
    :func:`gdr_mode`), ``chunk`` the chunk size C (a power of two >= 16), ``fault`` a planted
    fault (``FAULT_DECAY_AFTER_UPDATE``: both kernels; ``FAULT_STATE_NOT_CARRIED``: each chunk
    starts from the initial state; tests only). Returns ``(out [B, T, Hv, Dv] in q's dtype,
    final_state [B, Hv, Dk, Dv] fp32)``; shapes, dtypes and semantics:
    :func:`hal.contract.linear_attention.gated_delta_rule`."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    per_channel = g.dim() == 4
    mode = mode or gdr_mode(T, per_channel)
    if mode == "chunked" and per_channel:
        raise ValueError("gated_delta_rule: the chunked kernel takes per-head g only")
    interp = interpreting(q)
    out = out_buffer((B, T, Hv, Dv), q.dtype, q.device, interpret=interp).zero_()
    final = torch.empty((B, Hv, Dk, Dv), dtype=torch.float32, device=q.device)
    if B == 0:
        return finish(out, q.dtype), final
    cfg = gdr_config(Dk, Dv, interpret=interp, chunk=chunk)
    grid = gdr_grid(B, Hv, Dv, cfg.BLOCK_V)
    has_state = initial_state is not None
    dummy = final                                                       # never read when its flag is off
    args = (q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
            initial_state.contiguous() if has_state else dummy,
            state_indices.contiguous() if state_indices is not None else dummy,
            seq_lens.contiguous() if seq_lens is not None else dummy, out, final,
            T, Hk, Hv, Hv // Hk, Dk, Dv, float(scale))
    flags = dict(BLOCK_DK=cfg.BLOCK_DK, BLOCK_V=cfg.BLOCK_V, HAS_STATE=has_state,
                 HAS_INDEX=state_indices is not None, HAS_LENS=seq_lens is not None, L2NORM=bool(qk_l2norm),
                 FAULT=int(fault))
    if not interp:
        flags["num_warps"] = cfg.num_warps if mode == "chunked" else RECURRENT_WARPS
    if mode == "chunked":
        _gdr_chunk_kernel[grid](*args, C=cfg.C, PRECISION=cfg.PRECISION, **flags)
    else:
        _gdr_recurrent_kernel[grid](*args, PER_CHANNEL=per_channel, **flags)
    return finish(out, q.dtype), final


def gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None, state_indices=None, seq_lens=None,
                     qk_l2norm=False):
    """The contract op (:func:`hal.contract.linear_attention.gated_delta_rule`), kernel per :func:`gdr_mode`."""
    return launch(q, k, v, g, beta, scale=scale, initial_state=initial_state, state_indices=state_indices,
                  seq_lens=seq_lens, qk_l2norm=qk_l2norm)
