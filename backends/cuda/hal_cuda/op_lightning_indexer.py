"""``lightning_indexer``: a Triton kernel scores one chunk of keys at a time; a running top-k is
merged per chunk, so memory is O(S * (top_k + chunk)) instead of an [S, L] fp32 matrix.

Scores: ``sum_h w[h] * relu(q[h] . k[s])``. On the GPU each head's q.k is a tensor-core
``tl.dot`` in the inputs' dtype (bf16 / fp16, or e4m3 x e4m3 with the q and k scales applied to
the fp32 result: they factor out of the dot) with fp32 accumulation; fp32 inputs use "tf32x3"
dots (about fp32 accuracy on tensor cores), and the interpreter exact fp32 dots (fp8 dequantized
before the dot there). Tiles from :func:`hal_cuda.launch.indexer_config`; rows and chunk-buffer
offsets are int64. Visibility (k_lengths, causal q_offset) masks invisible keys; the merge is a
stable sort of (running best, chunk) by score, which keeps the contract's tie rule (the running best holds
lower indices than the chunk, and each part is already in index order among equal scores).
NaN scores rank below every number, -inf included (a rank class beside the score: visible number,
visible NaN, invisible); -1 fills the tail where fewer than top_k keys are visible.
"""
import torch
import triton
import triton.language as tl

from hal_cuda._triton import interpreting, jit
from hal_cuda.launch import indexer_config, indexer_grid


