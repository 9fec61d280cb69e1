"""Reference ``moe_dispatch``: stable sort of token copies by expert, padded segments."""
import torch

from hal.contract.moe import DispatchPlan


def moe_dispatch(hidden, expert_ids, num_experts, *, align=1):
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()                       # copy j = t * k + slot
    copies = torch.nonzero(flat >= 0).flatten()                # valid copies, in (token, slot) order
    order = copies[torch.sort(flat[copies], stable=True).indices]   # by expert, then token, then slot
    counts = torch.bincount(flat[copies], minlength=num_experts)
    padded = (counts + align - 1) // align * align
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(padded, 0)
    N = int(offsets[-1])
    # row of the i-th copy of expert e = offsets[e] + (its rank among expert e's copies)
    experts_in_order = flat[order]
    rank = torch.arange(order.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rows = offsets[experts_in_order] + rank
    source = torch.full((N,), -1, dtype=torch.int64)
    source[rows] = order
    out = torch.zeros(N, hidden.shape[1], dtype=hidden.dtype)
    out[rows] = hidden[order // k]
    return DispatchPlan(hidden=out, tokens_per_expert=counts.to(torch.int32), offsets=offsets.to(torch.int32),
                        source=source, num_tokens=T, top_k=k, align=align)
