"""HAL: a hardware-portable backend abstraction layer for MoE LLM inference.

Public API (nothing else is public):

- :func:`runtime` -> :class:`Runtime`: every contract op bound once to a backend's kernels.
- :mod:`hal.ops`: contract ops that dispatch on their tensors' device type.
- ``torch.ops.hal.<op>``: the same ops as torch.library custom ops (torch.compile-able).
- :data:`CONTRACT` (op name -> :class:`OpSpec`), :data:`CONTRACT_VERSION`, :class:`DispatchPlan`.
- :func:`list_backends` -> the discovered backends with their status; :class:`Backend`,
  :class:`Availability`, :class:`OpCapability`, :data:`hookimpl` for writing plugins.
- Errors: :class:`ContractError`, :class:`BackendUnavailable`, :class:`UnsupportedCase`.

``import hal`` loads no backend plugin: discovery happens on first use.
"""
from __future__ import annotations

import os as _os

# `import torch` auto-imports installed device extensions (torch_npu) and, when their vendor runtime
# (CANN) is missing, raises and takes torch down with it. HAL imports vendor extensions itself,
# lazily, in each backend's probe (which then reports the precise reason), so it turns torch's
# auto-import off unless the user set the variable. Effective when hal is imported before torch.
_os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

__version__ = "0.1.0"

from hal.backend import Availability, Backend, OpCapability
from hal.contract import (CONTRACT, CONTRACT_VERSION, OP_NAMES, DispatchPlan, ExactBudget, FloatBudget, OpSpec,
                          SelectionBudget, checked_mode, set_checked)
from hal.errors import BackendUnavailable, ContractError, UnsupportedCase
from hal.hookspecs import hookimpl
from hal.runtime import PlanEntry, Runtime, runtime
from hal import ops  # noqa: E402  (module-level dispatching ops)
from hal import torch_ops as _torch_ops  # noqa: E402,F401  registers torch.ops.hal.*


def list_backends():
    """Every discovered backend plugin as a :class:`hal.registry.BackendRecord` (probed)."""
    from hal.registry import get_registry
    return get_registry().records()


__all__ = [
    "__version__", "runtime", "Runtime", "PlanEntry", "ops", "list_backends",
    "CONTRACT", "CONTRACT_VERSION", "OP_NAMES", "OpSpec", "DispatchPlan",
    "FloatBudget", "SelectionBudget", "ExactBudget", "checked_mode", "set_checked",
    "Backend", "Availability", "OpCapability", "hookimpl",
    "ContractError", "BackendUnavailable", "UnsupportedCase",
]
