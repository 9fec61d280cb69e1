"""``sparse_attention``: a Triton sparse flash-attention kernel over the index list.

One program per (batch, query, key head, block of up to 16 query heads that share the key head):
MHA, GQA, MQA and the MLA absorbed form (Hk=1, Dqk=576, Dv=512) are the same kernel. For each
block of selected keys, the keys are gathered by index and q.k is accumulated over 64-wide chunks
of the head dim (so a 576-wide MLA query never sits whole in registers), -1 slots are masked, and
an online softmax (running max and sum in fp32) accumulates the values; the logsumexp is written
alongside. A query with no valid slot gives 0 and lse = -inf.
"""
import torch
import triton
import triton.language as tl

from hal_cuda._triton import INTERPRET, finish, next_pow2


@triton.jit
def _sparse_attn_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr, S, L, Hq, Hk, G, NGB, Dqk, Dv, TOPK, scale,
                        BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    hk = tl.program_id(2) // NGB
    gb = tl.program_id(2) % NGB
    rg = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = rg < G
    heads = hk * G + rg
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    q_row = q_ptr + ((b * S + t) * Hq + heads[:, None]) * Dqk
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    for j0 in range(0, TOPK, BLOCK_K):
        rj = j0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + (b * S + t) * TOPK + rj, mask=rj < TOPK, other=-1)
        valid = idx >= 0
        safe = tl.where(valid, idx, 0).to(tl.int64)
        k_row = k_ptr + ((b * L + safe[:, None]) * Hk + hk) * Dqk
        s = tl.zeros((BLOCK_G, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, Dqk, BLOCK_D):
            d = d0 + rd
            qc = tl.load(q_row + d[None, :], mask=gmask[:, None] & (d[None, :] < Dqk), other=0.0).to(tl.float32)
            kc = tl.load(k_row + d[None, :], mask=valid[:, None] & (d[None, :] < Dqk), other=0.0).to(tl.float32)
            s += tl.dot(qc, tl.trans(kc), input_precision="ieee")
        s = tl.where(valid[None, :], s * scale, float("-inf"))
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
        block_g = 16
        ngb = triton.cdiv(G, block_g)
        _sparse_attn_kernel[(B, S, Hk * ngb)](q.contiguous(), k.contiguous(), v.contiguous(), indices.contiguous(),
                                              out, lse, S, L, Hq, Hk, G, ngb, Dqk, Dv, topk, float(scale),
                                              BLOCK_G=block_g, BLOCK_K=16 if INTERPRET else 32,
                                              BLOCK_D=32 if INTERPRET else 64, BLOCK_DV=max(16, next_pow2(Dv)))
    out = finish(out, q.dtype)
    return (out, lse) if return_lse else out
