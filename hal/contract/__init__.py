"""The HAL operator contract (SPEC.md) as data: one :class:`OpSpec` per op.

``CONTRACT`` maps op name -> spec, in SPEC.md order. Each spec carries the op's signature, its
docstring (shapes, dtypes, semantics), its validation (raising :class:`hal.ContractError`) and its
tolerance policy (``spec.outputs``: output name -> budget), which the conformance suite reads.
"""
from __future__ import annotations

from hal.contract._spec import (CONTRACT_VERSION, ExactBudget, FloatBudget, OpSpec, SelectionBudget,
                                checked_mode, set_checked)
from hal.contract.dsa import lightning_indexer, sparse_attention
from hal.contract.fp8 import fp8_gemm, fp8_linear, fp8_quantize, fp8_quantize_weight
from hal.contract.moe import DispatchPlan, moe_combine, moe_dispatch, moe_experts, moe_forward, moe_route

CONTRACT: dict[str, OpSpec] = {s.name: s for s in (
    moe_route, moe_dispatch, moe_experts, moe_combine, moe_forward,
    lightning_indexer, sparse_attention,
    fp8_quantize, fp8_quantize_weight, fp8_gemm, fp8_linear,
)}
OP_NAMES: tuple[str, ...] = tuple(CONTRACT)

__all__ = ["CONTRACT", "OP_NAMES", "CONTRACT_VERSION", "OpSpec", "FloatBudget", "SelectionBudget",
           "ExactBudget", "DispatchPlan", "checked_mode", "set_checked"]
