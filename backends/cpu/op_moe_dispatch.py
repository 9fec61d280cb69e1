"""Reference ``moe_dispatch``: stable sort of token copies by expert, padded segments."""
import torch

from hal.contract.moe import DispatchPlan
from hal.errors import ContractError


def moe_dispatch(hidden, expert_ids, num_experts, *, align=1):
    if hidden.device.type == "meta":
        # the plan's row count N is a function of expert_ids' values, which meta tensors do not have
        raise ContractError("moe_dispatch", "hidden", "tensors with data (the plan's row count depends on the values "
                            "of expert_ids; torch.ops.hal.moe_dispatch traces with a symbolic N)", "device meta")
    dev = hidden.device
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()                       # copy j = t * k + slot
    copies = torch.nonzero(flat >= 0).flatten()                # valid copies, in (token, slot) order
    order = copies[torch.sort(flat[copies], stable=True).indices]   # by expert, then token, then slot
    counts = torch.bincount(flat[copies], minlength=num_experts)
    padded = (counts + align - 1) // align * align
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)
    N = int(offsets[-1])
    # row of the i-th copy of expert e = offsets[e] + (its rank among expert e's copies)
    experts_in_order = flat[order]
    rank = torch.arange(order.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[experts_in_order]
    rows = offsets[experts_in_order] + rank
    source = torch.full((N,), -1, dtype=torch.int64, device=dev)
    source[rows] = order
    out = torch.zeros(N, hidden.shape[1], dtype=hidden.dtype, device=dev)
    out[rows] = hidden[order // k]
    return DispatchPlan(hidden=out, tokens_per_expert=counts.to(torch.int32), offsets=offsets.to(torch.int32),
                        source=source, num_tokens=T, top_k=k, align=align)
