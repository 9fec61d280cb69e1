"""Reference ``sparse_attention``: gather the selected keys, fp32 softmax over valid slots."""
import torch

from ._precision import acc, rounded


def sparse_attention(q, k, v, indices, *, scale, return_lse=False):
    B, S, Hq, _ = q.shape
    Hk = k.shape[2]
    valid = indices >= 0                                                   # [B, S, K]
    idx = indices.clamp_min(0).long()
    batch = torch.arange(B)[:, None, None]
    ks = k.to(acc())[batch, idx].repeat_interleave(Hq // Hk, dim=3)        # [B, S, K, Hq, Dqk]
    vs = v.to(acc())[batch, idx].repeat_interleave(Hq // Hk, dim=3)        # [B, S, K, Hq, Dv]
    scores = scale * torch.einsum("bthd,btjhd->bthj", q.to(acc()), ks)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                   # -inf when no valid slot
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bthj,btjhd->bthd", p, vs)
    out = rounded(out, q.dtype)
    if return_lse:
        return out, (lse if lse.dtype == torch.float64 else lse.float())
    return out
