"""The expert-parallel contract ops (``ep_dispatch`` / ``ep_combine``) on Ascend's MC2 op pair,
``npu_moe_distribute_dispatch_v2`` / ``npu_moe_distribute_combine_v2`` (Atlas A3).

Mapping (details in docs/ascend.md, "Expert parallelism on MC2"):

- the EP group's name becomes the HCCL communicator's name
  (``pg._get_backend(torch.device("npu")).get_hccl_comm_name(rank)``, as vllm-ascend's MC2 token
  dispatcher does); under the emulator, the hal.distributed group's own name (gloo);
- experts are relabelled so that MC2's contiguous placement (expert e on rank e // (E / W)) puts
  each expert where ``expert_map`` says, local experts in increasing global id;
- the payload travels as bfloat16 words: each token's row bytes (any contract dtype, the e4m3
  row with its fp32 1x128 scales included), then its (source rank, token, expert ids) as int32.
  With quant_mode 0 the op only moves rows, so they arrive bit for bit (an assumption about the
  hardware: no NaN canonicalization in a data move). The rows' (s, t, j) come from those int32,
  not from ``assist_info_for_combine`` / ``ep_recv_counts``, whose values the docs call private;
- every rank pads its batch to the group's largest one (BS must then be equal on all ranks, as
  the docs require for a masked batch) and marks padding tokens and -1 slots inactive in a
  [BS, K] ``x_active_mask``; -1 slots get an unused expert id (the K ids must differ);
- received rows are sorted into the contract's order (local expert, s, t, j); the permutation
  and MC2's handle (assist_info, ep_recv_counts, the ids and mask) are kept per group (the last
  four dispatches) for the ``ep_combine`` given that dispatch's recv_source, which puts the
  expert outputs back in MC2's order and hands the routing weights to MC2 as ``expert_scales``. fp32 expert outputs do not go to MC2 (it returns
  16-bit sums, an error far above the contract's budget): they take the reference's
  all_to_all_single over the group's process group (HCCL on an NPU) and fp32 weighting.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from hal.errors import UnsupportedCase
from hal_ascend.limits import (EP_MAX_BS_ENV, HCCL_BUFFSIZE_ENV, MC2_LIMITS, hccl_buffsize_mb, mc2_a3_buffer_bytes,
                               mc2_limits)
from hal_ascend.npu import functions as npu
from hal_ascend.npu import is_emulating

WORD = torch.bfloat16            # the payload's carrier dtype (2-byte words)
MC2_DTYPES = (torch.bfloat16, torch.float16)   # what npu_moe_distribute_combine_v2 weights and returns
META_FIXED = 2                   # int32 (source rank, token) before the K expert ids


def no_tp_args(name: str) -> dict:
    """No TP domain, spelled as vllm-ascend's MC2 dispatcher spells it on A3 (group_tp = the EP
    communicator, tp_world_size 1, tp_rank_id 0)."""
    return {"group_tp": name, "tp_world_size": 1, "tp_rank_id": 0}


@dataclasses.dataclass
class Handle:
    """What the combine needs from the group's last MC2 dispatch."""

    group_name: str
    source: torch.Tensor          # [R, 3] int32, the contract order
    perm: torch.Tensor            # contract row i is expand_x row perm[i]
    expert_ids: torch.Tensor      # [BS, K] int32 as given to MC2
    mask: torch.Tensor            # [BS, K] bool
    assist: torch.Tensor
    ep_recv_counts: torch.Tensor
    tp_recv_counts: torch.Tensor
    rows: int                     # A, expand_x's rows
    global_bs: int
    tokens: int                   # this rank's T
    num_experts: int


HANDLES: dict[str, list] = {}   # per group, the last KEPT_HANDLES dispatches' handles, newest last
KEPT_HANDLES = 4                 # dispatches in flight before their combines (e.g. two micro-batches per layer)


