"""Emulations of the MC2 expert-parallel ops ``npu_moe_distribute_dispatch_v2`` and
``npu_moe_distribute_combine_v2`` on top of the gloo reference transport
(:func:`hal.distributed.exchange_counts` / :func:`hal.distributed.exchange_rows`).

Semantics from the op-plugin documentation of the two ops (torch_npu v2 docs; the 2.13 wheel's
``_op_plugin_docs.py`` has no entry for them); signatures and output shapes from the wheel's
schema yaml and meta functions (:mod:`hal_ascend.schema` binds them like every emulated op).
``group_ep`` names a group made by :func:`hal.distributed.ep_group` in this process (on an NPU it
is the HCCL communicator's name). Only what hal-ascend uses is emulated: quant_mode 0, no TP
domain, no shared-expert ranks, no elastic / zero / copy / const experts; the rest raises
:class:`hal_ascend.emulator.NpuLimitError`.

Assumptions (the docs leave them open; to confirm on an NPU):
- expand_x rows are grouped by local expert, then by source rank, then by token; rows past the
  received ones are zero (the real op leaves them undefined).
- ``assist_info_for_combine``, ``ep_recv_counts`` and ``tp_recv_counts`` are private to the op
  pair (the docs say their values differ between chips and versions): here row i's (source
  rank, token, slot) sit at ``assist_info[128 i : 128 i + 3]`` and ``ep_recv_counts[j W + s]`` is
  the prefix sum of the rows of (local expert j, source rank s) in row order.
- the combine weights every row by ``expert_scales`` in fp32, adds a token's slots in slot order
  and rounds once to expand_x's dtype.
"""
from __future__ import annotations

import torch

from hal_ascend.emulator import _need
from hal_ascend.limits import MC2_ASSIST_STRIDE, mc2_limits


def _soc() -> str:
    from hal_ascend.plugin import emulated_soc
    return emulated_soc()


def _group(op, group_ep, ep_world_size, ep_rank_id):
    from hal import distributed
    ep = distributed.get_ep_group(group_ep)
    _need(ep is not None and ep.process_group is not None, op,
          f"group_ep {group_ep!r} is no communicator of this process (emulator: a hal.distributed.ep_group name)")
    _need(ep.world_size == ep_world_size and ep.rank == ep_rank_id, op,
          f"ep_world_size={ep_world_size}, ep_rank_id={ep_rank_id}: the communicator has {ep.world_size} ranks and "
          f"this is rank {ep.rank}")
    return ep


def _common(op, x_or_expand, expert_ids, ep_world_size, ep_rank_id, moe_expert_num, x_active_mask, tp_world_size,
            shared_expert_num, shared_expert_rank_num, expert_shard_type, comm_alg, zero_expert_num, copy_expert_num,
            const_expert_num, elastic_info, performance_info):
    """The argument rules both ops share; returns (BS, K, local_expert_num, active [BS, K] bool)."""
    _need(0 <= ep_rank_id < ep_world_size, op, f"ep_rank_id={ep_rank_id} outside [0, ep_world_size={ep_world_size})")
    lim = mc2_limits(_soc())
    _need(lim is not None, op, f"documented for Atlas A2/A3 only (emulating {_soc()})")
    _need(x_or_expand.dim() == 2 and x_or_expand.dtype in (torch.bfloat16, torch.float16), op,
          "x / expand_x must be 2-D bfloat16/float16")
    _need(expert_ids.dim() == 2 and expert_ids.dtype == torch.int32, op, "expert_ids must be [BS, K] int32")
    BS, K = expert_ids.shape
    H = x_or_expand.shape[1]
    _need(BS <= lim.max_bs, op, f"BS={BS}: at most {lim.max_bs} on {_soc()}")
    _need(1 <= K <= lim.max_k and K <= moe_expert_num, op, f"K={K}: 0 < K <= {lim.max_k} and K <= moe_expert_num")
    _need(lim.min_h <= H <= lim.max_h and H % lim.h_multiple == 0, op,
          f"H={H}: in [{lim.min_h}, {lim.max_h}], a multiple of {lim.h_multiple}")
    _need(ep_world_size in lim.world_sizes, op, f"ep_world_size={ep_world_size} not supported on {_soc()}")
    _need(1 <= moe_expert_num <= lim.max_experts and moe_expert_num % ep_world_size == 0, op,
          f"moe_expert_num={moe_expert_num}: in [1, {lim.max_experts}] and a multiple of ep_world_size")
    _need(tp_world_size in (0, 1) and shared_expert_rank_num == 0 and shared_expert_num in (0, 1)
          and expert_shard_type == 0 and comm_alg in ("", "fullmesh_v1")
          and zero_expert_num == copy_expert_num == const_expert_num == 0
          and elastic_info is None and performance_info is None, op,
          "TP domain, shared-expert ranks, elastic info and special experts are not emulated")
    if x_active_mask is None:
        active = torch.ones(BS, K, dtype=torch.bool)
    else:
        _need(x_active_mask.dtype == torch.bool and tuple(x_active_mask.shape) in ((BS,), (BS, K)), op,
              "x_active_mask must be [BS] or [BS, K] bool")
        _need(x_active_mask.dim() == 1 or lim.mask_2d, op, f"a 2-D x_active_mask is not supported on {_soc()}")
        active = x_active_mask.cpu()
        if active.dim() == 1:
            flags = active.tolist()
            _need(flags == sorted(flags, reverse=True), op, "a 1-D x_active_mask must put every true before any false")
            active = active[:, None].expand(BS, K)
    ids = expert_ids.long().cpu()
    _need(bool(((ids >= 0) & (ids < moe_expert_num))[active].all()), op, "expert_ids outside [0, moe_expert_num)")
    live = torch.where(active, ids, -1 - torch.arange(K)[None, :])            # inactive slots never collide
    _need(bool((live.sort(1).values.diff(dim=1) != 0).all()) if K > 1 else True, op,
          "the K expert ids of a token must differ")
    return BS, K, moe_expert_num // ep_world_size, active


