"""Contract family 5: expert parallelism. Tokens travel to the ranks that own their experts
(``ep_dispatch``) and the expert outputs travel back and are reduced per token (``ep_combine``),
over an expert-parallel group of processes (:mod:`hal.distributed`).

Between the two, a rank runs its local experts on the received rows exactly as it would run
``moe_experts`` on a DispatchPlan: the rows arrive grouped by local expert with their counts.
"""
from __future__ import annotations

from typing import Optional

import torch

from hal.contract import _checks as c
from hal.contract import _samples as smp
from hal.contract._spec import ExactBudget, FloatBudget, TensorMeta, data_checks, op_spec
from hal.errors import ContractError

SCALE_BLOCK = 128          # an e4m3 payload's scales: one fp32 per 1x128 block of a row
SOURCE_FIELDS = ("rank", "token", "slot")


def _group(op: str, name):
    """The registered EP group called ``name`` (ContractError when there is none)."""
    from hal import distributed
    if not isinstance(name, str):
        raise ContractError(op, "group", "a group name (str)", f"{type(name).__name__} {name!r}")
    found = distributed.get_ep_group(name)
    if found is None:
        raise ContractError(op, "group", "the name of a group made by hal.distributed.ep_group() in this process, "
                            f"or {distributed.LOCAL!r} (known: {', '.join(distributed.group_names())})", repr(name))
    return found


def owner_of_experts(num_experts: int, world_size: int, expert_map: Optional[torch.Tensor]) -> torch.Tensor:
    """[E] int64: the rank that owns each expert (``expert_map``, or the contiguous default: expert
    e on rank ``e // (E / world)``)."""
    if expert_map is not None:
        return expert_map.long()
    return torch.arange(num_experts) // (num_experts // world_size)


