"""The CPU reference backend: the executable definition of the HAL contract.

One ``op_<name>.py`` per contract op, each a few lines of torch that read like the contract's
docs, computing in fp32 (or fp64 inside :func:`float64_evaluation`), deterministic, ties toward
the lower index. ``KERNELS`` is found by that naming rule for every op of ``hal.CONTRACT``; an op
added at run time (:func:`hal.contract.add_op`) brings its kernel with :func:`register_kernel`.
Kernels assume arguments already validated by the contract (call them through a runtime or
``hal.ops``, which validate). Registered through the ``hal.backends`` entry point
(``cpu = hal.backends.cpu.plugin``), exactly like any third-party backend.
"""
from __future__ import annotations

import importlib
from typing import Callable

from hal.contract import CONTRACT

from ._precision import float64_evaluation

KERNELS: dict[str, Callable] = {}


def register_kernel(op: str, kernel: Callable) -> None:
    """Make ``kernel`` the reference of ``op`` (an op added with :func:`hal.contract.add_op`)."""
    if op not in CONTRACT:
        raise KeyError(f"hal.backends.cpu.register_kernel: {op!r} is not a contract op (add its spec first)")
    KERNELS[op] = kernel


for _op in CONTRACT:
    KERNELS[_op] = getattr(importlib.import_module(f"{__name__}.op_{_op}"), _op)
globals().update(KERNELS)

__all__ = ["KERNELS", "float64_evaluation", "register_kernel", *KERNELS]
