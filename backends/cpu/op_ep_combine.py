"""Reference ``ep_combine``: send each row home, place it at its (token, slot), and add the
weighted slots in slot order."""
import torch

from hal.contract.expert_parallel import _group
from hal.distributed import exchange_counts, exchange_rows
from hal.errors import ContractError

from ._precision import acc, rounded


def ep_combine(expert_out, recv_source, topk_weights, *, group="local"):
    ep = _group("ep_combine", group)
    W = ep.world_size
    T, k = topk_weights.shape
    H = expert_out.shape[1]
    if expert_out.device.type == "meta":
        if W > 1:
            raise ContractError("ep_combine", "expert_out", "tensors with data (the exchange with the other ranks "
                                "moves real rows)", "device meta")
        return expert_out.new_empty(T, H)              # one rank: the output's shape needs no data
    src = recv_source.long().cpu()
    order = torch.sort(src[:, 0], stable=True).indices                     # by the rank each row returns to
    send_counts = torch.bincount(src[order, 0], minlength=W)
    recv_counts = exchange_counts(ep, send_counts.to(expert_out.device)).cpu()
    sc, rc = send_counts.tolist(), recv_counts.tolist()
    rows = exchange_rows(ep, expert_out[order.to(expert_out.device)], sc, rc)
    where = exchange_rows(ep, src[order][:, 1:].to(expert_out.device), sc, rc).cpu()     # (t, j) of each row
    if where.numel() and (bool((where[:, 0] >= T).any()) or bool((where[:, 1] >= k).any())):
        bad = where[(where[:, 0] >= T) | (where[:, 1] >= k)][0].tolist()
        raise ContractError("ep_combine", "recv_source", f"(token, slot) inside this rank's topk_weights [T={T}, k={k}]",
                            f"a row for (token {bad[0]}, slot {bad[1]}) returned to rank {ep.rank}")
    slots = torch.zeros(T, k, H, dtype=acc(), device=expert_out.device)
    present = torch.zeros(T, k, dtype=torch.bool, device=expert_out.device)
    t, j = where[:, 0].to(slots.device), where[:, 1].to(slots.device)
    slots[t, j] = rows.to(acc())
    present[t, j] = True
    w = topk_weights.to(acc())
    out = torch.zeros(T, H, dtype=acc(), device=expert_out.device)
    for j in range(k):                                                      # slot order: a fixed reduction
        out = out + torch.where(present[:, j, None], w[:, j, None] * slots[:, j], 0.0)
    return rounded(out, expert_out.dtype)
