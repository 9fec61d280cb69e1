"""Reference ``sparse_attention``: gather the selected keys, fp32 softmax over valid slots."""
import torch

from ._precision import acc, rounded


def sparse_attention(q, k, v, indices, *, scale, return_lse=False):
    B, S, Hq, Dqk = q.shape
    Hk = k.shape[2]
    G = Hq // Hk                                                           # query heads per key head
    valid = indices >= 0                                                   # [B, S, K]
    idx = indices.clamp_min(0).long()
    batch = torch.arange(B)[:, None, None]
    ks = k.to(acc())[batch, idx]                                           # [B, S, K, Hk, Dqk]
    vs = v.to(acc())[batch, idx]                                           # [B, S, K, Hk, Dv]
    qg = q.to(acc()).view(B, S, Hk, G, Dqk)
    scores = scale * torch.einsum("bthgd,btjhd->bthgj", qg, ks)            # [B, S, Hk, G, K]
    scores = scores.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                   # -inf when no valid slot
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bthgj,btjhd->bthgd", p, vs).reshape(B, S, Hq, v.shape[3])
    out = rounded(out, q.dtype)
    if return_lse:
        lse = lse.reshape(B, S, Hq)
        return out, (lse if lse.dtype == torch.float64 else lse.float())
    return out
