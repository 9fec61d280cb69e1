"""HAL: a hardware-portable backend abstraction layer for MoE LLM inference.

Public API (nothing else is public):

- :func:`runtime` -> :class:`Runtime`: every contract op bound once to a backend's kernels.
- :mod:`hal.ops`: contract ops that dispatch on their tensors' device type.
- ``torch.ops.hal.<op>``: the same ops as torch.library custom ops (torch.compile-able).
- :data:`CONTRACT` (op name -> :class:`OpSpec`), :data:`CONTRACT_VERSION`, :class:`DispatchPlan`.
- :func:`list_backends` -> the discovered backends with their status; :class:`Backend`,
  :class:`Availability`, :class:`OpCapability`, :data:`hookimpl` for writing plugins.
- Errors: :class:`ContractError`, :class:`BackendUnavailable`, :class:`UnsupportedCase`,
  :class:`KernelOutputError`.

``import hal`` loads no backend plugin: discovery happens on first use. It imports torch and
registers ``torch.ops.hal`` at once, except under the ``hal`` command line, which loads them on
first use so that ``hal --version`` and ``hal --help`` answer without importing torch.
"""
from __future__ import annotations

import os as _os
import sys as _sys

# `import torch` auto-imports installed device extensions (torch_npu) and, when their vendor runtime
# (CANN) is missing, raises and takes torch down with it. HAL imports vendor extensions itself,
# lazily, in each backend's probe (which then reports the precise reason), so it turns torch's
# auto-import off unless the user set the variable. Effective when hal is imported before torch.
_os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from hal._version import CONTRACT_VERSION, __version__  # noqa: E402

# In a source checkout, hal.models, hal.conformance and hal.backends.cpu live in the folders beside
# hal/ (models/, conformance/, backends/cpu/; setup.py maps them the same way when installing).
# Python run in the checkout's root imports this source folder rather than the installed package,
# so the root joins the package path: the same modules resolve there as after an install.
_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if all(_os.path.exists(_os.path.join(_ROOT, *p)) for p in (("setup.py",), ("models", "__init__.py"),
                                                            ("conformance", "__init__.py"),
                                                            ("backends", "cpu", "__init__.py"))):
    __path__.append(_ROOT)  # noqa: F821 - the package's own __path__

_LAZY = {
    "Availability": "hal.backend", "Backend": "hal.backend", "OpCapability": "hal.backend",
    "CONTRACT": "hal.contract", "OP_NAMES": "hal.contract", "DispatchPlan": "hal.contract",
    "ExactBudget": "hal.contract", "FloatBudget": "hal.contract", "OpSpec": "hal.contract",
    "SelectionBudget": "hal.contract", "checked_mode": "hal.contract", "set_checked": "hal.contract",
    "BackendUnavailable": "hal.errors", "ContractError": "hal.errors", "UnsupportedCase": "hal.errors",
    "KernelOutputError": "hal.errors", "hookimpl": "hal.hookspecs",
    "PlanEntry": "hal.binding", "Runtime": "hal.binding", "runtime": "hal.binding",
}


def _load_all() -> None:
    """Import the public API (torch included) and register ``torch.ops.hal``."""
    import importlib
    for name, module in _LAZY.items():
        globals()[name] = getattr(importlib.import_module(module), name)
    importlib.import_module("hal.ops")
    importlib.import_module("hal.torch_ops")


def __getattr__(name: str):
    if name in _LAZY or name in ("ops", "torch_ops"):
        _load_all()
        return globals()[name] if name in globals() else _sys.modules[f"hal.{name}"]
    raise AttributeError(f"module 'hal' has no attribute {name!r}")


def list_backends():
    """Every discovered backend plugin as a :class:`hal.registry.BackendRecord` (probed)."""
    from hal.registry import get_registry
    return get_registry().records()


def _started_by_the_cli() -> bool:
    main = _sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return _os.path.basename(getattr(main, "__file__", "") or "") == "hal" or \
        getattr(spec, "name", "") == "hal.cli"


if not _started_by_the_cli():
    _load_all()

__all__ = [
    "__version__", "runtime", "Runtime", "PlanEntry", "ops", "list_backends",
    "CONTRACT", "CONTRACT_VERSION", "OP_NAMES", "OpSpec", "DispatchPlan",
    "FloatBudget", "SelectionBudget", "ExactBudget", "checked_mode", "set_checked",
    "Backend", "Availability", "OpCapability", "hookimpl",
    "ContractError", "BackendUnavailable", "UnsupportedCase", "KernelOutputError",
]
