"""The expert-parallel form of ``moe_forward``: ``moe_route`` -> ``ep_dispatch`` -> ``moe_experts``
on this rank's experts -> ``ep_combine``, every step a contract op of one runtime, so any backend
runs it and falls back per op like everywhere else.

Each rank of the group calls :func:`ep_moe_forward` with its own tokens and holds only its own
experts' weights (E / W of them, in increasing global id: with the default contiguous map, rank r
holds experts ``r * E/W .. (r+1) * E/W - 1``). Its result equals the single-process
``moe_forward`` of the same tokens with all E experts, within the contract's budget.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from hal.blockscale import dequantize
from hal.contract import DispatchPlan


def received_rows_plan(rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> DispatchPlan:
    """A DispatchPlan over the rows ``ep_dispatch`` delivered (grouped by local expert, counts
    ``tokens_per_expert``), each row its own one-slot token, so ``moe_experts`` runs them as they are."""
    R = rows.shape[0]
    offsets = torch.zeros(tokens_per_expert.shape[0] + 1, dtype=torch.int32, device=rows.device)
    offsets[1:] = tokens_per_expert.cumsum(0)
    return DispatchPlan(rows, tokens_per_expert, offsets, torch.arange(R, dtype=torch.int64, device=rows.device), R, 1)


def ep_moe_forward(rt: Any, hidden: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
                   w_down: torch.Tensor, *, num_experts: int, group: str, top_k: int, scoring: str = "sigmoid",
                   correction_bias: Optional[torch.Tensor] = None, n_group: int = 1, topk_group: int = 1,
                   renormalize: bool = True, scaling_factor: float = 1.0,
                   w_gate_up_scale: Optional[torch.Tensor] = None, w_down_scale: Optional[torch.Tensor] = None,
                   expert_map: Optional[torch.Tensor] = None, fp8_dispatch: bool = False) -> torch.Tensor:
    """The routed-expert half of a MoE layer over the EP group ``group`` (see the module doc).

    hidden [T, H] and router_logits [T, E] are this rank's tokens (T may differ between ranks and
    be 0); w_gate_up [E/W, 2I, H] and w_down [E/W, H, I] (+ their 128x128 block scales when FP8)
    are this rank's experts; routing arguments as ``moe_route``'s. ``fp8_dispatch`` sends e4m3
    rows with 1x128 scales (``fp8_quantize``) instead of ``hidden``'s dtype, a quarter or half of
    the bytes; the rows are dequantized on arrival. Returns [T, H] in hidden's dtype.
    """
    weights, ids = rt.moe_route(router_logits, top_k=top_k, scoring=scoring, correction_bias=correction_bias,
                                n_group=n_group, topk_group=topk_group, renormalize=renormalize,
                                scaling_factor=scaling_factor)
    payload, scale = (rt.fp8_quantize(hidden) if fp8_dispatch else (hidden, None))
    rows, row_scale, counts, source = rt.ep_dispatch(payload, ids, num_experts=num_experts, group=group,
                                                     x_scale=scale, expert_map=expert_map)
    if fp8_dispatch:
        rows = dequantize(rows, row_scale, 1, 128).to(hidden.dtype)
    out = rt.moe_experts(received_rows_plan(rows, counts), w_gate_up, w_down, w_gate_up_scale=w_gate_up_scale,
                         w_down_scale=w_down_scale)
    return rt.ep_combine(out, source, weights, group=group)


__all__ = ["ep_moe_forward", "received_rows_plan"]
