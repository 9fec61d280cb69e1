"""Reference ``ep_dispatch``: list the (token, slot) pairs each rank must receive, exchange the
counts, then the rows, their scales and their (token, slot, expert), and sort what arrived."""
import torch

from hal.contract.expert_parallel import _group, owner_of_experts
from hal.distributed import exchange_counts, exchange_rows
from hal.errors import ContractError


def ep_dispatch(x, topk_ids, *, num_experts, group="local", x_scale=None, expert_map=None):
    ep = _group("ep_dispatch", group)
    if x.device.type == "meta":
        # R, the rows this rank receives, is a function of every rank's topk_ids values, which meta tensors lack
        raise ContractError("ep_dispatch", "x", "tensors with data (R is a function of the values of topk_ids; "
                            "torch.ops.hal.ep_dispatch traces with a symbolic R)", "device meta")
    W, T = ep.world_size, x.shape[0]
    owner = owner_of_experts(num_experts, W, None if expert_map is None else expert_map.cpu())
    ids = topk_ids.long().cpu()
    token, slot = torch.nonzero(ids >= 0, as_tuple=True)          # every live (t, j), t-major then j
    expert = ids[token, slot]
    dest = owner[expert]
    order = torch.sort(dest, stable=True).indices                 # by destination, keeping (t, j) order
    token, slot, expert, dest = token[order], slot[order], expert[order], dest[order]
    send_counts = torch.bincount(dest, minlength=W)
    recv_counts = exchange_counts(ep, send_counts.to(x.device)).cpu()
    sc, rc = send_counts.tolist(), recv_counts.tolist()
    scales = x_scale if x_scale is not None else x.new_empty(T, 0, dtype=torch.float32)
    rows = exchange_rows(ep, x[token.to(x.device)], sc, rc)
    row_scales = exchange_rows(ep, scales[token.to(x.device)], sc, rc)
    meta = exchange_rows(ep, torch.stack([token, slot, expert], 1).to(torch.int64).to(x.device), sc, rc).cpu()
    src_rank = torch.repeat_interleave(torch.arange(W), recv_counts)            # arrivals come in source-rank order
    mine = torch.nonzero(owner == ep.rank).flatten()                            # local experts, increasing global id
    local_index = torch.full((num_experts,), -1, dtype=torch.int64)
    local_index[mine] = torch.arange(mine.numel())
    local = local_index[meta[:, 2]]
    final = torch.sort(local, stable=True).indices                              # by local expert, then (s, t, j)
    source = torch.stack([src_rank, meta[:, 0], meta[:, 1]], 1)[final].to(torch.int32)
    tokens_per_expert = torch.bincount(local, minlength=mine.numel()).to(torch.int32)
    dev = x.device
    return (rows[final.to(dev)], row_scales[final.to(dev)],
            tokens_per_expert.to(dev), source.to(dev))
