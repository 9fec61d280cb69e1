"""``ep_dispatch`` on the GPU: on DeepEP's low-latency kernels when ``deep_ep`` is importable and
the call fits (:mod:`hal_cuda.ep_deepep`), else on torch.distributed (:func:`torch_ep_dispatch`).

The torch.distributed path: the bookkeeping (destinations, the order of the rows, local expert
indices, counts) stays on the device; the row counts cross to the host once, to size
``all_to_all_single`` (NCCL; gloo under the Triton interpreter). The contract's output has a
data-dependent row count, so one host read per call is inherent to this layout."""
from __future__ import annotations

import torch

from hal.contract.expert_parallel import _group
from hal.distributed import exchange_counts, exchange_rows
from hal_cuda import ep_deepep


def local_expert_index(num_experts: int, world: int, expert_map, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner [E], local index [E]) of every expert: its rank, and its position among that rank's
    experts in increasing global id."""
    per_rank = num_experts // world
    if expert_map is None:
        e = torch.arange(num_experts, device=device)
        return e // per_rank, e % per_rank
    owner = expert_map.long()
    order = torch.sort(owner, stable=True).indices                 # experts grouped by owner, ids increasing
    local = torch.empty_like(owner)
    local[order] = torch.arange(num_experts, device=device) % per_rank
    return owner, local


def ep_dispatch(x, topk_ids, *, num_experts, group="local", x_scale=None, expert_map=None):
    why = ep_deepep.deepep_unsupported_reason(x, topk_ids, num_experts=num_experts, group=group, x_scale=x_scale,
                                              expert_map=expert_map)
    if why is None:
        out = ep_deepep.dispatch(x, topk_ids, num_experts=num_experts, group=group, x_scale=x_scale,
                                 expert_map=expert_map)
        if not isinstance(out, str):
            ep_deepep.record("ep_dispatch", group, "deepep")
            return out
        why = out                          # some rank had more tokens than DeepEP's buffer: all ranks redo it here
    ep_deepep.record("ep_dispatch", group, "torch.distributed", why, x.device)
    out = torch_ep_dispatch(x, topk_ids, num_experts=num_experts, group=group, x_scale=x_scale, expert_map=expert_map)
    ep_deepep.remember_torch_dispatch(group, out[3])
    return out


def torch_ep_dispatch(x, topk_ids, *, num_experts, group="local", x_scale=None, expert_map=None):
    ep = _group("ep_dispatch", group)
    W, dev = ep.world_size, x.device
    T, k = topk_ids.shape
    owner, local_of = local_expert_index(num_experts, W, expert_map, dev)
    ids = topk_ids.reshape(-1).long()
    dest = torch.where(ids >= 0, owner[ids.clamp_min(0)], W)       # -1 slots sort last, to "rank W": never sent
    order = torch.sort(dest, stable=True).indices                   # by destination, (t, j) order kept
    send = torch.bincount(dest, minlength=W + 1)[:W]
    recv = exchange_counts(ep, send)
    counts = torch.cat([send, recv]).tolist()                       # the one host read
    sc, rc = counts[:W], counts[W:]
    picked = order[:sum(sc)]
    token, slot = picked // k, picked % k
    rows = exchange_rows(ep, x[token], sc, rc)
    scales = x_scale if x_scale is not None else x.new_empty(T, 0, dtype=torch.float32)
    row_scales = exchange_rows(ep, scales[token], sc, rc)
    meta = exchange_rows(ep, torch.stack([token, slot, ids[picked]], 1), sc, rc)
    R = rows.shape[0]
    src_rank = torch.repeat_interleave(torch.arange(W, device=dev), recv, output_size=R)
    local = local_of[meta[:, 2]]
    final = torch.sort(local, stable=True).indices                  # by local expert, then (s, t, j)
    source = torch.stack([src_rank, meta[:, 0], meta[:, 1]], 1)[final].to(torch.int32)
    tokens_per_expert = torch.bincount(local, minlength=num_experts // W).to(torch.int32)
    return rows[final], row_scales[final], tokens_per_expert, source
