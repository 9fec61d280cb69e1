"""Reference ``lightning_indexer``: weighted ReLU scores, visibility mask, stable top-k, -1 tail."""
import torch

from ._precision import acc
from ._topk import top_k_indices


def lightning_indexer(q, k, weights, *, top_k, causal=True, q_offset=None, k_lengths=None, q_scale=None,
                      k_scale=None):
    B, S, Hi, D = q.shape
    L, dev = k.shape[1], q.device
    qf, kf = q.to(acc()), k.to(acc())
    if q_scale is not None:
        qf, kf = qf * q_scale.to(acc())[..., None], kf * k_scale.to(acc())[..., None]
    logits = torch.einsum("bthd,bsd->bths", qf.contiguous(), kf.contiguous())    # (layout never changes the sums)
    score = (weights.to(acc())[..., None] * torch.relu(logits)).sum(2)            # [B, S, L]
    lengths = torch.full((B,), L, dtype=torch.int64, device=dev) if k_lengths is None else k_lengths.long()
    offset = lengths - S if q_offset is None else q_offset.long()
    s_pos, t_pos = torch.arange(L, device=dev), torch.arange(S, device=dev)
    visible = (s_pos[None, None, :] < lengths[:, None, None]).expand(B, S, L)
    if causal:
        visible = visible & (s_pos[None, None, :] <= offset[:, None, None] + t_pos[None, :, None])
    n = min(top_k, L)
    picked = top_k_indices(score, n, eligible=visible)                            # visible keys first
    n_visible = visible.sum(-1, keepdim=True)
    out = torch.full((B, S, top_k), -1, dtype=torch.int32, device=dev)
    out[..., :n] = torch.where(torch.arange(n, device=dev) < n_visible, picked, -1).to(torch.int32)
    return out
