"""Reference ``moe_route``: score, (group-limit), top-k, gather, renormalize, scale."""
import torch

from ._precision import acc, exact
from ._topk import top_k_indices


def moe_route(router_logits, *, top_k, scoring="sigmoid", correction_bias=None, n_group=1, topk_group=1,
              renormalize=True, scaling_factor=1.0):
    x = router_logits.to(acc())
    s = torch.sigmoid(x) if scoring == "sigmoid" else torch.softmax(x, dim=-1)
    c = s if correction_bias is None else s + correction_bias.to(acc())
    T, E = c.shape
    kept = torch.ones(T, E, dtype=torch.bool)
    if n_group > 1:
        per_group = E // n_group
        # DeepSeek's Gate: without a bias a group scores its best expert, with one the sum of its
        # best two (one when the group holds one expert); a NaN counts as -inf there
        groups = c.masked_fill(torch.isnan(c), float("-inf")).view(T, n_group, per_group)
        best = 1 if correction_bias is None else min(2, per_group)
        group_score = groups.topk(best, dim=-1).values.sum(-1)
        keep = top_k_indices(group_score, topk_group)
        kept = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, keep, True).repeat_interleave(per_group, dim=1)
    ids = top_k_indices(c, top_k, eligible=kept)        # experts of dropped groups are never selected
    w = s.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * scaling_factor
    return (w if exact() else w.float()), ids.to(torch.int32)
