"""Reference ``moe_forward``: the composition route -> dispatch -> experts -> combine."""
import torch

from .op_moe_combine import moe_combine
from .op_moe_dispatch import moe_dispatch
from .op_moe_experts import moe_experts
from .op_moe_route import moe_route


def moe_forward(hidden, router_logits, w_gate_up, w_down, *, top_k, scoring="sigmoid", correction_bias=None,
                n_group=1, topk_group=1, renormalize=True, scaling_factor=1.0, activation="silu",
                w_gate_up_scale=None, w_down_scale=None):
    if hidden.device.type == "meta":           # shapes only: no routing data to dispatch on
        return torch.empty(hidden.shape, dtype=hidden.dtype, device="meta")
    weights, ids = moe_route(router_logits, top_k=top_k, scoring=scoring, correction_bias=correction_bias,
                             n_group=n_group, topk_group=topk_group, renormalize=renormalize,
                             scaling_factor=scaling_factor)
    plan = moe_dispatch(hidden, ids, w_gate_up.shape[0])
    out = moe_experts(plan, w_gate_up, w_down, activation=activation, w_gate_up_scale=w_gate_up_scale,
                      w_down_scale=w_down_scale)
    return moe_combine(out, plan, weights)
