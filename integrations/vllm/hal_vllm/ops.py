"""``torch.ops.hal_vllm.*``: the HAL calls the replaced vLLM layers make, as opaque torch custom ops.

vLLM compiles its models with torch.compile (Dynamo traces the MoE layer's Python on the CPU). HAL's
bound ops are generated Python with caches and timers, so the layers reach them through these
custom ops, which Dynamo records as single calls (shapes from the fake implementations) and which
run the process's HAL runtime (:func:`hal_vllm.runtime.get`) eagerly.
"""
from __future__ import annotations

from typing import Optional

import torch

from hal_vllm import runtime


@torch.library.custom_op("hal_vllm::moe_forward", mutates_args=())
def moe_forward(hidden: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, correction_bias: Optional[torch.Tensor], top_k: int, scoring: str,
                n_group: int, topk_group: int, renormalize: bool, scaling_factor: float) -> torch.Tensor:
    """HAL ``moe_forward``: hidden [T, H], router_logits [T, E], w_gate_up [E, 2I, H] ([gate; up]
    rows, vLLM's w13), w_down [E, H, I] (vLLM's w2) -> [T, H] in hidden's dtype (routing included)."""
    out = runtime.get().moe_forward(hidden, router_logits, w_gate_up, w_down, top_k=top_k, scoring=scoring,
                                    correction_bias=correction_bias, n_group=n_group, topk_group=topk_group,
                                    renormalize=renormalize, scaling_factor=scaling_factor)
    runtime.after_call()
    return out


@moe_forward.register_fake
def _(hidden, router_logits, w_gate_up, w_down, correction_bias, top_k, scoring, n_group, topk_group,
      renormalize, scaling_factor):
    return torch.empty_like(hidden)


@torch.library.custom_op("hal_vllm::moe_experts_topk", mutates_args=())
def moe_experts_topk(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The routed experts for a routing vLLM already chose: HAL ``moe_dispatch`` ->
    ``moe_experts`` -> ``moe_combine``. hidden [T, H], topk_weights [T, k] (any float dtype, used
    in fp32), topk_ids [T, k] int -> [T, H] in hidden's dtype."""
    rt = runtime.get()
    plan = rt.moe_dispatch(hidden, topk_ids, w_gate_up.shape[0])
    expert_out = rt.moe_experts(plan, w_gate_up, w_down)
    out = rt.moe_combine(expert_out, plan, topk_weights.float())
    runtime.after_call()
    return out


@moe_experts_topk.register_fake
def _(hidden, topk_weights, topk_ids, w_gate_up, w_down):
    return torch.empty_like(hidden)


@torch.library.custom_op("hal_vllm::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """HAL ``fp8_linear``: x [..., K], w_q [N, K] float8_e4m3fn, w_scale [ceil(N/128), ceil(K/128)]
    fp32 (vLLM's ``weight_scale_inv``), bias [N] or None -> [..., N] in x's dtype."""
    out = runtime.get().fp8_linear(x, w_q, w_scale, bias=bias)
    runtime.after_call()
    return out


@fp8_linear.register_fake
def _(x, w_q, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))
