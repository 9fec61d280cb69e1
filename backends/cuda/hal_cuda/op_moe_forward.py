"""``moe_forward``: fused route kernel -> dispatch without a host sync -> grouped GEMMs -> combine.

Routing never emits -1 and the fused path does not pad (align 1), so the plan holds exactly
T * k rows: its size is known without reading the ids on the host.
"""
import torch

from hal_cuda.op_moe_combine import moe_combine
from hal_cuda.op_moe_dispatch import dispatch_order
from hal_cuda.op_moe_experts import moe_experts
from hal_cuda.op_moe_route import moe_route


def moe_forward(hidden, router_logits, w_gate_up, w_down, *, top_k, scoring, correction_bias, n_group, topk_group,
                renormalize, scaling_factor, activation, w_gate_up_scale, w_down_scale):
    from hal.contract.moe import DispatchPlan
    T = hidden.shape[0]
    E = w_gate_up.shape[0]
    weights, ids = moe_route(router_logits, top_k=top_k, scoring=scoring, correction_bias=correction_bias,
                             n_group=n_group, topk_group=topk_group, renormalize=renormalize,
                             scaling_factor=scaling_factor)
    order, counts, offsets, rows = dispatch_order(ids, E, 1)
    N = T * top_k
    source = torch.empty(N, dtype=torch.int64, device=hidden.device)
    source[rows] = order
    plan = DispatchPlan(hidden[source // top_k], counts.to(torch.int32), offsets.to(torch.int32), source, T, top_k, 1)
    out = moe_experts(plan, w_gate_up, w_down, activation=activation, w_gate_up_scale=w_gate_up_scale,
                      w_down_scale=w_down_scale)
    return moe_combine(out, plan, weights)
