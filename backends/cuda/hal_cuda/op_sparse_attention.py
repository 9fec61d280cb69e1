"""``sparse_attention``: a Triton sparse flash-attention kernel over the index list.

One program per (token, key head, block of BLOCK_G query heads sharing that key head): MHA, GQA,
MQA and the MLA absorbed form (Hk=1, Dqk=576, Dv=512) are the same kernel. For each block of
selected keys the key rows are gathered by index, q.k is accumulated over BLOCK_D-wide chunks of
the head dim (a 576-wide MLA query never sits whole in registers), -1 slots are masked, and an
online softmax (running max and sum in fp32) accumulates the values; the logsumexp is written
alongside. A query with no valid slot gives 0 and lse = -inf.

Tiles come from :func:`hal_cuda.launch.attention_config`. With 16 or more query heads per key
head both products are tensor-core ``tl.dot`` s in the inputs' dtype with fp32 accumulation (the
probabilities are rounded to the value dtype for the second one, as flash attention does; fp32
inputs use "tf32x3" dots, about fp32 accuracy; the interpreter exact fp32 dots); with
fewer, BLOCK_G is the head count rounded up to a power of two and the products are fp32
multiply-reduce on the CUDA cores, so no program computes padding heads. k and v are addressed
through their strides: a v that is a view of the MLA latent cache (``kv[..., :512]``) is read in
place, never copied. Token and key rows are formed in int64 (B*S*Hq*D passes 2^31 at MLA prefill).
"""
import torch
import triton
import triton.language as tl

from hal_cuda._triton import finish, interpreting, jit
from hal_cuda.launch import attention_config, attention_grid


@jit
def _sparse_attn_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr, S, Hq, G, NGB, Dqk, Dv, TOPK, scale,
                        sq_b, sq_s, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                        BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)                 # b * S + t
    b = tok // S
    t = tok % S
    hk = tl.program_id(1) // NGB
    gb = tl.program_id(1) % NGB
    rg = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = rg < G
    heads = hk * G + rg
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    q_row = q_ptr + b * sq_b + t * sq_s + heads[:, None].to(tl.int64) * sq_h
    k_base = k_ptr + b * sk_b + hk.to(tl.int64) * sk_h
    v_base = v_ptr + b * sv_b + hk.to(tl.int64) * sv_h
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    for j0 in range(0, TOPK, BLOCK_K):
        rj = j0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + tok * TOPK + rj, mask=rj < TOPK, other=-1)
        valid = idx >= 0
        safe = tl.where(valid, idx, 0).to(tl.int64)
        k_rows = k_base + safe[:, None] * sk_l
        s = tl.zeros((BLOCK_G, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, Dqk, BLOCK_D):
            d = d0 + rd
            qc = tl.load(q_row + d[None, :], mask=gmask[:, None] & (d[None, :] < Dqk), other=0.0)
            kc = tl.load(k_rows + d[None, :], mask=valid[:, None] & (d[None, :] < Dqk), other=0.0)
            if DOT:
                if UPCAST:
                    s += tl.dot(qc.to(tl.float32), tl.trans(kc.to(tl.float32)), input_precision=PRECISION)
                else:
                    s += tl.dot(qc, tl.trans(kc), out_dtype=tl.float32)
            else:
                s += tl.sum(qc.to(tl.float32)[:, None, :] * kc.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        vv = tl.load(v_base + safe[:, None] * sv_l + rdv[None, :], mask=valid[:, None] & (rdv[None, :] < Dv), other=0.0)
        if DOT:
            if UPCAST:
                pv = tl.dot(p, vv.to(tl.float32), input_precision=PRECISION)
            else:
                pv = tl.dot(p.to(vv.dtype), vv, out_dtype=tl.float32)
        else:
            pv = tl.sum(p[:, :, None] * vv.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_row = (tok * Hq + heads[:, None]) * Dv
    tl.store(out_ptr + o_row + rdv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None] & (rdv[None, :] < Dv))
    tl.store(lse_ptr + tok * Hq + heads, lse, mask=gmask)


def _unit_last(x):
    """``x`` itself when its last dim is unit-stride (any view of a cache), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def sparse_attention(q, k, v, indices, *, scale, return_lse):
    B, S, Hq, Dqk = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    G = Hq // Hk
    interp = interpreting(q)
    out = torch.zeros((B, S, Hq, Dv), dtype=torch.float32 if interp else q.dtype, device=q.device)
    lse = torch.full((B, S, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    topk = indices.shape[-1]
    if B and S and topk:
        cfg = attention_config(G, Dqk, Dv, half=q.dtype in (torch.bfloat16, torch.float16), interpret=interp)
        grid = attention_grid(B, S, Hk, G, cfg.BLOCK_G)
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        _sparse_attn_kernel[grid](q, k, v, indices.contiguous(), out, lse, S, Hq, G, triton.cdiv(G, cfg.BLOCK_G), Dqk,
                                  Dv, topk, float(scale), q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                                  k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                  BLOCK_G=cfg.BLOCK_G, BLOCK_K=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D, BLOCK_DV=cfg.BLOCK_DV,
                                  DOT=cfg.DOT, UPCAST=cfg.UPCAST, PRECISION=cfg.PRECISION,
                                  **({} if interp else {"num_warps": cfg.num_warps}))
    out = finish(out, q.dtype)
    return (out, lse) if return_lse else out
