"""``sparse_attention``: a Triton sparse flash-attention kernel over the index list.

One program per (batch, query, key head): the G = Hq / Hk query heads that share the key head are
processed together (a [G, D] x [D, BLOCK_K] dot per block of selected keys: MHA G=1, GQA, MQA and
the MLA absorbed form Hk=1, Dqk=576, Dv=512), keys and values are gathered by index, -1 slots are
masked, and an online softmax (running max and sum in fp32) accumulates the output; the
logsumexp is written alongside. A query with no valid slot gives 0 and lse = -inf. Head dims are
padded to a power of two inside the kernel (576 -> 1024 lanes, masked).
"""
import torch
import triton
import triton.language as tl

from hal_cuda._triton import INTERPRET, finish, next_pow2


@triton.jit
def _sparse_attn_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr, S, L, Hq, Hk, G, Dqk, Dv, TOPK, scale,
                        BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    hk = tl.program_id(2)
    rg = tl.arange(0, BLOCK_G)
    heads = hk * G + rg
    gmask = rg < G
    rdq = tl.arange(0, BLOCK_DQ)
    rdv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + ((b * S + t) * Hq + heads[:, None]) * Dqk + rdq[None, :],
                mask=gmask[:, None] & (rdq[None, :] < Dqk), other=0.0).to(tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    for j0 in range(0, TOPK, BLOCK_K):
        rj = j0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + (b * S + t) * TOPK + rj, mask=rj < TOPK, other=-1)
        valid = idx >= 0
        safe = tl.where(valid, idx, 0).to(tl.int64)
        kk = tl.load(k_ptr + ((b * L + safe[:, None]) * Hk + hk) * Dqk + rdq[None, :],
                     mask=valid[:, None] & (rdq[None, :] < Dqk), other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(kk), input_precision="ieee") * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        vv = tl.load(v_ptr + ((b * L + safe[:, None]) * Hk + hk) * Dv + rdv[None, :],
                     mask=valid[:, None] & (rdv[None, :] < Dv), other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision="ieee")
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(out_ptr + ((b * S + t) * Hq + heads[:, None]) * Dv + rdv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None] & (rdv[None, :] < Dv))
    tl.store(lse_ptr + (b * S + t) * Hq + heads, lse, mask=gmask)


def sparse_attention(q, k, v, indices, *, scale, return_lse):
    B, S, Hq, Dqk = q.shape
    L, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hk
    out = torch.zeros((B, S, Hq, Dv), dtype=torch.float32 if INTERPRET else q.dtype, device=q.device)
    lse = torch.full((B, S, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    topk = indices.shape[-1]
    if B and S and topk:
        block_k = 16 if INTERPRET else 64
        _sparse_attn_kernel[(B, S, Hk)](q.contiguous(), k.contiguous(), v.contiguous(), indices.contiguous(), out, lse,
                                        S, L, Hq, Hk, G, Dqk, Dv, topk, float(scale), BLOCK_G=max(16, next_pow2(G)),
                                        BLOCK_K=block_k, BLOCK_DQ=max(16, next_pow2(Dqk)),
                                        BLOCK_DV=max(16, next_pow2(Dv)))
    out = finish(out, q.dtype)
    return (out, lse) if return_lse else out