def npu_moe_distribute_dispatch_v2(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *,
                                   scales=None, x_active_mask=None, expert_scales=None, elastic_info=None,
                                   performance_info=None, group_tp="", tp_world_size=0, tp_rank_id=0,
                                   expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0,
                                   global_bs=0, expert_token_nums_type=1, comm_alg="", zero_expert_num=0,
                                   copy_expert_num=0, const_expert_num=0, y_dtype=None, x_dtype=None,
                                   scales_dtype=None):
    """MC2 dispatch: x [BS, H] (bf16/fp16) rows go to every rank owning one of their experts
    (expert e on rank e // (moe_expert_num / ep_world_size)); x_active_mask [BS] or [BS, K]
    (A3) drops tokens / (token, slot) pairs. Returns (expand_x [A, H] x.dtype, dynamic_scales
    [A] fp32 (unused without quantization), assist_info_for_combine [max(BS K, 128 A)] int32,
    expert_token_nums [local_expert_num] int64 (counts, or their prefix sums when
    expert_token_nums_type=0), ep_recv_counts [W * local_expert_num] int32, tp_recv_counts
    [tp_world_size] int32, expand_scales [0] fp32), A = global_bs * min(local_expert_num, K)
    with global_bs defaulting to BS * W. quant_mode 0 only: the rows arrive bit for bit."""
    op = "npu_moe_distribute_dispatch_v2"
    BS, K, L, active = _common(op, x, expert_ids, ep_world_size, ep_rank_id, moe_expert_num, x_active_mask,
                               tp_world_size, shared_expert_num, shared_expert_rank_num, expert_shard_type, comm_alg,
                               zero_expert_num, copy_expert_num, const_expert_num, elastic_info, performance_info)
    _need(quant_mode == 0 and scales is None and y_dtype is None and x_dtype is None and scales_dtype is None, op,
          "only quant_mode 0 (no quantization) is emulated")
    _need(expert_scales is None, op, "expert_scales is not supported on A3 (and not emulated)")
    _need(expert_token_nums_type in (0, 1), op, "expert_token_nums_type must be 0 or 1")
    ep = _group(op, group_ep, ep_world_size, ep_rank_id)
    gbs = global_bs or BS * ep_world_size
    _need(BS * ep_world_size <= gbs, op,
          f"BS={BS} exceeds global_bs / ep_world_size = {gbs // ep_world_size}")
    A = gbs * min(L, K)
    H = x.shape[1]
    ids = expert_ids.long().cpu()
    token, slot = torch.nonzero(active, as_tuple=True)                    # t-major, then slot
    expert = ids[token, slot]
    order = torch.sort(expert // L, stable=True).indices                  # by destination rank
    token, slot, expert = token[order], slot[order], expert[order]
    send = torch.bincount(expert // L, minlength=ep_world_size)
    recv = exchange_counts_cpu(ep, send)
    sc, rc = send.tolist(), recv.tolist()
    from hal.distributed import exchange_rows
    rows = exchange_rows(ep, x[token], sc, rc)
    meta = exchange_rows(ep, torch.stack([token, slot, expert], 1), sc, rc)
    src = torch.repeat_interleave(torch.arange(ep_world_size), recv)
    local = meta[:, 2] - ep_rank_id * L
    final = torch.sort(local * ep_world_size + src, stable=True).indices   # local expert, source rank, token
    R = final.numel()
    expand_x = x.new_zeros(A, H)
    expand_x[:R] = rows[final]
    assist = torch.zeros(max(BS * K, A * MC2_ASSIST_STRIDE), dtype=torch.int32)
    info = torch.stack([src, meta[:, 0], meta[:, 1]], 1)[final].to(torch.int32)
    assist.view(-1)[:R * MC2_ASSIST_STRIDE].view(R, MC2_ASSIST_STRIDE)[:, :3] = info
    per_pair = torch.bincount(local * ep_world_size + src, minlength=L * ep_world_size)
    counts = torch.bincount(local, minlength=L)
    expert_token_nums = (counts if expert_token_nums_type == 1 else counts.cumsum(0)).to(torch.int64)
    return (expand_x, torch.zeros(A, dtype=torch.float32), assist, expert_token_nums,
            per_pair.cumsum(0).to(torch.int32), torch.zeros(tp_world_size, dtype=torch.int32),
            torch.zeros(0, dtype=torch.float32))


def exchange_counts_cpu(ep, send: torch.Tensor) -> torch.Tensor:
    from hal.distributed import exchange_counts
    return exchange_counts(ep, send.to(torch.int64))


def npu_moe_distribute_combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales,
                                  group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, tp_send_counts=None,
                                  x_active_mask=None, expand_scales=None, shared_expert_x=None, elastic_info=None,
                                  ori_x=None, const_expert_alpha_1=None, const_expert_alpha_2=None,
                                  const_expert_v=None, performance_info=None, group_tp="", tp_world_size=0,
                                  tp_rank_id=0, expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0,
                                  global_bs=0, comm_quant_mode=0, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                  const_expert_num=0):
    """MC2 combine, the dispatch's path backwards: every received row of expand_x [A, H]
    (bf16/fp16, in the dispatch's row order) returns to its source rank, which returns
    x [BS, H] (expand_x's dtype): ``x[t] = sum_k expert_scales[t, k] * row(t, k)`` over the
    active slots (expert_scales [BS, K] fp32), in fp32 and slot order, rounded once (assumption).
    assist_info_for_combine / ep_send_counts: the dispatch's outputs for the same call."""
    op = "npu_moe_distribute_combine_v2"
    BS, K, L, active = _common(op, expand_x, expert_ids, ep_world_size, ep_rank_id, moe_expert_num, x_active_mask,
                               tp_world_size, shared_expert_num, shared_expert_rank_num, expert_shard_type, comm_alg,
                               zero_expert_num, copy_expert_num, const_expert_num, elastic_info, performance_info)
    _need(comm_quant_mode == 0, op, "comm_quant_mode 2 (int8 communication) is not emulated")
    _need(all(t is None for t in (expand_scales, shared_expert_x, ori_x, const_expert_alpha_1, const_expert_alpha_2,
                                  const_expert_v)), op,
          "expand_scales / shared_expert_x / special experts are not emulated")
    _need(expert_scales.dtype == torch.float32 and tuple(expert_scales.shape) == (BS, K), op,
          "expert_scales must be [BS, K] float32")
    _need(assist_info_for_combine.dtype == torch.int32 and ep_send_counts.dtype == torch.int32
          and ep_send_counts.numel() == ep_world_size * L, op,
          "assist_info_for_combine / ep_send_counts must be the dispatch's int32 outputs")
    ep = _group(op, group_ep, ep_world_size, ep_rank_id)
    R = int(ep_send_counts[-1])
    _need(R <= expand_x.shape[0] and R * MC2_ASSIST_STRIDE <= assist_info_for_combine.numel(), op,
          f"ep_send_counts announce {R} rows, expand_x has {expand_x.shape[0]}")
    info = assist_info_for_combine[:R * MC2_ASSIST_STRIDE].view(R, MC2_ASSIST_STRIDE)[:, :3].long()
    order = torch.sort(info[:, 0], stable=True).indices
    send = torch.bincount(info[order, 0], minlength=ep_world_size)
    recv = exchange_counts_cpu(ep, send)
    sc, rc = send.tolist(), recv.tolist()
    from hal.distributed import exchange_rows
    rows = exchange_rows(ep, expand_x[:R][order], sc, rc)
    where = exchange_rows(ep, info[order][:, 1:], sc, rc)
    _need(bool(((where[:, 0] < BS) & (where[:, 1] < K)).all()) if where.numel() else True, op,
          "a returning row's (token, slot) lies outside expert_ids")
    slots = torch.zeros(BS, K, expand_x.shape[1], dtype=torch.float32)
    present = torch.zeros(BS, K, dtype=torch.bool)
    slots[where[:, 0], where[:, 1]] = rows.float()
    present[where[:, 0], where[:, 1]] = True
    present &= active
    out = torch.zeros(BS, expand_x.shape[1], dtype=torch.float32)
    for k in range(K):
        out = out + torch.where(present[:, k, None], expert_scales[:, k, None] * slots[:, k], 0.0)
    return out.to(expand_x.dtype)


IMPLS = {f.__name__: f for f in (npu_moe_distribute_dispatch_v2, npu_moe_distribute_combine_v2)}
