"""The HAL operator contract as data: one :class:`OpSpec` per op (``docs/contract.md`` is its text,
generated from these specs by ``python -m hal.contract.doc``).

``CONTRACT`` maps op name -> spec, in family order. Each spec carries the op whole: signature and
defaults, docstring (shapes, dtypes, semantics), validation (raising :class:`hal.ContractError`),
output shapes/dtypes (``meta``), tolerance policy (``outputs``: output name -> budget) and sample
arguments; ``hal.ops``, the runtimes' bound ops, ``torch.ops.hal``, the overhead benchmark and the
conformance judge are generated from it. :func:`add_op` adds an op at run time.
"""
from __future__ import annotations

from typing import Callable

from hal.contract._spec import (CONTRACT_VERSION, Args, ExactBudget, FloatBudget, OpSpec, SelectionBudget, TensorMeta,
                                checked_mode, op_spec, set_checked)
from hal.contract.dsa import lightning_indexer, sparse_attention
from hal.contract.expert_parallel import ep_combine, ep_dispatch
from hal.contract.fp8 import fp8_gemm, fp8_linear, fp8_quantize, fp8_quantize_weight
from hal.contract.linear_attention import causal_conv1d, gated_delta_rule
from hal.contract.moe import DispatchPlan, moe_combine, moe_dispatch, moe_experts, moe_forward, moe_route

CONTRACT: dict[str, OpSpec] = {s.name: s for s in (
    moe_route, moe_dispatch, moe_experts, moe_combine, moe_forward,
    lightning_indexer, sparse_attention,
    fp8_quantize, fp8_quantize_weight, fp8_gemm, fp8_linear,
    gated_delta_rule, causal_conv1d,
    ep_dispatch, ep_combine,
)}
OP_NAMES: tuple[str, ...] = tuple(CONTRACT)

_ADD_LISTENERS: list[Callable[[OpSpec], None]] = []


def on_add_op(listener: Callable[[OpSpec], None]) -> None:
    """Call ``listener(spec)`` for every op :func:`add_op` adds (``hal.ops`` and ``torch.ops.hal``
    use it to generate their entries)."""
    _ADD_LISTENERS.append(listener)


def add_op(spec: OpSpec) -> None:
    """Add ``spec`` to the live contract: ``hal.ops.<name>``, ``torch.ops.hal.<name>`` (with its
    fake) and every runtime built afterwards get it. For ops defined outside HAL's own families
    (an extension package, a test); its reference kernel goes to
    :func:`hal.backends.cpu.register_kernel` and its cases to
    :func:`hal.conformance.cases.register_cases`."""
    if spec.name in CONTRACT:
        raise ValueError(f"hal.contract.add_op: an op named {spec.name!r} already exists")
    CONTRACT[spec.name] = spec
    for listener in _ADD_LISTENERS:
        listener(spec)

__all__ = ["CONTRACT", "OP_NAMES", "CONTRACT_VERSION", "OpSpec", "TensorMeta", "Args", "FloatBudget", "SelectionBudget",
           "ExactBudget", "DispatchPlan", "checked_mode", "set_checked", "op_spec", "add_op", "on_add_op"]
