"""``lightning_indexer``: a Triton kernel scores one chunk of keys at a time; a running top-k is
merged per chunk, so memory is O(S * (top_k + chunk)) instead of an [S, L] fp32 matrix.

Scores: ``sum_h w[h] * relu(q[h] . k[s])`` (fp8 inputs dequantized with their scales in the
kernel). Visibility (k_lengths, causal q_offset) masks invisible keys; the merge is a stable sort
of (running best, chunk) by score, which keeps the contract's tie rule (the running best holds
lower indices than the chunk, and each part is already in index order among equal scores).
NaN scores rank below every number; -1 fills the tail where fewer than top_k keys are visible.
"""
import torch
import triton
import triton.language as tl

from hal_cuda._triton import INTERPRET, next_pow2


@triton.jit
def _scores_kernel(q_ptr, k_ptr, w_ptr, qs_ptr, ks_ptr, out_ptr, S, L, Hi, D, c0, C,
                   FP8: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_c = tl.program_id(2)
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    key = c0 + rc
    rd = tl.arange(0, BLOCK_D)
    kmask = (rc < C) & (key < L)
    kk = tl.load(k_ptr + (b * L + key[:, None]) * D + rd[None, :], mask=kmask[:, None] & (rd[None, :] < D),
                 other=0.0).to(tl.float32)
    if FP8:
        kk = kk * tl.load(ks_ptr + b * L + key, mask=kmask, other=0.0)[:, None]
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for h in range(0, Hi):
        qh = tl.load(q_ptr + ((b * S + rs[:, None]) * Hi + h) * D + rd[None, :],
                     mask=(rs[:, None] < S) & (rd[None, :] < D), other=0.0).to(tl.float32)
        if FP8:
            qh = qh * tl.load(qs_ptr + (b * S + rs) * Hi + h, mask=rs < S, other=0.0)[:, None]
        logits = tl.dot(qh, tl.trans(kk), input_precision="ieee")
        wh = tl.load(w_ptr + (b * S + rs) * Hi + h, mask=rs < S, other=0.0)
        acc += wh[:, None] * tl.maximum(logits, 0.0)
    tl.store(out_ptr + (b * S + rs[:, None]) * C + rc[None, :], acc, mask=(rs[:, None] < S) & (rc[None, :] < C))


def lightning_indexer(q, k, weights, *, top_k, causal, q_offset, k_lengths, q_scale, k_scale):
    B, S, Hi, D = q.shape
    L = k.shape[1]
    dev = q.device
    out = torch.full((B, S, top_k), -1, dtype=torch.int32, device=dev)
    if B == 0 or S == 0 or L == 0:
        return out
    fp8 = q.dtype == torch.float8_e4m3fn
    qf, kf = (q, k) if fp8 else (q.contiguous(), k.contiguous())
    lengths = torch.full((B,), L, dtype=torch.int64, device=dev) if k_lengths is None else k_lengths.long()
    offset = lengths - S if q_offset is None else q_offset.long()
    chunk = min(L, 64 if INTERPRET else 4096)
    bs, bc = (16, 16) if INTERPRET else (64, 64)
    t_pos = torch.arange(S, device=dev)
    best_s = torch.empty((B, S, 0), dtype=torch.float32, device=dev)
    best_i = torch.empty((B, S, 0), dtype=torch.int64, device=dev)
    best_v = torch.empty((B, S, 0), dtype=torch.bool, device=dev)
    for c0 in range(0, L, chunk):
        C = min(chunk, L - c0)
        sc = torch.empty((B, S, C), dtype=torch.float32, device=dev)
        grid = (B, triton.cdiv(S, bs), triton.cdiv(C, bc))
        _scores_kernel[grid](qf, kf, weights.contiguous(), q_scale.contiguous() if fp8 else weights,
                             k_scale.contiguous() if fp8 else weights, sc, S, L, Hi, D, c0, C, FP8=fp8,
                             BLOCK_S=bs, BLOCK_C=bc, BLOCK_D=max(16, next_pow2(D)))
        idx = torch.arange(c0, c0 + C, device=dev)
        vis = (idx.view(1, 1, C) < lengths.view(B, 1, 1)).expand(B, S, C)
        if causal:
            vis = vis & (idx.view(1, 1, C) <= offset.view(B, 1, 1) + t_pos.view(1, S, 1))
        sc = torch.where(torch.isnan(sc) | ~vis, float("-inf"), sc)
        cand_s = torch.cat([best_s, sc], -1)
        cand_i = torch.cat([best_i, idx.view(1, 1, C).expand(B, S, C)], -1)
        cand_v = torch.cat([best_v, vis], -1)
        by_score = torch.sort(cand_s, dim=-1, descending=True, stable=True).indices
        order = by_score.gather(-1, torch.sort(cand_v.gather(-1, by_score).to(torch.int8), dim=-1, descending=True,
                                               stable=True).indices)
        keep = order[..., :top_k]
        best_s, best_i, best_v = cand_s.gather(-1, keep), cand_i.gather(-1, keep), cand_v.gather(-1, keep)
    n = best_i.shape[-1]
    out[..., :n] = torch.where(best_v, best_i, -1).to(torch.int32)
    return out
