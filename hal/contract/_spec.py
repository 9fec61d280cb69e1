"""The machinery behind contract op specs: :class:`OpSpec`, tolerance policies, checked mode."""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Callable, Mapping, Optional

CONTRACT_VERSION = "1.0"


# --- tolerance policies (read by the conformance suite; SPEC.md "Conformance metrics") --------

@dataclasses.dataclass(frozen=True)
class FloatBudget:
    """A float output passes when, against the float64 evaluation of the reference,
    ``err(backend) <= multiple * err(reference at the backend's working precision) + abs_floor``
    for the max-abs error, and ``calc_diff(backend) <= multiple * calc_diff(reference) +
    calc_diff_floor``; NaN/Inf positions must match exactly. ``calc_diff_max``, when set, is a hard
    ceiling on calc_diff regardless of the reference (DeepGEMM's bar for FP8 GEMM)."""

    multiple: float = 2.0
    abs_floor: float = 1e-6
    calc_diff_floor: float = 1e-7
    calc_diff_max: Optional[float] = None
    kind: str = "float"


@dataclasses.dataclass(frozen=True)
class SelectionBudget:
    """An index output (top-k selection) passes when every selected entry's reference score is
    >= the k-th best reference score minus ``score_rtol * max|score| + score_atol`` (near-ties may
    swap), the set has no duplicates, and the -1 tail positions match the reference exactly."""

    score_rtol: float = 1e-3
    score_atol: float = 1e-5
    kind: str = "selection"


@dataclasses.dataclass(frozen=True)
class ExactBudget:
    """Integer bookkeeping (dispatch plans) must equal the reference exactly."""

    kind: str = "exact"


Budget = FloatBudget | SelectionBudget | ExactBudget


# --- checked mode ------------------------------------------------------------------------------

_CHECKED = os.environ.get("HAL_CHECKED", "") not in ("", "0")


def checked_mode() -> bool:
    """Whether data-dependent checks (index ranges, finite scales, duplicate indices) also run on
    accelerator tensors. They always run on CPU tensors, where they are cheap; on a device they
    need a host sync, so they run only when ``HAL_CHECKED=1`` or :func:`set_checked` turned on."""
    return _CHECKED


def set_checked(on: bool) -> None:
    """Turn checked mode on or off for this process (see :func:`checked_mode`)."""
    global _CHECKED
    _CHECKED = bool(on)


def data_checks(t) -> bool:
    """True when data-dependent checks should run on tensor ``t`` (CPU, or checked mode)."""
    return _CHECKED or t.device.type == "cpu"


# --- the spec object ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One contract op: name, family, signature, docstring, validation and tolerance policy.

    ``validate`` has the op's exact signature; it raises :class:`hal.ContractError` or returns
    None. ``outputs`` names each output with its budget, in return order (for ops returning a
    DispatchPlan: one entry per plan field). ``summary`` is the one-line semantics ``hal ops``
    prints.
    """

    name: str
    family: str
    summary: str
    validate: Callable
    outputs: Mapping[str, Budget]
    tensor_args: tuple[str, ...]

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.validate)

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.validate) or ""

    def signature_str(self) -> str:
        return f"{self.name}{self.signature}"


def op_spec(*, family: str, summary: str, outputs: Mapping[str, Budget]):
    """Decorator: turns a validation function (the op's signature + docstring) into an OpSpec."""

    def wrap(fn: Callable) -> OpSpec:
        sig = inspect.signature(fn)
        tensor_args = tuple(
            n for n, p in sig.parameters.items()
            if "Tensor" in str(p.annotation) or "DispatchPlan" in str(p.annotation)
        )
        return OpSpec(fn.__name__, family, summary, fn, dict(outputs), tensor_args)

    return wrap
