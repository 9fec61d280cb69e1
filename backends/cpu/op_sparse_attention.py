"""Reference ``sparse_attention``: gather the selected keys, fp32 softmax over valid slots."""
import torch

from ._precision import acc, rounded


def _gather_rows(t, idx):
    """t [B, L, Hk, D], idx [B, S, K] in [0, L] -> [B, S, K, Hk, D] in the accumulation dtype;
    index L reads a row of zeros (so an unused slot never reads a real key or value)."""
    padded = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 1))
    return padded[torch.arange(t.shape[0])[:, None, None], idx].to(acc())


def sparse_attention(q, k, v, indices, *, scale, return_lse=False):
    B, S, Hq, Dqk = q.shape
    L, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk                                                           # query heads per key head
    valid = indices >= 0                                                   # [B, S, K]
    idx = torch.where(valid, indices.long(), L)
    ks, vs = _gather_rows(k, idx), _gather_rows(v, idx)                   # [B, S, K, Hk, Dqk | Dv]
    qg = q.to(acc()).contiguous().view(B, S, Hk, G, Dqk)                  # layout never changes the sums
    scores = scale * torch.einsum("bthgd,btjhd->bthgj", qg, ks)            # [B, S, Hk, G, K]
    scores = scores.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                   # -inf when no valid slot
    p = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bthgj,btjhd->bthgd", p, vs).reshape(B, S, Hq, v.shape[3])
    out = rounded(out, q.dtype)
    if return_lse:
        lse = lse.reshape(B, S, Hq)
        return out, (lse if lse.dtype == torch.float64 else lse.float())
    return out