def _dispatch_meta(a):
    H = a.x.shape[1]
    world = _group("ep_dispatch", a.group).world_size
    scale_cols = c.ceil_div(H, SCALE_BLOCK) if a.x_scale is not None else 0
    return (TensorMeta((None, H), a.x.dtype), TensorMeta((None, scale_cols), torch.float32),
            TensorMeta((a.num_experts // world,), torch.int32), TensorMeta((None, 3), torch.int32))


def _dispatch_sample(g):
    T, k, E, H = 5, 2, 4, 16
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    ids[1, 1] = -1
    return (smp.rnd(g, T, H, dtype=torch.bfloat16), ids), dict(num_experts=E, group="local")


@op_spec(family="expert_parallel",
         summary="send each token's rows to the ranks owning its top-k experts; receive rows grouped by local expert "
                 "-> (recv_x [R,H], recv_scale [R,H/128 or 0], tokens_per_expert [E/world], recv_source [R,3])",
         outputs={"recv_x": ExactBudget(), "recv_scale": ExactBudget(), "tokens_per_expert": ExactBudget(),
                  "recv_source": ExactBudget()},
         returns="tuple", meta=_dispatch_meta, sample=_dispatch_sample)
def ep_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, *, num_experts: int, group: str = "local",
                x_scale: Optional[torch.Tensor] = None, expert_map: Optional[torch.Tensor] = None):
    """Expert-parallel dispatch: every rank of the EP group ``group`` calls it with its own tokens,
    and each receives the rows its experts must process (the expanded, expert-major layout:
    one row per (token, slot), as DeepEP's low-latency mode and Ascend's MC2 ops deliver them).

    x [T, H] (bf16, fp16, fp32, or float8_e4m3fn with ``x_scale`` [T, ceil(H/128)] fp32: one
    scale per 1x128 block, travelling with its row; x_scale only with e4m3 x). topk_ids [T, k]
    int32/int64 global expert ids in [0, E) or -1 (the slot sends nothing); T may differ between
    ranks and may be 0. num_experts E, a multiple of the group's world size W. Expert e lives on
    rank ``expert_map[e]`` (expert_map [E] int, values in [0, W), every rank owning E / W
    experts) or, by default, on rank ``e // (E / W)``. A rank's local experts are the experts it
    owns in increasing global id; local index j = their rank in that order.
    ``group`` names the EP group (:func:`hal.distributed.ep_group`; ``"local"``: this process
    alone, W = 1). Every rank of the group must call it with the same E, expert_map, k and
    payload dtype.
    Returns on each rank r, with R the number of (source rank s, token t, slot j) whose expert
    topk_ids_s[t, j] lives on r:
    ``recv_x [R, H]`` (x's dtype, the rows bit-exact), ``recv_scale [R, ceil(H/128)]`` fp32 (the
    rows' scales bit-exact; [R, 0] without x_scale), ``tokens_per_expert [E / W]`` int32 (rows per
    local expert), ``recv_source [R, 3]`` int32 (s, t, j) per row. Rows are ordered by local
    expert, then s, then t, then j (deterministic), so local expert j's rows are the
    ``tokens_per_expert[j]`` rows after those of experts < j. recv_source is the handle
    ``ep_combine`` needs. Inputs are never modified.
    """
    op = "ep_dispatch"
    c.tensor(op, "x", x, ndim=2, dtypes=(*c.FLOAT_DTYPES, c.FP8), dims="[T, H]")
    T, H = x.shape
    if H < 1:
        raise ContractError(op, "x", "H >= 1", f"shape {tuple(x.shape)}")
    c.tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=c.INT_DTYPES, dims="[T, k]")
    if topk_ids.shape[0] != T or not 1 <= topk_ids.shape[1] <= c.MAX_TOP_K:
        raise ContractError(op, "topk_ids", f"shape [T={T}, k] with 1 <= k <= {c.MAX_TOP_K}",
                            f"shape {tuple(topk_ids.shape)}")
    c.integer(op, "num_experts", num_experts, lo=1, hi=c.MAX_EXPERTS)
    world = _group(op, group).world_size
    if num_experts % world:
        raise ContractError(op, "num_experts", f"a multiple of the group's world size {world}", num_experts)
    if x.dtype == c.FP8:
        if x_scale is None:
            raise ContractError(op, "x_scale", "an fp32 [T, ceil(H/128)] tensor (x is float8_e4m3fn)", "None")
        c.tensor(op, "x_scale", x_scale, ndim=2, dtypes=(torch.float32,), dims="[T, ceil(H/128)]")
        c.shape(op, "x_scale", x_scale, (T, c.ceil_div(H, SCALE_BLOCK)), "[T, ceil(H/128)]")
    elif x_scale is not None:
        raise ContractError(op, "x_scale", f"None (x is {str(x.dtype).replace('torch.', '')}, not float8_e4m3fn)",
                            "a tensor")
    if expert_map is not None:
        c.tensor(op, "expert_map", expert_map, ndim=1, dtypes=c.INT_DTYPES, dims="[E]")
        c.shape(op, "expert_map", expert_map, (num_experts,), "[E]")
    c.same_device(op, "x", x, topk_ids=topk_ids, x_scale=x_scale, expert_map=expert_map)
    if data_checks(topk_ids):
        c.value_range(op, "topk_ids", topk_ids, -1, num_experts - 1, f"values in [0, {num_experts}) or -1")
    if expert_map is not None and data_checks(expert_map):
        c.value_range(op, "expert_map", expert_map, 0, world - 1, f"ranks in [0, {world})")
        per_rank = torch.bincount(expert_map.long().cpu(), minlength=world)
        if bool((per_rank != num_experts // world).any()):
            raise ContractError(op, "expert_map", f"every rank owning E / W = {num_experts // world} experts",
                                f"experts per rank {per_rank.tolist()}")


def _combine_meta(a):
    return (TensorMeta((a.topk_weights.shape[0], a.expert_out.shape[1]), a.expert_out.dtype),)


def _combine_sample(g):
    R, T, k, H = 6, 4, 2, 16
    pairs = torch.randperm(T * k, generator=g)[:R]
    source = torch.stack([torch.zeros(R, dtype=torch.int64), pairs // k, pairs % k], 1).to(torch.int32)
    return (smp.rnd(g, R, H, dtype=torch.bfloat16), source, torch.rand(T, k, generator=g)), dict(group="local")


@op_spec(family="expert_parallel",
         summary="send expert outputs back to their source ranks; out[t] = sum_j topk_weights[t,j] * row(t,j) "
                 "in slot order -> out [T,H]",
         outputs={"out": FloatBudget()}, meta=_combine_meta, sample=_combine_sample)
def ep_combine(expert_out: torch.Tensor, recv_source: torch.Tensor, topk_weights: torch.Tensor, *,
               group: str = "local"):
    """Expert-parallel combine, the inverse journey of ``ep_dispatch``: each rank sends every
    expert output row back to the rank it came from, and each rank reduces its tokens' rows.

    expert_out [R, H] (bf16, fp16 or fp32): one output row per received row, in the order
    ``ep_dispatch`` returned them (or any order, as long as recv_source follows the rows).
    recv_source [R, 3] int32/int64: (source rank s in [0, W), token t, slot j) of each row, as
    ``ep_dispatch`` returned it; each (s, t, j) at most once in the whole group.
    topk_weights [T, k] (fp32, or expert_out's dtype): this rank's routing weights; T and k are
    this rank's token count and top-k (the t and j of the rows that come back to it).
    Returns ``out [T, H]`` in expert_out's dtype, in this rank's token order::

        out[t] = sum over j = 0 .. k-1, in that order, of topk_weights[t, j] * row(t, j)

    in fp32, where row(t, j) is the expert output for this rank's (t, j) and slots without one
    (topk_ids -1) add nothing; a token with no row gives 0. The reduction order is fixed, so the
    result does not depend on which rank computed which row or in what order rows arrived.
    A row whose (t, j) lies outside a receiving rank's [T, k] is a ContractError raised there
    after the exchange. Inputs are never modified; R = 0 and T = 0 are legal.
    """
    op = "ep_combine"
    c.tensor(op, "expert_out", expert_out, ndim=2, dtypes=c.FLOAT_DTYPES, dims="[R, H]")
    R, H = expert_out.shape
    if H < 1:
        raise ContractError(op, "expert_out", "H >= 1", f"shape {tuple(expert_out.shape)}")
    c.tensor(op, "recv_source", recv_source, ndim=2, dtypes=c.INT_DTYPES, dims="[R, 3]")
    c.shape(op, "recv_source", recv_source, (R, 3), "[R, 3] (rank, token, slot)")
    c.tensor(op, "topk_weights", topk_weights, ndim=2, dtypes=tuple(dict.fromkeys((torch.float32, expert_out.dtype))),
             dims="[T, k]")
    if not 1 <= topk_weights.shape[1] <= c.MAX_TOP_K:
        raise ContractError(op, "topk_weights", f"shape [T, k] with 1 <= k <= {c.MAX_TOP_K}",
                            f"shape {tuple(topk_weights.shape)}")
    world = _group(op, group).world_size
    c.same_device(op, "expert_out", expert_out, recv_source=recv_source, topk_weights=topk_weights)
    if data_checks(recv_source) and R:
        c.value_range(op, "recv_source[:, 0]", recv_source[:, 0], 0, world - 1, f"source ranks in [0, {world})")
        c.value_range(op, "recv_source[:, 1:]", recv_source[:, 1:], 0, 2 ** 62,
                      "token and slot indices >= 0")