@jit
def _scores_kernel(q_ptr, k_ptr, w_ptr, qs_ptr, ks_ptr, out_ptr, S, L, Hi, D, c0, C, NSB,
                   FP8: tl.constexpr, FP8_DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr):
    b = (tl.program_id(0) // NSB).to(tl.int64)
    pid_s = tl.program_id(0) % NSB
    pid_c = tl.program_id(1)
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    key = c0 + rc
    rd = tl.arange(0, BLOCK_D)
    smask = rs < S
    kmask = (rc < C) & (key < L)
    q_rows = b * S + rs                                   # int64
    k_rows = b * L + key
    if FP8:
        k_sc = tl.load(ks_ptr + k_rows, mask=kmask, other=0.0)
    if not UPCAST:                                        # 8/16-bit: the key tile stays in registers for every head
        kk = tl.load(k_ptr + k_rows[:, None] * D + rd[None, :], mask=kmask[:, None] & (rd[None, :] < D), other=0.0)
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for h in range(0, Hi):
        if not UPCAST:
            qh = tl.load(q_ptr + (q_rows[:, None] * Hi + h) * D + rd[None, :],
                         mask=smask[:, None] & (rd[None, :] < D), other=0.0)
        if FP8:
            q_sc = tl.load(qs_ptr + q_rows * Hi + h, mask=smask, other=0.0)
        if UPCAST:
            # fp32 operands: q.k over D_CHUNK-wide slices, each key slice re-read (from L1), so nothing spills
            logits = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
            for d0 in tl.static_range(0, BLOCK_D, D_CHUNK):
                rdc = d0 + tl.arange(0, D_CHUNK)
                kf = tl.load(k_ptr + k_rows[:, None] * D + rdc[None, :], mask=kmask[:, None] & (rdc[None, :] < D),
                             other=0.0).to(tl.float32)
                qf = tl.load(q_ptr + (q_rows[:, None] * Hi + h) * D + rdc[None, :],
                             mask=smask[:, None] & (rdc[None, :] < D), other=0.0).to(tl.float32)
                if FP8:
                    kf = kf * k_sc[:, None]
                    qf = qf * q_sc[:, None]
                logits += tl.dot(qf, tl.trans(kf), input_precision=PRECISION)
        else:
            # bf16 / fp16, or e4m3 x e4m3 (FP8_DOT): tensor cores, fp32 accumulation; scales after the dot
            logits = tl.dot(qh, tl.trans(kk), out_dtype=tl.float32)
            if FP8_DOT:
                logits = logits * q_sc[:, None] * k_sc[None, :]
        wh = tl.load(w_ptr + q_rows * Hi + h, mask=smask, other=0.0)
        acc += wh[:, None] * tl.maximum(logits, 0.0, propagate_nan=tl.PropagateNan.ALL)    # relu(NaN) = NaN
    tl.store(out_ptr + q_rows[:, None] * C + rc[None, :], acc, mask=smask[:, None] & (rc[None, :] < C))


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8"}


def lightning_indexer(q, k, weights, *, top_k, causal, q_offset, k_lengths, q_scale, k_scale):
    B, S, Hi, D = q.shape
    L = k.shape[1]
    dev = q.device
    out = torch.full((B, S, top_k), -1, dtype=torch.int32, device=dev)
    if B == 0 or S == 0 or L == 0:
        return out
    fp8 = q.dtype == torch.float8_e4m3fn
    interp = interpreting(q)
    cfg = indexer_config(D, L, dtype=_DTYPE_NAMES[q.dtype], interpret=interp)
    qf, kf = q.contiguous(), k.contiguous()
    w = weights.contiguous()
    qs, ks = (q_scale.contiguous(), k_scale.contiguous()) if fp8 else (w, w)
    lengths = torch.full((B,), L, dtype=torch.int64, device=dev) if k_lengths is None else k_lengths.long()
    offset = lengths - S if q_offset is None else q_offset.long()
    chunk = cfg.CHUNK
    nsb = triton.cdiv(S, cfg.BLOCK_S)
    t_pos = torch.arange(S, device=dev)
    best_s = torch.empty((B, S, 0), dtype=torch.float32, device=dev)
    best_i = torch.empty((B, S, 0), dtype=torch.int64, device=dev)
    best_c = torch.empty((B, S, 0), dtype=torch.int8, device=dev)
    for c0 in range(0, L, chunk):
        C = min(chunk, L - c0)
        sc = torch.empty((B, S, C), dtype=torch.float32, device=dev)
        grid = indexer_grid(B, S, C, cfg.BLOCK_S, cfg.BLOCK_C)
        _scores_kernel[grid](qf, kf, w, qs, ks, sc, S, L, Hi, D, c0, C, nsb, FP8=fp8, FP8_DOT=cfg.FP8_DOT,
                             UPCAST=cfg.UPCAST, PRECISION=cfg.PRECISION, BLOCK_S=cfg.BLOCK_S, BLOCK_C=cfg.BLOCK_C,
                             BLOCK_D=cfg.BLOCK_D, D_CHUNK=cfg.D_CHUNK,
                             **({} if interp else {"num_warps": cfg.num_warps}))
        idx = torch.arange(c0, c0 + C, device=dev)
        vis = (idx.view(1, 1, C) < lengths.view(B, 1, 1)).expand(B, S, C)
        if causal:
            vis = vis & (idx.view(1, 1, C) <= offset.view(B, 1, 1) + t_pos.view(1, S, 1))
        # rank class: 3 a visible number, 2 a visible NaN (below every number, -inf included), 0 invisible
        cls = (vis.to(torch.int8) * 2 + (vis & ~torch.isnan(sc)).to(torch.int8))
        sc = torch.where(torch.isnan(sc) | ~vis, float("-inf"), sc)
        cand_s = torch.cat([best_s, sc], -1)
        cand_i = torch.cat([best_i, idx.view(1, 1, C).expand(B, S, C)], -1)
        cand_c = torch.cat([best_c, cls], -1)
        by_score = torch.sort(cand_s, dim=-1, descending=True, stable=True).indices
        order = by_score.gather(-1, torch.sort(cand_c.gather(-1, by_score), dim=-1, descending=True,
                                               stable=True).indices)
        keep = order[..., :top_k]
        best_s, best_i, best_c = cand_s.gather(-1, keep), cand_i.gather(-1, keep), cand_c.gather(-1, keep)
    n = best_i.shape[-1]
    out[..., :n] = torch.where(best_c >= 2, best_i, -1).to(torch.int32)
    return out
