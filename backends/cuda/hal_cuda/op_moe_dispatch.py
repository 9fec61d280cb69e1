"""``moe_dispatch``: device-side histogram, prefix sum and permutation (torch ops, no Python loop).

The plan's row count N is data-dependent (it depends on how many ids are -1 and on the padding of
each expert's segment), so allocating the plan needs its value on the host: this is the one host
sync of the op. ``moe_forward`` avoids it (routing never produces -1 and it does not pad, so
N = T * k is known without looking at the data).
"""
import torch


def dispatch_order(expert_ids: torch.Tensor, num_experts: int, align: int):
    """(order, counts, offsets, rows): the valid copies sorted by expert (stable), per-expert
    counts, padded offsets [E+1] (int64) and each sorted copy's destination row."""
    flat = expert_ids.reshape(-1).long()
    valid = flat >= 0
    key = torch.where(valid, flat, num_experts)                       # -1 ids sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded = (counts + align - 1) // align * align
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(padded, 0)
    first = torch.cumsum(counts, 0) - counts                           # rank 0 of each expert in `order`
    sorted_e = key[order]
    in_range = sorted_e < num_experts
    e_clamped = sorted_e.clamp_max(num_experts - 1)
    rank = torch.arange(order.numel(), device=flat.device) - first[e_clamped]
    rows = torch.where(in_range, offsets[e_clamped] + rank, -1)
    return order, counts, offsets, rows


def moe_dispatch(hidden, expert_ids, num_experts, *, align):
    from hal.contract.moe import DispatchPlan
    T, k = expert_ids.shape
    order, counts, offsets, rows = dispatch_order(expert_ids, num_experts, align)
    N = int(offsets[-1])                                               # the one host sync (see above)
    keep = rows >= 0
    src, dst = order[keep], rows[keep]
    source = torch.full((N,), -1, dtype=torch.int64, device=hidden.device)
    source[dst] = src
    out = torch.zeros((N, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    out[dst] = hidden[src // k]
    return DispatchPlan(out, counts.to(torch.int32), offsets.to(torch.int32), source, T, k, align)
