"""Reference ``moe_route``: score, (group-limit), top-k, gather, renormalize, scale."""
import torch

from ._precision import acc, exact
from ._topk import stable_topk_indices


def moe_route(router_logits, *, top_k, scoring="sigmoid", correction_bias=None, n_group=1, topk_group=1,
              renormalize=True, scaling_factor=1.0):
    x = router_logits.to(acc())
    s = torch.sigmoid(x) if scoring == "sigmoid" else torch.softmax(x, dim=-1)
    c = s if correction_bias is None else s + correction_bias.to(acc())
    c = torch.where(torch.isnan(c), float("-inf"), c)  # NaN ranks below every number
    T, E = c.shape
    if n_group > 1:
        groups = c.view(T, n_group, E // n_group)
        group_score = groups.topk(min(2, E // n_group), dim=-1).values.sum(-1)
        keep = stable_topk_indices(group_score, topk_group)
        group_mask = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, keep, True)
        c = c.masked_fill(~group_mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = stable_topk_indices(c, top_k)
    w = s.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * scaling_factor
    return (w if exact() else w.float()), ids.to(torch.int32)
