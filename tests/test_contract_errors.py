"""Every bad input the contract names raises hal.ContractError naming the op and the argument.

Each case is (op, kind, argument the message must name, call). ``kind`` sorts the cases so a test
can prove that every op is covered for each kind of mistake that applies to it: wrong rank, wrong
shape, wrong dtype, tensors on two devices ("meta" plays the second device), and bad values
(out-of-range ints and indices, non-finite or non-positive scales, bad options).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import hal
from hal import ops

F8 = torch.float8_e4m3fn
I32 = torch.int32
NAN, INF = float("nan"), float("inf")
r = torch.randn


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _plan(T=3, E=4, H=8, k=2):
    return ops.moe_dispatch(r(T, H), torch.randint(0, E, (T, k)), E)


def _replan(**changes):
    """A plan from _plan() with some fields replaced (a hand-corrupted plan)."""
    return dataclasses.replace(_plan(), **changes)


def _aligned_plan(**changes):
    """A plan of 3 tokens x 2 slots over 4 experts, segments aligned to 2 rows, hand-checked:
    counts [1, 2, 2, 0], offsets [0, 2, 4, 6, 6], source [0, -1, 1, 2, 3, 4] (row 1 pads expert 0)."""
    plan = ops.moe_dispatch(r(3, 8), torch.tensor([[0, 1], [1, 2], [2, -1]]), 4, align=2)
    assert plan.tokens_per_expert.tolist() == [1, 2, 2, 0] and plan.offsets.tolist() == [0, 2, 4, 6, 6]
    assert plan.source.tolist() == [0, -1, 1, 2, 3, 4]
    return dataclasses.replace(plan, **changes)


def _src(*values):
    return torch.tensor(values, dtype=torch.int64)


def _w8(E, rows, cols):
    """E experts of float8 weights [rows, cols] with their 128x128 block scales."""
    q = [ops.fp8_quantize_weight(r(rows, cols)) for _ in range(E)]
    return torch.stack([a for a, _ in q]), torch.stack([s for _, s in q])


A8, A8S = ops.fp8_quantize(r(4, 200))
B8, B8S = ops.fp8_quantize_weight(r(16, 200))
GU8, GU8S = _w8(4, 6, 8)
D8, D8S = _w8(4, 8, 3)
IDX = torch.tensor([[[0, 1, -1]]], dtype=I32)
EP_IDS = torch.tensor([[0], [1]], dtype=I32)                       # 2 tokens, top-1, 2 experts
EP_SRC = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=I32)   # 3 rows back to (rank 0, t, j) of [2, 2]
LI = (r(1, 2, 2, 8), r(1, 4, 8), torch.rand(1, 2, 2))                    # q, k, weights for the indexer
Q8, K8 = r(1, 2, 2, 8).to(F8), r(1, 4, 8).to(F8)
SA = (r(1, 1, 4, 8), r(1, 3, 2, 8), r(1, 3, 2, 8))                        # q, k, v for sparse attention
FWD = (r(3, 8), r(3, 4), r(4, 6, 8), r(4, 8, 3))                         # hidden, logits, w_gate_up, w_down
GDR = (r(2, 5, 1, 8), r(2, 5, 1, 8), r(2, 5, 2, 8), -torch.rand(2, 5, 2), torch.rand(2, 5, 2))   # q, k, v, g, beta

CASES = [
    # ---- moe_route
    ("moe_route", "rank", "router_logits", lambda: ops.moe_route(r(4), top_k=1)),
    ("moe_route", "rank", "correction_bias", lambda: ops.moe_route(r(4, 8), top_k=2, correction_bias=r(1, 8))),
    ("moe_route", "shape", "router_logits", lambda: ops.moe_route(r(4, 0), top_k=1)),
    ("moe_route", "shape", "correction_bias", lambda: ops.moe_route(r(4, 8), top_k=2, correction_bias=r(7))),
    ("moe_route", "dtype", "router_logits", lambda: ops.moe_route(r(4, 8).int(), top_k=1)),
    ("moe_route", "dtype", "router_logits", lambda: ops.moe_route(r(4, 8).to(F8), top_k=1)),
    ("moe_route", "dtype", "correction_bias", lambda: ops.moe_route(r(4, 8), top_k=2, correction_bias=torch.zeros(8, dtype=I32))),
    ("moe_route", "device", "correction_bias", lambda: ops.moe_route(r(4, 8), top_k=2, correction_bias=_meta(8))),
    ("moe_route", "value", "top_k", lambda: ops.moe_route(r(4, 8), top_k=9)),                     # k > E
    ("moe_route", "value", "top_k", lambda: ops.moe_route(r(4, 8), top_k=0)),                     # k < 1
    ("moe_route", "value", "top_k", lambda: ops.moe_route(r(4, 8), top_k=-1)),
    ("moe_route", "value", "top_k", lambda: ops.moe_route(r(4, 8), top_k=2.0)),
    ("moe_route", "value", "top_k", lambda: ops.moe_route(r(4, 8), top_k=True)),
    ("moe_route", "value", "top_k", lambda: ops.moe_route(r(4, 8), top_k=5, n_group=4, topk_group=2)),  # > kept experts
    ("moe_route", "value", "n_group", lambda: ops.moe_route(r(4, 8), top_k=2, n_group=3)),          # 3 does not divide 8
    ("moe_route", "value", "n_group", lambda: ops.moe_route(r(4, 8), top_k=2, n_group=0)),
    ("moe_route", "value", "topk_group", lambda: ops.moe_route(r(4, 8), top_k=2, n_group=4, topk_group=5)),
    ("moe_route", "value", "topk_group", lambda: ops.moe_route(r(4, 8), top_k=2, n_group=4, topk_group=0)),
    ("moe_route", "value", "scoring", lambda: ops.moe_route(r(4, 8), top_k=2, scoring="relu")),
    ("moe_route", "value", "scaling_factor", lambda: ops.moe_route(r(4, 8), top_k=2, scaling_factor=NAN)),
    ("moe_route", "value", "scaling_factor", lambda: ops.moe_route(r(4, 8), top_k=2, scaling_factor=INF)),
    ("moe_route", "value", "renormalize", lambda: ops.moe_route(r(4, 8), top_k=2, renormalize=1)),
    ("moe_route", "value", "top_k", lambda: ops.moe_route(r(4, 8), top_k=2 ** 31 - 1)),
    ("moe_route", "value", "n_group", lambda: ops.moe_route(r(4, 8), top_k=2, n_group=2 ** 40)),
    # ---- moe_dispatch
    ("moe_dispatch", "rank", "hidden", lambda: ops.moe_dispatch(r(3, 8, 1), torch.tensor([[0], [1], [1]]), 4)),
    ("moe_dispatch", "rank", "expert_ids", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([0, 1, 1]), 4)),
    ("moe_dispatch", "shape", "expert_ids", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1]]), 4)),
    ("moe_dispatch", "dtype", "expert_ids", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0.0], [1.0], [1.0]]), 4)),
    ("moe_dispatch", "dtype", "hidden", lambda: ops.moe_dispatch(r(3, 8).to(F8), torch.tensor([[0], [1], [1]]), 4)),
    ("moe_dispatch", "device", "expert_ids", lambda: ops.moe_dispatch(r(3, 8), _meta(3, 1, dtype=torch.int64), 4)),
    ("moe_dispatch", "value", "expert_ids", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [4], [1]]), 4)),
    ("moe_dispatch", "value", "expert_ids", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [-2], [1]]), 4)),
    ("moe_dispatch", "value", "num_experts", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1], [1]]), 0)),
    ("moe_dispatch", "value", "num_experts", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1], [1]]), 4.0)),
    ("moe_dispatch", "value", "align", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1], [1]]), 4, align=0)),
    # legal-looking huge ints: a ContractError with the bound, never the allocator
    ("moe_dispatch", "value", "num_experts", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1], [1]]), 2 ** 40)),
    ("moe_dispatch", "value", "align", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1], [1]]), 4, align=2 ** 40)),
    # ---- moe_experts
    ("moe_experts", "rank", "w_gate_up", lambda: ops.moe_experts(_plan(), r(6, 8), r(4, 8, 3))),
    ("moe_experts", "rank", "plan.hidden", lambda: ops.moe_experts(_replan(hidden=r(6, 8, 1)), r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "shape", "w_gate_up", lambda: ops.moe_experts(_plan(), r(4, 6, 9), r(4, 8, 3))),   # H
    ("moe_experts", "shape", "w_gate_up", lambda: ops.moe_experts(_plan(), r(3, 6, 8), r(3, 8, 3))),   # E
    ("moe_experts", "shape", "w_gate_up", lambda: ops.moe_experts(_plan(), r(4, 5, 8), r(4, 8, 3))),   # odd 2I
    ("moe_experts", "shape", "w_down", lambda: ops.moe_experts(_plan(), r(4, 6, 8), r(4, 8, 4))),      # I
    ("moe_experts", "shape", "w_gate_up_scale", lambda: ops.moe_experts(_plan(), GU8, D8, w_gate_up_scale=GU8S[:, :, :0],
                                                                          w_down_scale=D8S)),
    ("moe_experts", "shape", "plan.source", lambda: ops.moe_experts(_replan(source=torch.zeros(5, dtype=torch.int64)),
                                                                      r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "dtype", "w_gate_up", lambda: ops.moe_experts(_plan(), r(4, 6, 8).int(), r(4, 8, 3).int())),
    ("moe_experts", "dtype", "w_down", lambda: ops.moe_experts(_plan(), r(4, 6, 8), r(4, 8, 3).bfloat16())),
    ("moe_experts", "dtype", "w_down_scale", lambda: ops.moe_experts(_plan(), GU8, D8, w_gate_up_scale=GU8S,
                                                                       w_down_scale=D8S.double())),
    ("moe_experts", "dtype", "plan.tokens_per_expert", lambda: ops.moe_experts(
        _replan(tokens_per_expert=_plan().tokens_per_expert.long()), r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "device", "w_gate_up", lambda: ops.moe_experts(_plan(), _meta(4, 6, 8), _meta(4, 8, 3))),
    ("moe_experts", "device", "w_down_scale", lambda: ops.moe_experts(_plan(), GU8, D8, w_gate_up_scale=GU8S,
                                                                        w_down_scale=D8S.to("meta"))),
    ("moe_experts", "device", "plan.offsets", lambda: ops.moe_experts(_replan(offsets=_plan().offsets.to("meta")),
                                                                        r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "value", "plan", lambda: ops.moe_experts("plan", r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "value", "activation", lambda: ops.moe_experts(_plan(), r(4, 6, 8), r(4, 8, 3), activation="gelu")),
    ("moe_experts", "value", "w_gate_up_scale", lambda: ops.moe_experts(_plan(), GU8, D8)),          # missing fp8 scales
    ("moe_experts", "value", "w_down_scale", lambda: ops.moe_experts(_plan(), GU8, D8, w_gate_up_scale=GU8S)),
    ("moe_experts", "value", "w_gate_up_scale", lambda: ops.moe_experts(_plan(), GU8, D8, w_gate_up_scale=GU8S * INF,
                                                                          w_down_scale=D8S)),
    ("moe_experts", "value", "w_down_scale", lambda: ops.moe_experts(_plan(), GU8, D8, w_gate_up_scale=GU8S,
                                                                       w_down_scale=D8S * 0)),
    ("moe_experts", "value", "w_down_scale", lambda: ops.moe_experts(_plan(), GU8, D8, w_gate_up_scale=GU8S,
                                                                       w_down_scale=D8S * NAN)),
    ("moe_experts", "value", "w_gate_up_scale", lambda: ops.moe_experts(_plan(), r(4, 6, 8), r(4, 8, 3),
                                                                          w_gate_up_scale=torch.ones(4, 1, 1))),  # bf16 + scales
    ("moe_experts", "value", "plan.offsets", lambda: ops.moe_experts(
        _replan(offsets=torch.tensor([0, 1, 2, 3, 5], dtype=I32)), r(4, 6, 8), r(4, 8, 3))),         # does not end at N
    ("moe_experts", "value", "plan.offsets", lambda: ops.moe_experts(
        _replan(tokens_per_expert=torch.tensor([6, 0, 0, 0], dtype=I32), offsets=torch.tensor([0, 3, 3, 6, 6], dtype=I32)),
        r(4, 6, 8), r(4, 8, 3))),                                                                    # segment too small
    ("moe_experts", "value", "plan.source", lambda: ops.moe_experts(
        _replan(source=torch.tensor([0, 1, 2, 3, 4, 6])), r(4, 6, 8), r(4, 8, 3))),                  # >= T*k
    ("moe_experts", "value", "plan.tokens_per_expert", lambda: ops.moe_experts(
        _replan(tokens_per_expert=torch.tensor([-1, 0, 0, 0], dtype=I32)), r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "value", "plan.num_tokens", lambda: ops.moe_experts(_replan(num_tokens=-1), r(4, 6, 8), r(4, 8, 3))),
    # hand-built plans whose bookkeeping does not add up (each once accepted: another answer or an IndexError)
    ("moe_experts", "value", "plan.offsets", lambda: ops.moe_experts(                            # counts vs segments
        _aligned_plan(tokens_per_expert=torch.tensor([1, 2, 3, 0], dtype=I32)), r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "value", "plan.offsets", lambda: ops.moe_experts(                            # a segment too long
        _aligned_plan(offsets=torch.tensor([0, 4, 4, 6, 6], dtype=I32)), r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "value", "plan.source", lambda: ops.moe_experts(                             # count 2, one real row
        _aligned_plan(tokens_per_expert=torch.tensor([2, 1, 2, 0], dtype=I32)), r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "value", "plan.source", lambda: ops.moe_experts(                             # a copy on a padding row
        _aligned_plan(source=_src(0, 5, 1, 2, 3, 4)), r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "value", "plan.source", lambda: ops.moe_experts(                             # -1 on a real row
        _aligned_plan(source=_src(0, -1, -1, 2, 3, 4)), r(4, 6, 8), r(4, 8, 3))),
    ("moe_combine", "value", "plan.source", lambda: ops.moe_combine(                             # one copy on two rows
        r(6, 8), _aligned_plan(source=_src(0, -1, 1, 2, 1, 4)), r(3, 2))),
    ("moe_combine", "value", "plan.source", lambda: ops.moe_combine(                             # num_tokens*top_k < rows
        r(6, 8), _aligned_plan(num_tokens=2), r(2, 2))),
    ("moe_combine", "value", "plan.source", lambda: ops.moe_combine(                             # source beyond T*k
        r(6, 8), _aligned_plan(source=_src(0, -1, 1, 2, 3, 40)), r(3, 2))),
    ("moe_combine", "shape", "weights", lambda: ops.moe_combine(r(6, 8), _aligned_plan(top_k=3), r(3, 2))),
    ("moe_experts", "value", "plan.top_k", lambda: ops.moe_experts(_aligned_plan(top_k=2 ** 40), r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "value", "plan.align", lambda: ops.moe_experts(_aligned_plan(align=2 ** 40), r(4, 6, 8), r(4, 8, 3))),
    ("moe_experts", "value", "plan.tokens_per_expert", lambda: ops.moe_experts(            # more experts than the bound
        _replan(tokens_per_expert=torch.zeros(2 ** 16 + 1, dtype=I32), offsets=torch.zeros(2 ** 16 + 2, dtype=I32)),
        r(4, 6, 8), r(4, 8, 3))),
    # ---- moe_combine
    ("moe_combine", "rank", "expert_out", lambda: ops.moe_combine(r(6), _plan(), r(3, 2))),
    ("moe_combine", "rank", "weights", lambda: ops.moe_combine(r(6, 8), _plan(), r(6))),
    ("moe_combine", "shape", "expert_out", lambda: ops.moe_combine(r(5, 8), _plan(), r(3, 2))),
    ("moe_combine", "shape", "weights", lambda: ops.moe_combine(r(6, 8), _plan(), r(3, 3))),
    ("moe_combine", "dtype", "weights", lambda: ops.moe_combine(r(6, 8), _plan(), torch.ones(3, 2, dtype=I32))),
    ("moe_combine", "dtype", "expert_out", lambda: ops.moe_combine(r(6, 8).to(F8), _plan(), r(3, 2))),
    ("moe_combine", "device", "weights", lambda: ops.moe_combine(r(6, 8), _plan(), _meta(3, 2))),
    ("moe_combine", "value", "plan", lambda: ops.moe_combine(r(6, 8), (r(6, 8), None), r(3, 2))),
    ("moe_combine", "value", "plan.source", lambda: ops.moe_combine(r(6, 8), _replan(source=torch.tensor([0, 1, 2, 3, 4, -2])),
                                                                      r(3, 2))),
    # ---- moe_forward
    ("moe_forward", "rank", "hidden", lambda: ops.moe_forward(r(3, 8, 1), *FWD[1:], top_k=2)),
    ("moe_forward", "rank", "w_down", lambda: ops.moe_forward(*FWD[:3], r(4, 24), top_k=2)),
    ("moe_forward", "shape", "router_logits", lambda: ops.moe_forward(FWD[0], r(4, 4), *FWD[2:], top_k=2)),  # T
    ("moe_forward", "shape", "w_gate_up", lambda: ops.moe_forward(*FWD[:2], r(5, 6, 8), r(5, 8, 3), top_k=2)),  # E
    ("moe_forward", "shape", "correction_bias", lambda: ops.moe_forward(*FWD, top_k=2, correction_bias=r(5))),
    ("moe_forward", "dtype", "hidden", lambda: ops.moe_forward(FWD[0].int(), *FWD[1:], top_k=2)),
    ("moe_forward", "device", "router_logits", lambda: ops.moe_forward(FWD[0], _meta(3, 4), *FWD[2:], top_k=2)),
    ("moe_forward", "device", "w_gate_up", lambda: ops.moe_forward(*FWD[:2], _meta(4, 6, 8), _meta(4, 8, 3), top_k=2)),
    ("moe_forward", "value", "top_k", lambda: ops.moe_forward(*FWD, top_k=5)),
    ("moe_forward", "value", "n_group", lambda: ops.moe_forward(*FWD, top_k=2, n_group=3)),
    ("moe_forward", "value", "w_gate_up_scale", lambda: ops.moe_forward(*FWD[:2], GU8, D8, top_k=2)),
    ("moe_forward", "value", "w_down_scale", lambda: ops.moe_forward(*FWD, top_k=2, w_down_scale=torch.ones(4, 1, 1))),
    # ---- lightning_indexer
    ("lightning_indexer", "rank", "q", lambda: ops.lightning_indexer(r(1, 2, 8), LI[1], LI[2], top_k=2)),
    ("lightning_indexer", "rank", "q_offset", lambda: ops.lightning_indexer(*LI, top_k=2, q_offset=torch.zeros(1, 1, dtype=I32))),
    ("lightning_indexer", "shape", "k", lambda: ops.lightning_indexer(LI[0], r(1, 4, 7), LI[2], top_k=2)),      # D
    ("lightning_indexer", "shape", "k", lambda: ops.lightning_indexer(LI[0], r(2, 4, 8), LI[2], top_k=2)),      # B
    ("lightning_indexer", "shape", "weights", lambda: ops.lightning_indexer(*LI[:2], r(1, 2, 3), top_k=2)),
    ("lightning_indexer", "shape", "k_lengths", lambda: ops.lightning_indexer(*LI, top_k=2, k_lengths=torch.tensor([4, 4]))),
    ("lightning_indexer", "shape", "q_scale", lambda: ops.lightning_indexer(Q8, K8, LI[2], top_k=2, q_scale=torch.ones(1, 2),
                                                                              k_scale=torch.ones(1, 4))),
    ("lightning_indexer", "dtype", "weights", lambda: ops.lightning_indexer(*LI[:2], LI[2].bfloat16(), top_k=2)),
    ("lightning_indexer", "dtype", "k", lambda: ops.lightning_indexer(LI[0], LI[1].bfloat16(), LI[2], top_k=2)),
    ("lightning_indexer", "dtype", "q", lambda: ops.lightning_indexer(LI[0].int(), LI[1].int(), LI[2], top_k=2)),
    ("lightning_indexer", "dtype", "q_offset", lambda: ops.lightning_indexer(*LI, top_k=2, q_offset=torch.zeros(1))),
    ("lightning_indexer", "device", "k", lambda: ops.lightning_indexer(LI[0], _meta(1, 4, 8), LI[2], top_k=2)),
    ("lightning_indexer", "device", "k_lengths", lambda: ops.lightning_indexer(*LI, top_k=2,
                                                                                 k_lengths=_meta(1, dtype=torch.int64))),
    ("lightning_indexer", "value", "top_k", lambda: ops.lightning_indexer(*LI, top_k=0)),
    ("lightning_indexer", "value", "top_k", lambda: ops.lightning_indexer(*LI, top_k=2 ** 31 - 1)),
    ("lightning_indexer", "value", "causal", lambda: ops.lightning_indexer(*LI, top_k=2, causal="yes")),
    ("lightning_indexer", "value", "q_offset", lambda: ops.lightning_indexer(*LI, top_k=2, q_offset=[0])),
    ("lightning_indexer", "value", "k_lengths", lambda: ops.lightning_indexer(*LI, top_k=2, k_lengths=torch.tensor([5]))),
    ("lightning_indexer", "value", "k_lengths", lambda: ops.lightning_indexer(*LI, top_k=2, k_lengths=torch.tensor([-1]))),
    ("lightning_indexer", "value", "q_scale", lambda: ops.lightning_indexer(Q8, K8, LI[2], top_k=2)),        # missing scales
    ("lightning_indexer", "value", "k_scale", lambda: ops.lightning_indexer(Q8, K8, LI[2], top_k=2, q_scale=torch.ones(1, 2, 2))),
    ("lightning_indexer", "value", "k_scale", lambda: ops.lightning_indexer(Q8, K8, LI[2], top_k=2, q_scale=torch.ones(1, 2, 2),
                                                                              k_scale=torch.zeros(1, 4))),
    ("lightning_indexer", "value", "q_scale", lambda: ops.lightning_indexer(Q8, K8, LI[2], top_k=2,
                                                                              q_scale=torch.full((1, 2, 2), NAN),
                                                                              k_scale=torch.ones(1, 4))),
    ("lightning_indexer", "value", "q_scale", lambda: ops.lightning_indexer(*LI, top_k=2, q_scale=torch.ones(1, 2, 2))),
    ("lightning_indexer", "value", "q_scale", lambda: ops.lightning_indexer(Q8, K8, LI[2], top_k=2, q_scale=1.0,
                                                                              k_scale=torch.ones(1, 4))),
    # ---- sparse_attention
    ("sparse_attention", "rank", "q", lambda: ops.sparse_attention(r(1, 4, 8), *SA[1:], IDX, scale=1.0)),
    ("sparse_attention", "rank", "v", lambda: ops.sparse_attention(*SA[:2], r(1, 3, 16), IDX, scale=1.0)),
    ("sparse_attention", "rank", "indices", lambda: ops.sparse_attention(*SA, IDX[0], scale=1.0)),
    ("sparse_attention", "shape", "k", lambda: ops.sparse_attention(SA[0], r(1, 3, 3, 8), r(1, 3, 3, 8), IDX, scale=1.0)),  # Hk
    ("sparse_attention", "shape", "k", lambda: ops.sparse_attention(SA[0], r(1, 3, 2, 9), SA[2], IDX, scale=1.0)),  # Dqk
    ("sparse_attention", "shape", "v", lambda: ops.sparse_attention(*SA[:2], r(1, 4, 2, 8), IDX, scale=1.0)),      # L
    ("sparse_attention", "shape", "indices", lambda: ops.sparse_attention(*SA, torch.zeros(1, 2, 3, dtype=I32), scale=1.0)),
    ("sparse_attention", "dtype", "indices", lambda: ops.sparse_attention(*SA, IDX.long(), scale=1.0)),
    ("sparse_attention", "dtype", "k", lambda: ops.sparse_attention(SA[0], SA[1].bfloat16(), SA[2], IDX, scale=1.0)),
    ("sparse_attention", "dtype", "q", lambda: ops.sparse_attention(SA[0].to(F8), SA[1].to(F8), SA[2].to(F8), IDX, scale=1.0)),
    ("sparse_attention", "device", "v", lambda: ops.sparse_attention(*SA[:2], _meta(1, 3, 2, 8), IDX, scale=1.0)),
    ("sparse_attention", "device", "indices", lambda: ops.sparse_attention(*SA, IDX.to("meta"), scale=1.0)),
    ("sparse_attention", "value", "indices", lambda: ops.sparse_attention(*SA, IDX + 3, scale=1.0)),     # >= L
    ("sparse_attention", "value", "indices", lambda: ops.sparse_attention(*SA, IDX - 2, scale=1.0)),     # < -1
    ("sparse_attention", "value", "scale", lambda: ops.sparse_attention(*SA, IDX, scale=INF)),
    ("sparse_attention", "value", "scale", lambda: ops.sparse_attention(*SA, IDX, scale=torch.tensor(1.0))),
    ("sparse_attention", "value", "return_lse", lambda: ops.sparse_attention(*SA, IDX, scale=1.0, return_lse=None)),
    # ---- fp8_quantize (one tensor: no device mix, and any [..., K] shape is legal)
    ("fp8_quantize", "rank", "x", lambda: ops.fp8_quantize(torch.tensor(1.0))),
    ("fp8_quantize", "dtype", "x", lambda: ops.fp8_quantize(r(4, 8).to(F8))),
    ("fp8_quantize", "dtype", "x", lambda: ops.fp8_quantize(torch.ones(4, 8, dtype=I32))),
    ("fp8_quantize", "value", "x", lambda: ops.fp8_quantize([[1.0, 2.0]])),
    ("fp8_quantize", "value", "group_size", lambda: ops.fp8_quantize(r(4, 8), group_size=0)),
    ("fp8_quantize", "value", "group_size", lambda: ops.fp8_quantize(r(4, 8), group_size=2 ** 40)),
    ("fp8_quantize", "value", "scale_format", lambda: ops.fp8_quantize(r(4, 8), scale_format="e8m0")),
    # ---- fp8_quantize_weight
    ("fp8_quantize_weight", "rank", "w", lambda: ops.fp8_quantize_weight(r(4, 8, 2))),
    ("fp8_quantize_weight", "rank", "w", lambda: ops.fp8_quantize_weight(r(8))),
    ("fp8_quantize_weight", "dtype", "w", lambda: ops.fp8_quantize_weight(r(4, 8).to(F8))),
    ("fp8_quantize_weight", "value", "block", lambda: ops.fp8_quantize_weight(r(4, 8), block=-1)),
    ("fp8_quantize_weight", "value", "block", lambda: ops.fp8_quantize_weight(r(4, 8), block=2 ** 30)),
    # ---- fp8_gemm
    ("fp8_gemm", "rank", "a", lambda: ops.fp8_gemm(A8[0], A8S, B8, B8S)),
    ("fp8_gemm", "rank", "b_scale", lambda: ops.fp8_gemm(A8, A8S, B8, B8S.flatten())),
    ("fp8_gemm", "shape", "a_scale", lambda: ops.fp8_gemm(A8, A8S[:, :1], B8, B8S)),
    ("fp8_gemm", "shape", "b_scale", lambda: ops.fp8_gemm(A8, A8S, B8, B8S.t())),
    ("fp8_gemm", "shape", "b", lambda: ops.fp8_gemm(A8, A8S, B8[:, :100], B8S)),
    ("fp8_gemm", "shape", "bias", lambda: ops.fp8_gemm(A8, A8S, B8, B8S, bias=r(15))),
    # a bf16 tensor holding values beyond 448 where float8 is expected: quantize it first
    ("fp8_gemm", "dtype", "a", lambda: ops.fp8_gemm(r(4, 200).bfloat16() * 1000, A8S, B8, B8S)),
    ("fp8_gemm", "dtype", "b", lambda: ops.fp8_gemm(A8, A8S, r(16, 200).bfloat16() * 1000, B8S)),
    ("fp8_gemm", "dtype", "a_scale", lambda: ops.fp8_gemm(A8, A8S.bfloat16(), B8, B8S)),
    ("fp8_gemm", "dtype", "bias", lambda: ops.fp8_gemm(A8, A8S, B8, B8S, bias=torch.zeros(16, dtype=I32))),
    ("fp8_gemm", "device", "b", lambda: ops.fp8_gemm(A8, A8S, B8.to("meta"), B8S)),
    ("fp8_gemm", "device", "a_scale", lambda: ops.fp8_gemm(A8, A8S.to("meta"), B8, B8S)),
    ("fp8_gemm", "device", "bias", lambda: ops.fp8_gemm(A8, A8S, B8, B8S, bias=_meta(16))),
    ("fp8_gemm", "value", "b_scale", lambda: ops.fp8_gemm(A8, A8S, B8, None)),                        # missing scales
    ("fp8_gemm", "value", "a_scale", lambda: ops.fp8_gemm(A8, A8S * NAN, B8, B8S)),
    ("fp8_gemm", "value", "b_scale", lambda: ops.fp8_gemm(A8, A8S, B8, -B8S)),
    ("fp8_gemm", "value", "b_scale", lambda: ops.fp8_gemm(A8, A8S, B8, B8S * INF)),
    ("fp8_gemm", "value", "a_scale", lambda: ops.fp8_gemm(A8, A8S * 0, B8, B8S)),
    ("fp8_gemm", "value", "out_dtype", lambda: ops.fp8_gemm(A8, A8S, B8, B8S, out_dtype=torch.int32)),
    ("fp8_gemm", "value", "out_dtype", lambda: ops.fp8_gemm(A8, A8S, B8, B8S, out_dtype=F8)),
    # ---- fp8_linear
    ("fp8_linear", "rank", "x", lambda: ops.fp8_linear(torch.tensor(1.0), B8, B8S)),
    ("fp8_linear", "rank", "w_q", lambda: ops.fp8_linear(r(4, 200), B8[0], B8S)),
    ("fp8_linear", "shape", "x", lambda: ops.fp8_linear(r(4, 199), B8, B8S)),
    ("fp8_linear", "shape", "w_scale", lambda: ops.fp8_linear(r(4, 200), B8, B8S[:, :1])),
    ("fp8_linear", "shape", "bias", lambda: ops.fp8_linear(r(4, 200), B8, B8S, bias=r(17))),
    ("fp8_linear", "dtype", "w_q", lambda: ops.fp8_linear(r(4, 200), B8.float(), B8S)),
    ("fp8_linear", "dtype", "w_q", lambda: ops.fp8_linear(r(4, 200), r(16, 200).bfloat16() * 1000, B8S)),   # > 448, bf16
    ("fp8_linear", "dtype", "x", lambda: ops.fp8_linear(r(4, 200).to(F8), B8, B8S)),
    ("fp8_linear", "device", "w_q", lambda: ops.fp8_linear(r(4, 200), B8.to("meta"), B8S)),
    ("fp8_linear", "device", "w_scale", lambda: ops.fp8_linear(r(4, 200), B8, B8S.to("meta"))),
    ("fp8_linear", "value", "w_scale", lambda: ops.fp8_linear(r(4, 200), B8, None)),                   # missing scales
    ("fp8_linear", "value", "w_scale", lambda: ops.fp8_linear(r(4, 200), B8, B8S * INF)),
    ("fp8_linear", "value", "w_scale", lambda: ops.fp8_linear(r(4, 200), B8, B8S * 0)),
    # ---- gated_delta_rule (q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv])
    ("gated_delta_rule", "rank", "q", lambda: ops.gated_delta_rule(r(2, 5, 8), *GDR[1:], scale=0.5)),
    ("gated_delta_rule", "rank", "beta", lambda: ops.gated_delta_rule(*GDR[:4], GDR[4][..., None], scale=0.5)),
    ("gated_delta_rule", "shape", "k", lambda: ops.gated_delta_rule(GDR[0], r(2, 5, 1, 7), *GDR[2:], scale=0.5)),
    ("gated_delta_rule", "shape", "v", lambda: ops.gated_delta_rule(*GDR[:2], r(2, 4, 2, 8), *GDR[3:], scale=0.5)),  # T
    ("gated_delta_rule", "shape", "initial_state", lambda: ops.gated_delta_rule(*GDR, scale=0.5,
                                                                                  initial_state=torch.zeros(2, 2, 8, 7))),
    ("gated_delta_rule", "dtype", "k", lambda: ops.gated_delta_rule(GDR[0], GDR[1].bfloat16(), *GDR[2:], scale=0.5)),
    ("gated_delta_rule", "dtype", "g", lambda: ops.gated_delta_rule(*GDR[:3], GDR[3].bfloat16(), GDR[4], scale=0.5)),
    ("gated_delta_rule", "device", "v", lambda: ops.gated_delta_rule(*GDR[:2], GDR[2].to("meta"), *GDR[3:], scale=0.5)),
    ("gated_delta_rule", "device", "seq_lens", lambda: ops.gated_delta_rule(*GDR, scale=0.5,
                                                                              seq_lens=_meta(2, dtype=torch.int64))),
    ("gated_delta_rule", "value", "g", lambda: ops.gated_delta_rule(*GDR[:3], GDR[3] + 1.0, GDR[4], scale=0.5)),  # g > 0
    ("gated_delta_rule", "value", "scale", lambda: ops.gated_delta_rule(*GDR, scale=NAN)),
    ("gated_delta_rule", "value", "seq_lens", lambda: ops.gated_delta_rule(*GDR, scale=0.5, seq_lens=torch.tensor([6, 1]))),
    ("gated_delta_rule", "value", "state_indices", lambda: ops.gated_delta_rule(*GDR, scale=0.5,
                                                                                  state_indices=torch.tensor([0, 1]))),
    # ---- causal_conv1d (x [B, T, D], weight [D, K])
    ("causal_conv1d", "rank", "x", lambda: ops.causal_conv1d(r(5, 8), r(8, 4))),
    ("causal_conv1d", "rank", "weight", lambda: ops.causal_conv1d(r(2, 5, 8), r(8, 1, 4))),
    ("causal_conv1d", "shape", "weight", lambda: ops.causal_conv1d(r(2, 5, 8), r(7, 4))),
    ("causal_conv1d", "shape", "conv_state", lambda: ops.causal_conv1d(r(2, 5, 8), r(8, 4), conv_state=r(2, 4, 8))),
    ("causal_conv1d", "dtype", "conv_state", lambda: ops.causal_conv1d(r(2, 5, 8), r(8, 4), conv_state=r(2, 3, 8).half())),
    ("causal_conv1d", "dtype", "x", lambda: ops.causal_conv1d(r(2, 5, 8).to(F8), r(8, 4))),
    ("causal_conv1d", "device", "weight", lambda: ops.causal_conv1d(r(2, 5, 8), _meta(8, 4))),
    ("causal_conv1d", "value", "activation", lambda: ops.causal_conv1d(r(2, 5, 8), r(8, 4), activation="gelu")),
    ("causal_conv1d", "value", "state_indices", lambda: ops.causal_conv1d(r(2, 5, 8), r(8, 4), conv_state=r(3, 3, 8),
                                                                           state_indices=torch.tensor([0, 3]))),
    ("causal_conv1d", "value", "seq_lens", lambda: ops.causal_conv1d(r(2, 5, 8), r(8, 4), seq_lens=torch.tensor([-1, 5]))),
    # ---- ep_dispatch (x [T, H], topk_ids [T, k]) and ep_combine (expert_out [R, H], recv_source [R, 3], weights [T, k])
    ("ep_dispatch", "rank", "x", lambda: ops.ep_dispatch(r(2, 8, 1), EP_IDS, num_experts=2)),
    ("ep_dispatch", "rank", "topk_ids", lambda: ops.ep_dispatch(r(2, 8), EP_IDS[:, 0], num_experts=2)),
    ("ep_dispatch", "shape", "topk_ids", lambda: ops.ep_dispatch(r(2, 8), torch.zeros(3, 1, dtype=I32), num_experts=2)),
    ("ep_dispatch", "shape", "x_scale", lambda: ops.ep_dispatch(r(2, 200).to(F8), EP_IDS, num_experts=2,
                                                                x_scale=torch.ones(2, 1))),
    ("ep_dispatch", "shape", "expert_map", lambda: ops.ep_dispatch(r(2, 8), EP_IDS, num_experts=2,
                                                                   expert_map=torch.zeros(3, dtype=I32))),
    ("ep_dispatch", "dtype", "x", lambda: ops.ep_dispatch(r(2, 8).double(), EP_IDS, num_experts=2)),
    ("ep_dispatch", "dtype", "topk_ids", lambda: ops.ep_dispatch(r(2, 8), EP_IDS.float(), num_experts=2)),
    ("ep_dispatch", "dtype", "x_scale", lambda: ops.ep_dispatch(r(2, 8).to(F8), EP_IDS, num_experts=2,
                                                                x_scale=torch.ones(2, 1).half())),
    ("ep_dispatch", "device", "topk_ids", lambda: ops.ep_dispatch(r(2, 8), _meta(2, 1, dtype=I32), num_experts=2)),
    ("ep_dispatch", "value", "topk_ids", lambda: ops.ep_dispatch(r(2, 8), EP_IDS + 2, num_experts=2)),
    ("ep_dispatch", "value", "num_experts", lambda: ops.ep_dispatch(r(2, 8), EP_IDS, num_experts=0)),
    ("ep_dispatch", "value", "group", lambda: ops.ep_dispatch(r(2, 8), EP_IDS, num_experts=2, group="no-such-group")),
    ("ep_dispatch", "value", "x_scale", lambda: ops.ep_dispatch(r(2, 8).to(F8), EP_IDS, num_experts=2)),   # missing
    ("ep_dispatch", "value", "x_scale", lambda: ops.ep_dispatch(r(2, 8), EP_IDS, num_experts=2,
                                                                x_scale=torch.ones(2, 1))),   # x is not e4m3
    ("ep_dispatch", "value", "expert_map", lambda: ops.ep_dispatch(r(2, 8), EP_IDS, num_experts=2,
                                                                   expert_map=torch.tensor([0, 1]))),   # no rank 1
    ("ep_combine", "rank", "expert_out", lambda: ops.ep_combine(r(3, 8, 1), EP_SRC, r(2, 2).abs())),
    ("ep_combine", "rank", "topk_weights", lambda: ops.ep_combine(r(3, 8), EP_SRC, r(4))),
    ("ep_combine", "shape", "recv_source", lambda: ops.ep_combine(r(3, 8), EP_SRC[:, :2], r(2, 2).abs())),
    ("ep_combine", "shape", "recv_source", lambda: ops.ep_combine(r(4, 8), EP_SRC, r(2, 2).abs())),   # R
    ("ep_combine", "dtype", "expert_out", lambda: ops.ep_combine(r(3, 8).to(F8), EP_SRC, r(2, 2).abs())),
    ("ep_combine", "dtype", "recv_source", lambda: ops.ep_combine(r(3, 8), EP_SRC.float(), r(2, 2).abs())),
    ("ep_combine", "dtype", "topk_weights", lambda: ops.ep_combine(r(3, 8), EP_SRC, r(2, 2).half())),
    ("ep_combine", "device", "recv_source", lambda: ops.ep_combine(r(3, 8), EP_SRC.to("meta"), r(2, 2).abs())),
    ("ep_combine", "value", "recv_source[:, 0]", lambda: ops.ep_combine(r(3, 8), EP_SRC + torch.tensor([1, 0, 0]),
                                                                        r(2, 2).abs())),   # rank 1 in a group of 1
    ("ep_combine", "value", "recv_source[:, 1:]", lambda: ops.ep_combine(r(3, 8), EP_SRC - torch.tensor([0, 1, 0]),
                                                                         r(2, 2).abs())),   # token -1
    ("ep_combine", "value", "recv_source", lambda: ops.ep_combine(r(3, 8), EP_SRC * torch.tensor([1, 3, 1]),
                                                                  r(2, 2).abs())),   # token 3 of T = 2: after the exchange
    ("ep_combine", "value", "group", lambda: ops.ep_combine(r(3, 8), EP_SRC, r(2, 2).abs(), group="no-such-group")),
]


@pytest.mark.parametrize("op,kind,arg,call", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_names_op_and_argument(op, kind, arg, call):
    with pytest.raises(hal.ContractError) as exc:
        call()
    err = exc.value
    assert isinstance(err, ValueError)
    assert err.op == op and err.arg == arg, str(err)
    assert str(err).startswith(f"{op}: {arg}: expected ") and ", got " in str(err)


def _kinds_that_apply(op: str) -> set:
    spec = hal.CONTRACT[op]
    kinds = {"rank", "dtype", "value"}
    if op not in ("fp8_quantize", "fp8_quantize_weight"):       # one tensor of any shape of its rank
        kinds.add("shape")
    if len(spec.tensor_args) >= 2:                              # two tensors can sit on two devices
        kinds.add("device")
    return kinds


@pytest.mark.parametrize("op", list(hal.CONTRACT))
def test_every_op_has_bad_input_cases_of_every_kind(op):
    have = {kind for o, kind, _, _ in CASES if o == op}
    assert _kinds_that_apply(op) <= have, f"{op}: no case for {_kinds_that_apply(op) - have}"


def test_validation_never_reaches_the_kernel(monkeypatch):
    # a failing validation raises before any arithmetic: the kernel is never called
    import hal.backends.cpu as cpu
    calls = []
    real = cpu.KERNELS["fp8_gemm"]
    monkeypatch.setitem(cpu.KERNELS, "fp8_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    rt = hal.runtime("cpu")
    with pytest.raises(hal.ContractError):
        rt.fp8_gemm(A8, A8S * NAN, B8, B8S)
    assert calls == []
    rt.fp8_gemm(A8, A8S, B8, B8S)                                # the same runtime with good inputs: called
    assert calls == [1]


def test_checked_mode_reports_duplicate_sparse_indices():
    args = (r(1, 1, 2, 8), r(1, 3, 1, 8), r(1, 3, 1, 8), torch.tensor([[[1, 1, -1]]], dtype=I32))
    ops.sparse_attention(*args, scale=1.0)                       # duplicates are the caller's bug: unchecked
    hal.set_checked(True)
    try:
        with pytest.raises(hal.ContractError, match="duplicate") as exc:
            ops.sparse_attention(*args, scale=1.0)
        assert exc.value.arg == "indices"
        ops.sparse_attention(args[0], args[1], args[2], torch.tensor([[[1, -1, -1]]], dtype=I32), scale=1.0)  # -1s repeat
    finally:
        hal.set_checked(False)


def test_data_checks_skip_device_tensors_unless_checked():
    # on an accelerator the value-range checks need a host sync: they run only in checked mode;
    # meta tensors hold no data, so never on them
    import types
    from hal.contract._spec import data_checks
    meta, gpu = torch.empty(3, device="meta"), types.SimpleNamespace(device=torch.device("cuda", 0))
    assert data_checks(torch.empty(3)) and not data_checks(meta) and not data_checks(gpu)
    hal.set_checked(True)
    try:
        assert data_checks(gpu) and not data_checks(meta)
    finally:
        hal.set_checked(False)


def test_validate_functions_raise_the_same_errors_directly():
    # hal.CONTRACT[op].validate is the check every backend's bound op runs: callable on its own
    spec = hal.CONTRACT["moe_route"]
    with pytest.raises(hal.ContractError, match="n_group"):
        spec.validate(r(4, 8), top_k=2, n_group=3)
    assert spec.validate(r(4, 8), top_k=2, n_group=4, topk_group=2) is None


@pytest.mark.parametrize("op,arg,call,bound", [
    ("fp8_quantize", "group_size", lambda: ops.fp8_quantize(r(4, 8), group_size=2 ** 40), "65536"),
    ("fp8_quantize_weight", "block", lambda: ops.fp8_quantize_weight(r(4, 8), block=2 ** 30), "65536"),
    ("moe_dispatch", "num_experts", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1], [1]]), 2 ** 40), "65536"),
    ("moe_dispatch", "align", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1], [1]]), 4, align=2 ** 40), "1024"),
    ("lightning_indexer", "top_k", lambda: ops.lightning_indexer(*LI, top_k=2 ** 31 - 1), "65536"),
    ("moe_route", "top_k", lambda: ops.moe_route(r(4, 8), top_k=2 ** 31 - 1), "8"),
])
def test_huge_ints_state_their_upper_bound(op, arg, call, bound):
    with pytest.raises(hal.ContractError) as exc:
        call()
    assert (exc.value.op, exc.value.arg) == (op, arg)
    assert f"<= {bound}" in exc.value.expected, str(exc.value)


def test_bounds_leave_room_for_real_models():
    # the largest values the supported models use pass: 256 experts, align 128, top-2048 of 128K keys
    plan = ops.moe_dispatch(r(4, 8), torch.randint(0, 256, (4, 8)), 256, align=128)
    assert plan.offsets[-1] == 128 * int((plan.tokens_per_expert > 0).sum())
    q, k, w = r(1, 1, 1, 8), r(1, 4, 8), torch.rand(1, 1, 1)
    assert ops.lightning_indexer(q, k, w, top_k=2048).shape == (1, 1, 2048)
    assert ops.fp8_quantize(r(2, 300), group_size=256)[1].shape == (2, 2)


def test_sparse_attention_with_no_keys_returns_zeros_and_minus_inf():
    # L = 0 is legal: every slot is -1, so out = 0 and lse = -inf for every query and head
    q = r(2, 3, 4, 8)
    idx = torch.full((2, 3, 5), -1, dtype=I32)
    for dtype in (torch.float32, torch.bfloat16):
        out, lse = ops.sparse_attention(q.to(dtype), r(2, 0, 2, 8).to(dtype), r(2, 0, 2, 6).to(dtype), idx, scale=0.5,
                                        return_lse=True)
        assert out.shape == (2, 3, 4, 6) and out.dtype == dtype and bool((out == 0).all())
        assert lse.shape == (2, 3, 4) and lse.dtype == torch.float32 and bool((lse == float("-inf")).all())
    with pytest.raises(hal.ContractError) as exc:                     # no key to point at: only -1 is legal
        ops.sparse_attention(q, r(2, 0, 2, 8), r(2, 0, 2, 6), torch.zeros(2, 3, 5, dtype=I32), scale=0.5)
    assert exc.value.arg == "indices"


def test_a_consistent_hand_built_plan_is_accepted():
    plan = _aligned_plan()
    rebuilt = hal.DispatchPlan(plan.hidden.clone(), torch.tensor([1, 2, 2, 0], dtype=I32),
                               torch.tensor([0, 2, 4, 6, 6], dtype=I32), _src(0, -1, 1, 2, 3, 4), 3, 2, 2)
    w = torch.rand(3, 2)
    assert torch.equal(ops.moe_combine(plan.hidden, rebuilt, w), ops.moe_combine(plan.hidden, plan, w))


def test_meta_tensors_get_shapes_or_a_contract_error():
    # no backend serves "meta": the ops run the reference, which gives meta outputs of the contract's
    # shapes where they do not depend on data, and a ContractError for moe_dispatch, whose N does
    import warnings
    plan = _aligned_plan().to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(hal.ContractError) as exc:
            ops.moe_dispatch(_meta(3, 8), _meta(3, 2, dtype=torch.int64), 4)
        assert (exc.value.op, exc.value.arg) == ("moe_dispatch", "hidden") and "meta" in str(exc.value)
        out = ops.moe_experts(plan, _meta(4, 6, 8), _meta(4, 8, 3))
        assert out.device.type == "meta" and out.shape == (6, 8)
        out = ops.moe_combine(_meta(6, 8), plan, _meta(3, 2))
        assert out.device.type == "meta" and out.shape == (3, 8)
        idx = ops.lightning_indexer(*(t.to("meta") for t in LI), top_k=3)
        assert idx.device.type == "meta" and idx.shape == (1, 2, 3) and idx.dtype == I32
