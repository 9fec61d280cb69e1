"""Selection scores for index outputs, computed in float64 from the op's inputs.

Written independently of the reference kernels (the check must not trust what it checks):
``moe_route``'s selection score ``c = act(logits) + bias`` with dropped groups unselectable (a
group scores its best ``c`` without a bias, its best two summed with one), and
``lightning_indexer``'s ``sum_h w * relu(q . k)`` with invisible keys unselectable.

Scores are returned as *rank values* (:func:`rank_values`): the contract ranks a NaN below every
number, -inf included, so NaN becomes -inf, -inf becomes the lowest finite float64 and +inf the
highest (real scores are sigmoids, softmaxes and sums of relu'd dot products: far from 1.8e308).
"""
from __future__ import annotations

import torch

F64_MAX = torch.finfo(torch.float64).max


def rank_values(x: torch.Tensor) -> torch.Tensor:
    """float64 values that order as the contract ranks ``x``: numbers by value, then -inf, then NaN."""
    return torch.nan_to_num(x.double(), nan=float("-inf"), posinf=F64_MAX, neginf=-F64_MAX)


def route_scores(router_logits, *, top_k, scoring="sigmoid", correction_bias=None, n_group=1, topk_group=1, **_):
    x = router_logits.double()
    s = torch.sigmoid(x) if scoring == "sigmoid" else torch.softmax(x, dim=-1)
    c = s if correction_bias is None else s + correction_bias.double()
    c = rank_values(c)
    T, E = c.shape
    selectable = torch.ones(T, E, dtype=torch.bool)
    if n_group > 1:
        per = E // n_group
        grouped = c.view(T, n_group, per)
        # a group's score: its best expert without a bias, the sum of its best two with one
        best = 1 if correction_bias is None else min(2, per)
        gscore = grouped.sort(dim=-1, descending=True).values[..., :best].sum(-1)
        order = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, order, True)
        selectable = keep.repeat_interleave(per, dim=1)
    return c, selectable


def indexer_scores(q, k, weights, *, top_k, causal=True, q_offset=None, k_lengths=None, q_scale=None, k_scale=None, **_):
    B, S, Hi, D = q.shape
    L = k.shape[1]
    qd, kd = q.double(), k.double()
    if q_scale is not None:
        qd = qd * q_scale.double()[..., None]
        kd = kd * k_scale.double()[..., None]
    score = torch.zeros(B, S, L, dtype=torch.float64)
    for h in range(Hi):
        score += weights[:, :, h].double()[..., None] * torch.relu(torch.einsum("btd,bsd->bts", qd[:, :, h], kd))
    lengths = torch.full((B,), L) if k_lengths is None else k_lengths.long()
    offset = lengths - S if q_offset is None else q_offset.long()
    s_idx = torch.arange(L).view(1, 1, L)
    visible = (s_idx < lengths.view(B, 1, 1)).expand(B, S, L)
    if causal:
        visible = visible & (s_idx <= offset.view(B, 1, 1) + torch.arange(S).view(1, S, 1))
    return rank_values(score), visible
