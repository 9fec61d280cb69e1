"""``moe_dispatch``: device-side histogram, prefix sum and permutation (torch ops, no Python loop).

Nothing here reads a device value on the host except one number: the plan's row count N, which
the contract makes data-dependent (it depends on how many ids are -1 and on the padding of each
expert's segment), so allocating the plan needs it: ``int(offsets[-1])`` is the op's one host
sync. The histogram is a ``scatter_add`` (``torch.bincount`` reads the maximum id on the host),
and rows of -1 ids are routed to a discarded dump row instead of being filtered by a boolean mask
(which syncs to learn its result size). ``moe_forward`` has no sync at all: routing never emits
-1 and it does not pad, so N = T * k is known without looking at the data.
"""
import torch


def dispatch_order(expert_ids: torch.Tensor, num_experts: int, align: int):
    """(order, counts, offsets, rows) for expert_ids [T, k] (ids in [0, E) or -1), all on the
    device and computed without a host sync: ``order`` [T*k] int64 the copies sorted by expert
    (stable, -1 ids last), ``counts`` [E] int64 per-expert copies, ``offsets`` [E+1] int64 the
    segment starts padded to ``align``, ``rows`` [T*k] int64 each sorted copy's destination row
    (-1 for a -1 id)."""
    flat = expert_ids.reshape(-1).long()
    valid = flat >= 0
    key = torch.where(valid, flat, num_experts)                       # -1 ids sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
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
    dst = torch.where(rows >= 0, rows, N)                              # row N: the dump row, dropped below
    source = torch.full((N + 1,), -1, dtype=torch.int64, device=hidden.device)
    source[dst] = order
    source = source[:N]
    out = torch.zeros((N + 1, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    out[dst] = hidden[order // k]
    return DispatchPlan(out[:N], counts.to(torch.int32), offsets.to(torch.int32), source, T, k, align)