def _handle_for(group: str, recv_source) -> Optional[Handle]:
    """The handle of the dispatch that returned ``recv_source`` (the same tensor, else equal
    values), else the newest one (recv_source may then be a reordering of its rows)."""
    kept = HANDLES.get(group) or []
    for h in reversed(kept):
        if h.source is recv_source:
            return h
    for h in reversed(kept):
        if tuple(h.source.shape) == tuple(recv_source.shape) and torch.equal(h.source, recv_source.to(h.source.dtype)):
            return h
    return kept[-1] if kept else None


def _a3():
    return MC2_LIMITS["A3"]


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


def padded_width(words: int) -> int:
    """A row of ``words`` bf16 words padded to MC2's H rules on A3 (H >= 1024)."""
    lim = _a3()
    return max(lim.min_h, _align(words, lim.h_multiple))


def payload_words(dtype: torch.dtype, H: int, k: int, scaled: bool) -> int:
    """bf16 words per token: the row's bytes, its 1x128 scales (e4m3), (s, t) and k expert ids."""
    nbytes = H * torch.empty(0, dtype=dtype).element_size() + (4 * -(-H // 128) if scaled else 0)
    return -(-nbytes // 4) * 2 + 2 * (META_FIXED + k)


def hccl_group_name(group: str) -> str:
    """The communicator name MC2 takes for the hal EP group ``group``: the HCCL comm name of its
    process group on an NPU; the group's own name under the emulator."""
    from hal import distributed
    ep = distributed.get_ep_group(group)
    if is_emulating():
        return ep.name
    backend = ep.process_group._get_backend(torch.device("npu"))
    return backend.get_hccl_comm_name(ep.rank)


def mc2_expert_ids(num_experts: int, world: int, expert_map: Optional[torch.Tensor]) -> torch.Tensor:
    """[E] int64: the MC2 id of each contract expert, ``owner * (E / W) + its rank among its
    owner's experts`` (identity for the contiguous default placement)."""
    from hal.contract.expert_parallel import owner_of_experts
    owner = owner_of_experts(num_experts, world, None if expert_map is None else expert_map.cpu())
    order = torch.sort(owner, stable=True).indices              # by owner, then global id
    mc2 = torch.empty(num_experts, dtype=torch.int64)
    mc2[order] = torch.arange(num_experts)
    return mc2


def _soc_reason(soc: str) -> Optional[str]:
    if mc2_limits(soc) is None:
        return ("the MC2 ops (npu_moe_distribute_dispatch_v2 / combine_v2) are documented for Atlas A2/A3 only "
                f"(not {soc})")
    if mc2_limits(soc).expand_scales_required:
        return ("on Atlas A2 npu_moe_distribute_combine_v2 requires expand_scales, the dispatch's copy of the routing "
                "weights (expert_scales), which the contract's ep_dispatch does not receive; and A2's x_active_mask "
                "is 1-D (no per-slot -1)")
    return None


def one_process(group: str) -> bool:
    """Whether ``group`` is a one-process group (``"local"``): nothing to exchange, no MC2."""
    from hal import distributed
    ep = distributed.get_ep_group(group)
    return ep is None or ep.process_group is None


def _chip_and_group_reason(soc: str, group: str) -> tuple[Optional[str], int]:
    """(why MC2 cannot serve this chip or this EP group at all, or None; the group's size)."""
    why = _soc_reason(soc)
    return (why, 0) if why else _group_reason(group)


def _group_reason(group: str) -> tuple[Optional[str], int]:
    from hal import distributed
    ep = distributed.get_ep_group(group)
    W = ep.world_size if ep is not None else 1
    if W not in _a3().world_sizes:
        return f"MC2 takes an EP group of 2 to 384 ranks on Atlas A3 (group {group!r} has {W})", W
    return None, W


def _max_bs_env() -> Optional[int]:
    v = os.environ.get(EP_MAX_BS_ENV)
    return int(v) if v else None


def dispatch_supports(x, topk_ids, *, num_experts, group, x_scale, expert_map, soc="A3"):
    """None, or why ``ep_dispatch`` lies outside what MC2 takes. Shapes only (no host sync), and
    only what every rank of the group has in common (E, k, H, dtype, W), so the ranks decline
    together; what depends on one rank's tokens (T, duplicate ids) the kernel checks after
    agreeing on it with the group."""
    if one_process(group):
        return None                  # no exchange: the reference's torch ops on the device (see ep_dispatch)
    why, W = _chip_and_group_reason(soc, group)
    if why:
        return why
    lim = _a3()
    H, k = x.shape[1], topk_ids.shape[1]
    max_bs = _max_bs_env()
    if max_bs is not None and not 1 <= max_bs <= lim.max_bs:
        return f"{EP_MAX_BS_ENV}={max_bs}: MC2 takes 1 to {lim.max_bs} tokens per rank on Atlas A3"
    if k > lim.max_k or k > num_experts:
        return f"k={k}: MC2 takes 0 < K <= {lim.max_k} and K <= moe_expert_num ({num_experts})"
    if num_experts > lim.max_experts:
        return f"num_experts={num_experts}: MC2 takes at most {lim.max_experts} on A3"
    words = payload_words(x.dtype, H, k, x_scale is not None)
    if words > lim.max_h:
        return (f"a token's payload is {words} bf16 words (its row, scales, source and {k} expert ids): MC2 takes "
                f"H <= {lim.max_h}")
    if max_bs is not None:
        return buffer_reason(num_experts // W, max_bs, W, padded_width(words), k)
    return None


def buffer_reason(local_experts: int, max_bs: int, world: int, width: int, k: int) -> Optional[str]:
    """None, or why HCCL_BUFFSIZE is too small for MC2 at this size (the A3 formula)."""
    need = mc2_a3_buffer_bytes(local_experts, max_bs, world, width, k)
    if need <= hccl_buffsize_mb() * 2 ** 20:
        return None
    return (f"MC2 needs {HCCL_BUFFSIZE_ENV} >= {-(-need // 2 ** 20)} MB for {max_bs} tokens per rank (A3 formula), "
            f"{HCCL_BUFFSIZE_ENV}={hccl_buffsize_mb()}")


def combine_supports(expert_out, recv_source, topk_weights, *, group, soc="A3"):
    """None, or why ``ep_combine`` cannot run on MC2 within the contract's budget."""
    if one_process(group):
        return None
    why, _ = _chip_and_group_reason(soc, group)
    if why:
        return why
    if expert_out.dtype not in MC2_DTYPES:
        return None                  # the all-to-all path (see ep_combine): no MC2 limit applies
    if padded_width(expert_out.shape[1]) > _a3().max_h:
        return f"H={expert_out.shape[1]}: MC2's combine takes H <= {_a3().max_h}"
    kept = HANDLES.get(group)
    h = next((c for c in reversed(kept or []) if c.source is recv_source), kept[-1] if kept else None)
    if h is None:
        return (f"MC2's combine returns rows along its dispatch's path (assist_info_for_combine, ep_recv_counts): "
                f"group {group!r} has no preceding ep_dispatch on this backend")
    if tuple(topk_weights.shape) != (h.tokens, h.expert_ids.shape[1]):
        return (f"topk_weights {tuple(topk_weights.shape)} does not match this rank's last MC2 dispatch "
                f"[T={h.tokens}, k={h.expert_ids.shape[1]}]")
    return None


def _agree(ep, T: int, duplicate: bool, device) -> tuple[int, bool]:
    """(the group's largest T, whether any rank has a duplicate id): one all-reduce, so every rank
    takes the same decision. HAL_ASCEND_EP_MAX_BS, when set, replaces the largest T."""
    import torch.distributed as dist
    t = torch.tensor([T, int(duplicate)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ep.process_group)
    largest, dup = t.tolist()
    fixed = _max_bs_env()
    return (fixed if fixed is not None else largest), bool(dup)


def _fill_inactive(ids: torch.Tensor, live: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [BS, K] with each inactive slot given an expert id no slot of its row uses."""
    BS, K = ids.shape
    used = torch.zeros(BS, num_experts + 1, dtype=torch.bool, device=ids.device)
    used.scatter_(1, torch.where(live, ids, num_experts), True)
    free = torch.sort(used[:, :num_experts].to(torch.int8), dim=1, stable=True).indices     # unused ids first
    nth = torch.cumsum((~live).to(torch.int64), 1) - 1
    filler = torch.gather(free, 1, nth.clamp(min=0))
    return torch.where(live, ids, filler)


def _key(source: torch.Tensor, tokens: int, k: int) -> torch.Tensor:
    s = source.long()
    return (s[:, 0] * (tokens + 1) + s[:, 1]) * k + s[:, 2]


def ep_dispatch(x, topk_ids, *, num_experts, group, x_scale, expert_map):
    """See the module docstring. One all-reduce (the group's largest batch, duplicate ids) and
    one host sync for R. The one-process group ("local") exchanges nothing: the reference's torch
    ops on the device, no MC2 (it takes 2 ranks or more)."""
    if one_process(group):
        from hal.backends.cpu import KERNELS
        return KERNELS["ep_dispatch"](x, topk_ids, num_experts=num_experts, group=group, x_scale=x_scale,
                                      expert_map=expert_map)
    from hal import distributed
    ep = distributed.get_ep_group(group)
    W, rank, dev = ep.world_size, ep.rank, x.device
    T, H = x.shape
    k, E = topk_ids.shape[1], num_experts
    L = E // W
    relabel = mc2_expert_ids(E, W, expert_map).to(dev)
    live = topk_ids >= 0
    ids = torch.where(live, relabel[topk_ids.long().clamp(min=0)], -1)
    srt = torch.sort(ids, 1).values
    duplicate = k > 1 and bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any())
    largest, duplicate = _agree(ep, T, duplicate, dev)
    if duplicate:
        raise UnsupportedCase("ep_dispatch", "ascend", "a token names one expert in two slots: MC2 needs the K "
                              "expert ids of a token to differ")
    lim = _a3()
    if T > largest or largest > lim.max_bs:
        raise UnsupportedCase("ep_dispatch", "ascend", f"T={T} on this rank, {largest} on the group's largest: MC2 "
                              f"takes at most {lim.max_bs} tokens per rank on A3"
                              + (f" ({EP_MAX_BS_ENV}={_max_bs_env()})" if _max_bs_env() is not None else ""))
    BS = max(largest, 1)                                   # MC2 takes 0 < BS; a masked batch must be even
    words_per_row = payload_words(x.dtype, H, k, x_scale is not None)
    why = buffer_reason(L, BS, W, padded_width(words_per_row), k)
    if why:
        raise UnsupportedCase("ep_dispatch", "ascend", why)
    # the payload: row bytes | scale bytes | int32 (s, t, ids), as bf16 words
    parts = [x.contiguous().view(torch.uint8)]              # [T, H * element size]
    if x_scale is not None:
        parts.append(x_scale.float().contiguous().view(torch.uint8))
    row_bytes = sum(p.shape[1] for p in parts)
    parts.append(x.new_zeros(T, _align(row_bytes, 4) - row_bytes, dtype=torch.uint8))
    meta = torch.cat([torch.full((T, 1), rank, device=dev), torch.arange(T, device=dev)[:, None], ids], 1)
    parts.append(meta.to(torch.int32).view(torch.uint8))
    words = torch.cat(parts, 1).view(WORD)
    Hw = padded_width(words.shape[1])
    payload = x.new_zeros(BS, Hw, dtype=WORD)
    payload[:T, :words.shape[1]] = words
    mask = torch.zeros(BS, k, dtype=torch.bool, device=dev)
    mask[:T] = live
    mc2_ids = torch.zeros(BS, k, dtype=torch.int64, device=dev)
    mc2_ids[:T] = ids
    mc2_ids = _fill_inactive(mc2_ids, mask, E).to(torch.int32)
    name = hccl_group_name(group)
    expand_x, _, assist, token_nums, ep_recv, tp_recv, _ = npu().npu_moe_distribute_dispatch_v2(
        payload, mc2_ids, name, W, rank, E, x_active_mask=mask, shared_expert_num=0, global_bs=BS * W,
        expert_token_nums_type=1, **no_tp_args(name))
    counts = token_nums.to(torch.int64)
    R = int(counts.sum())
    got = expand_x[:R].contiguous().view(torch.uint8)
    esize = x.element_size()
    recv_x = got[:, :H * esize].contiguous().view(x.dtype)
    c = -(-H // 128) if x_scale is not None else 0
    recv_scale = got[:, H * esize:H * esize + 4 * c].contiguous().view(torch.float32) if c else \
        torch.empty(R, 0, dtype=torch.float32, device=dev)
    off = _align(row_bytes, 4)
    info = got[:, off:off + 4 * (META_FIXED + k)].contiguous().view(torch.int32).long()
    local = torch.repeat_interleave(torch.arange(L, device=dev), counts)
    slot = (info[:, META_FIXED:] == (rank * L + local)[:, None]).to(torch.int8).argmax(1)
    source = torch.stack([info[:, 0], info[:, 1], slot], 1)
    perm = torch.sort((local * W + source[:, 0]) * (BS + 1) * k + source[:, 1] * k + source[:, 2]).indices
    source = source[perm].to(torch.int32)
    kept = HANDLES.setdefault(group, [])
    kept.append(Handle(name, source, perm, mc2_ids, mask, assist, ep_recv, tp_recv, expand_x.shape[0], BS * W, T, E))
    del kept[:-KEPT_HANDLES]
    return recv_x[perm], recv_scale[perm], counts.to(torch.int32), source


def ep_combine(expert_out, recv_source, topk_weights, *, group):
    """See the module docstring: the expert outputs in MC2's row order, the routing weights as
    ``expert_scales`` (fp32), the dispatch's handle; returns out [T, H] in expert_out's dtype."""
    if expert_out.dtype not in MC2_DTYPES or one_process(group):
        # one process: nothing to exchange (MC2 takes 2 ranks or more). fp32: MC2 weights 16-bit rows and returns
        # a 16-bit sum, far above the contract's budget (twice the fp32 reference's error), so those take the
        # reference's all_to_all_single over the group's process group (HCCL on an NPU) and fp32 weighting
        from hal.backends.cpu import KERNELS
        return KERNELS["ep_combine"](expert_out, recv_source, topk_weights, group=group)
    from hal import distributed
    ep = distributed.get_ep_group(group)
    h = _handle_for(group, recv_source)
    W, rank, dev = ep.world_size, ep.rank, expert_out.device
    R, H = expert_out.shape
    k = h.expert_ids.shape[1]
    BS = h.expert_ids.shape[0]
    pos = h.perm
    same = recv_source is h.source or (tuple(recv_source.shape) == tuple(h.source.shape)
                                       and torch.equal(recv_source.to(h.source.dtype), h.source))
    if not same:
        mine, theirs = _key(h.source, BS, k), _key(recv_source.to(dev), BS, k)
        a, b = torch.sort(mine), torch.sort(theirs)
        if R != h.source.shape[0] or not torch.equal(a.values, b.values):
            raise UnsupportedCase("ep_combine", "ascend", "recv_source is not (a reordering of) the one this "
                                  "group's last ep_dispatch returned: MC2's combine can only return those rows")
        where = torch.empty_like(a.indices)
        where[b.indices] = a.indices                       # row i of expert_out is row where[i] of h.source
        pos = h.perm[where]
    expand = expert_out.new_zeros(h.rows, padded_width(H))
    expand[pos, :H] = expert_out
    scales = torch.zeros(BS, k, dtype=torch.float32, device=dev)
    scales[:h.tokens] = topk_weights.float()
    out = npu().npu_moe_distribute_combine_v2(
        expand, h.expert_ids, h.assist, h.ep_recv_counts, scales, h.group_name, W, rank, h.num_experts,
        tp_send_counts=h.tp_recv_counts, x_active_mask=h.mask, shared_expert_num=0, global_bs=h.global_bs,
        **no_tp_args(h.group_name))
    return out[:h.tokens, :H].contiguous()
