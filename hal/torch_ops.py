"""Every contract op as a torch.library custom op: ``torch.ops.hal.<op>``.

The real implementation calls :mod:`hal.ops` (so it dispatches on the tensors' device); the fake
(meta) implementation gives output shapes and dtypes, so ``torch.compile(fullgraph=True)`` traces
through HAL ops. Differences from the Python API, forced by torch's schema language:

- ``moe_dispatch`` returns the plan's tensors ``(hidden, tokens_per_expert, offsets, source)``;
  ``moe_experts`` / ``moe_combine`` take them back as ``plan_hidden, tokens_per_expert, offsets,
  source, num_tokens, top_k`` (the plan's row count N is data-dependent: an unbacked size).
- ``sparse_attention`` always returns ``(out, lse)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hal.contract.moe import DispatchPlan

_LIB = "hal"


def _ops():
    from hal import ops
    return ops


def _plan(hidden, tokens_per_expert, offsets, source, num_tokens, top_k) -> DispatchPlan:
    return DispatchPlan(hidden, tokens_per_expert, offsets, source, num_tokens, top_k)


def _cdiv(a, b):
    return -(-a // b)


@torch.library.custom_op(f"{_LIB}::moe_route", mutates_args=())
def moe_route(router_logits: Tensor, top_k: int, scoring: str = "sigmoid", correction_bias: Optional[Tensor] = None,
              n_group: int = 1, topk_group: int = 1, renormalize: bool = True,
              scaling_factor: float = 1.0) -> tuple[Tensor, Tensor]:
    return _ops().moe_route(router_logits, top_k=top_k, scoring=scoring, correction_bias=correction_bias,
                            n_group=n_group, topk_group=topk_group, renormalize=renormalize,
                            scaling_factor=scaling_factor)


@moe_route.register_fake
def _(router_logits, top_k, scoring="sigmoid", correction_bias=None, n_group=1, topk_group=1, renormalize=True,
      scaling_factor=1.0):
    T = router_logits.shape[0]
    return (router_logits.new_empty((T, top_k), dtype=torch.float32),
            router_logits.new_empty((T, top_k), dtype=torch.int32))


@torch.library.custom_op(f"{_LIB}::moe_dispatch", mutates_args=())
def moe_dispatch(hidden: Tensor, expert_ids: Tensor, num_experts: int, align: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    plan = _ops().moe_dispatch(hidden, expert_ids, num_experts, align=align)
    return plan.tensors()


@moe_dispatch.register_fake
def _(hidden, expert_ids, num_experts, align=1):
    N = torch.library.get_ctx().new_dynamic_size()
    return (hidden.new_empty((N, hidden.shape[1])), hidden.new_empty((num_experts,), dtype=torch.int32),
            hidden.new_empty((num_experts + 1,), dtype=torch.int32), hidden.new_empty((N,), dtype=torch.int64))


@torch.library.custom_op(f"{_LIB}::moe_experts", mutates_args=())
def moe_experts(plan_hidden: Tensor, tokens_per_expert: Tensor, offsets: Tensor, source: Tensor, num_tokens: int,
                top_k: int, w_gate_up: Tensor, w_down: Tensor, activation: str = "silu",
                w_gate_up_scale: Optional[Tensor] = None, w_down_scale: Optional[Tensor] = None) -> Tensor:
    plan = _plan(plan_hidden, tokens_per_expert, offsets, source, num_tokens, top_k)
    return _ops().moe_experts(plan, w_gate_up, w_down, activation=activation, w_gate_up_scale=w_gate_up_scale,
                              w_down_scale=w_down_scale)


@moe_experts.register_fake
def _(plan_hidden, tokens_per_expert, offsets, source, num_tokens, top_k, w_gate_up, w_down, activation="silu",
      w_gate_up_scale=None, w_down_scale=None):
    return torch.empty_like(plan_hidden)


@torch.library.custom_op(f"{_LIB}::moe_combine", mutates_args=())
def moe_combine(expert_out: Tensor, plan_hidden: Tensor, tokens_per_expert: Tensor, offsets: Tensor, source: Tensor,
                num_tokens: int, top_k: int, weights: Tensor) -> Tensor:
    plan = _plan(plan_hidden, tokens_per_expert, offsets, source, num_tokens, top_k)
    return _ops().moe_combine(expert_out, plan, weights)


@moe_combine.register_fake
def _(expert_out, plan_hidden, tokens_per_expert, offsets, source, num_tokens, top_k, weights):
    return expert_out.new_empty((num_tokens, expert_out.shape[1]))


@torch.library.custom_op(f"{_LIB}::moe_forward", mutates_args=())
def moe_forward(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor, top_k: int,
                scoring: str = "sigmoid", correction_bias: Optional[Tensor] = None, n_group: int = 1,
                topk_group: int = 1, renormalize: bool = True, scaling_factor: float = 1.0, activation: str = "silu",
                w_gate_up_scale: Optional[Tensor] = None, w_down_scale: Optional[Tensor] = None) -> Tensor:
    return _ops().moe_forward(hidden, router_logits, w_gate_up, w_down, top_k=top_k, scoring=scoring,
                              correction_bias=correction_bias, n_group=n_group, topk_group=topk_group,
                              renormalize=renormalize, scaling_factor=scaling_factor, activation=activation,
                              w_gate_up_scale=w_gate_up_scale, w_down_scale=w_down_scale)


@moe_forward.register_fake
def _(hidden, router_logits, w_gate_up, w_down, top_k, scoring="sigmoid", correction_bias=None, n_group=1,
      topk_group=1, renormalize=True, scaling_factor=1.0, activation="silu", w_gate_up_scale=None, w_down_scale=None):
    return torch.empty_like(hidden)


@torch.library.custom_op(f"{_LIB}::lightning_indexer", mutates_args=())
def lightning_indexer(q: Tensor, k: Tensor, weights: Tensor, top_k: int, causal: bool = True,
                      q_offset: Optional[Tensor] = None, k_lengths: Optional[Tensor] = None,
                      q_scale: Optional[Tensor] = None, k_scale: Optional[Tensor] = None) -> Tensor:
    return _ops().lightning_indexer(q, k, weights, top_k=top_k, causal=causal, q_offset=q_offset,
                                    k_lengths=k_lengths, q_scale=q_scale, k_scale=k_scale)


@lightning_indexer.register_fake
def _(q, k, weights, top_k, causal=True, q_offset=None, k_lengths=None, q_scale=None, k_scale=None):
    return q.new_empty((q.shape[0], q.shape[1], top_k), dtype=torch.int32)


@torch.library.custom_op(f"{_LIB}::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _ops().sparse_attention(q, k, v, indices, scale=scale, return_lse=True)


@sparse_attention.register_fake
def _(q, k, v, indices, scale):
    B, S, Hq, _ = q.shape
    return q.new_empty((B, S, Hq, v.shape[3])), q.new_empty((B, S, Hq), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::fp8_quantize", mutates_args=())
def fp8_quantize(x: Tensor, group_size: int = 128, scale_format: str = "fp32") -> tuple[Tensor, Tensor]:
    return _ops().fp8_quantize(x, group_size=group_size, scale_format=scale_format)


@fp8_quantize.register_fake
def _(x, group_size=128, scale_format="fp32"):
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty((*x.shape[:-1], _cdiv(x.shape[-1], group_size)), dtype=torch.float32))


@torch.library.custom_op(f"{_LIB}::fp8_quantize_weight", mutates_args=())
def fp8_quantize_weight(w: Tensor, block: int = 128) -> tuple[Tensor, Tensor]:
    return _ops().fp8_quantize_weight(w, block=block)


@fp8_quantize_weight.register_fake
def _(w, block=128):
    N, K = w.shape
    return w.new_empty((N, K), dtype=torch.float8_e4m3fn), w.new_empty((_cdiv(N, block), _cdiv(K, block)),
                                                                     dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::fp8_gemm", mutates_args=())
def fp8_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype = torch.bfloat16,
             bias: Optional[Tensor] = None) -> Tensor:
    return _ops().fp8_gemm(a, a_scale, b, b_scale, out_dtype=out_dtype, bias=bias)


@fp8_gemm.register_fake
def _(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, bias=None):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@torch.library.custom_op(f"{_LIB}::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return _ops().fp8_linear(x, w_q, w_scale, bias=bias)


@fp8_linear.register_fake
def _(x, w_q, w_scale, bias=None):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


TORCH_OPS = {name: globals()[name] for name in (
    "moe_route", "moe_dispatch", "moe_experts", "moe_combine", "moe_forward", "lightning_indexer",
    "sparse_attention", "fp8_quantize", "fp8_quantize_weight", "fp8_gemm", "fp8_linear")}
