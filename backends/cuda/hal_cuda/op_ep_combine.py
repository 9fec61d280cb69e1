"""``ep_combine`` on the GPU: on DeepEP's low-latency combine when the rows' dispatch ran on DeepEP
and the call fits (:mod:`hal_cuda.ep_deepep`), else on torch.distributed (:func:`torch_ep_combine`):
rows go home with ``all_to_all_single`` (one host read for the counts), land in a [T, k, H] fp32
buffer by index, and the slots are added in slot order."""
from __future__ import annotations

import torch

from hal.contract.expert_parallel import _group
from hal.distributed import exchange_counts, exchange_rows
from hal.errors import ContractError
from hal_cuda import ep_deepep


def ep_combine(expert_out, recv_source, topk_weights, *, group="local"):
    why = ep_deepep.deepep_combine_unsupported_reason(expert_out, recv_source, topk_weights, group=group)
    if why is None:
        ep_deepep.record("ep_combine", group, "deepep")
        return ep_deepep.combine(expert_out, recv_source, topk_weights, group=group)
    ep_deepep.record("ep_combine", group, "torch.distributed", why, expert_out.device)
    return torch_ep_combine(expert_out, recv_source, topk_weights, group=group)


def torch_ep_combine(expert_out, recv_source, topk_weights, *, group="local"):
    ep = _group("ep_combine", group)
    W, dev = ep.world_size, expert_out.device
    T, k = topk_weights.shape
    H = expert_out.shape[1]
    src = recv_source.long()
    order = torch.sort(src[:, 0], stable=True).indices
    send = torch.bincount(src[:, 0], minlength=W)[:W]
    recv = exchange_counts(ep, send)
    counts = torch.cat([send, recv]).tolist()
    sc, rc = counts[:W], counts[W:]
    rows = exchange_rows(ep, expert_out[order], sc, rc)
    where = exchange_rows(ep, src[order][:, 1:], sc, rc)
    slot_index = where[:, 0] * k + where[:, 1]
    if where.numel() and bool(((where[:, 0] >= T) | (where[:, 1] >= k)).any()):
        bad = where[(where[:, 0] >= T) | (where[:, 1] >= k)][0].tolist()
        raise ContractError("ep_combine", "recv_source", f"(token, slot) inside this rank's topk_weights [T={T}, k={k}]",
                            f"a row for (token {bad[0]}, slot {bad[1]}) returned to rank {ep.rank}")
    slots = torch.zeros(T * k, H, dtype=torch.float32, device=dev).index_copy_(0, slot_index, rows.float())
    present = torch.zeros(T * k, dtype=torch.bool, device=dev).index_fill_(0, slot_index, True)
    slots, present = slots.view(T, k, H), present.view(T, k, 1)
    w = topk_weights.float()[..., None]
    out = torch.zeros(T, H, dtype=torch.float32, device=dev)
    for j in range(k):                                               # slot order: the contract's fixed sum
        out += torch.where(present[:, j], w[:, j] * slots[:, j], 0.0)
    return out.to(expert_out.dtype)
