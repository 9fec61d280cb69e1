"""The machinery behind contract op specs: :class:`OpSpec`, tolerance policies, checked mode."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import os
from typing import Callable, Mapping, Optional

from hal._version import CONTRACT_VERSION  # noqa: E402,F401  (one home for the number)


# --- tolerance policies (read by the conformance suite; docs/contract.md "Conformance metrics") --------

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
_CHECKED_HERE: contextvars.ContextVar = contextvars.ContextVar("hal_checked", default=None)


def checked_mode() -> bool:
    """Whether checked mode is on here: a runtime built with ``checked=True/False`` decides for
    its own calls; otherwise the process default (``HAL_CHECKED=1`` or :func:`set_checked`).
    In checked mode data-dependent checks (index ranges, finite scales, duplicate indices) also
    run on accelerator tensors (they always run on CPU tensors, where they are cheap; on a device
    they need a host sync), and bound ops check every output's shape and dtype."""
    here = _CHECKED_HERE.get()
    return _CHECKED if here is None else here


def set_checked(on: bool) -> None:
    """Set the process default of checked mode (see :func:`checked_mode`)."""
    global _CHECKED
    _CHECKED = bool(on)


@contextlib.contextmanager
def checked(on: Optional[bool]):
    """Within the block, checked mode is ``on`` (None: the process default)."""
    token = _CHECKED_HERE.set(on)
    try:
        yield
    finally:
        _CHECKED_HERE.reset(token)


def data_checks(t) -> bool:
    """True when data-dependent checks should run on tensor ``t`` (CPU, or checked mode; never
    on meta tensors, which hold no data)."""
    dev = t.device.type
    return dev != "meta" and (dev == "cpu" or checked_mode())


# --- the spec object ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """What one output tensor of an op call looks like: its shape (``None`` for a data-dependent
    extent, e.g. the row count of a DispatchPlan) and dtype. Produced by an op's ``meta``."""

    shape: tuple
    dtype: "torch.dtype"


class Args:
    """An op call's arguments bound to the op's parameters, defaults applied (``a.top_k``)."""

    def __init__(self, values: Mapping):
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"Args({self.__dict__})"


RETURNS = ("tensor", "tuple", "plan")


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One contract op, whole: everything else (``hal.ops``, bound runtime ops, ``torch.ops.hal``
    and their fakes, the overhead benchmark's inputs, the conformance judge's output handling,
    ``docs/contract.md``) is generated from these fields.

    - ``validate``: a function with the op's exact signature and defaults and, as its docstring,
      the op's documentation (shapes, dtypes, semantics, errors); it raises
      :class:`hal.ContractError` or returns None.
    - ``outputs``: output name -> budget, in return order (for an op returning a
      :class:`DispatchPlan`, one entry per plan tensor).
    - ``meta(a: Args) -> tuple[TensorMeta, ...]``: the output shapes and dtypes of a call, in
      ``outputs`` order (fewer when an option drops an output, e.g. ``return_lse=False``).
    - ``sample(g: torch.Generator) -> (args, kwargs)``: small valid CPU arguments (never zeros).
    - ``returns``: "tensor", "tuple" or "plan" (a :class:`DispatchPlan`).
    - ``torch_fixed``: parameters the ``torch.library`` op fixes (omitted from its schema), e.g.
      ``{"return_lse": True}``: torch's schema language needs one output arity per op.
    - ``selection_scores``: for ops with a selection output, ``"module:function"`` computing the
      float64 scores and the selectable mask the judge ranks by (resolved lazily).
    - ``paired``: output -> selection output whose slots it follows (``weights`` follow
      ``expert_ids``): the judge reorders near-tie swaps before comparing.
    - ``summary``: the one line ``hal ops`` prints.
    """

    name: str
    family: str
    summary: str
    validate: Callable
    outputs: Mapping[str, Budget]
    tensor_args: tuple[str, ...]
    meta: Callable
    sample: Callable
    returns: str = "tensor"
    torch_fixed: Mapping[str, object] = dataclasses.field(default_factory=dict)
    selection_scores: Optional[str] = None
    paired: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.validate)

    @functools.cached_property
    def doc(self) -> str:
        return inspect.getdoc(self.validate) or ""

    def signature_str(self) -> str:
        return f"{self.name}{self.signature}"

    def header_source(self) -> str:
        """The parameter list of a generated function with this op's signature, each default
        read from a global ``_d_<name>`` (see :meth:`defaults_env`): ``"(x, *, top_k=_d_top_k)"``."""
        params = list(self.signature.parameters.values())
        return "(" + ", ".join(
            ("*, " if p.kind is p.KEYWORD_ONLY and (i == 0 or params[i - 1].kind is not p.KEYWORD_ONLY) else "")
            + p.name + (f"=_d_{p.name}" if p.default is not inspect.Parameter.empty else "")
            for i, p in enumerate(params)) + ")"

    def call_source(self) -> str:
        """The argument list passing every parameter of such a function on: ``"x, top_k=top_k"``."""
        return ", ".join(p.name if p.kind is p.POSITIONAL_OR_KEYWORD else f"{p.name}={p.name}"
                         for p in self.signature.parameters.values())

    def defaults_env(self) -> dict:
        """``{"_d_<name>": default}`` for the globals of a function built from :meth:`header_source`."""
        return {f"_d_{p.name}": p.default for p in self.signature.parameters.values()
                if p.default is not inspect.Parameter.empty}

    def bind(self, *args, **kwargs) -> Args:
        """The call's arguments by parameter name, defaults applied (TypeError if they do not fit)."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return Args(bound.arguments)

    def expected_outputs(self, *args, **kwargs) -> list[tuple[str, tuple, "torch.dtype"]]:
        """``[(output name, shape, dtype)]`` the call must return, flattened in ``outputs`` order
        (a DispatchPlan as its four tensors); ``None`` in a shape marks a data-dependent extent."""
        metas = self.meta(self.bind(*args, **kwargs))
        return [(name, tuple(m.shape), m.dtype) for name, m in zip(self.outputs, metas)]

    def selection_score_fn(self) -> Optional[Callable]:
        """The function named by ``selection_scores`` (imported on first use), or None."""
        if self.selection_scores is None:
            return None
        import importlib
        module, attr = self.selection_scores.split(":")
        return getattr(importlib.import_module(module), attr)


def op_spec(*, family: str, summary: str, outputs: Mapping[str, Budget], meta: Callable, sample: Callable,
            returns: str = "tensor", torch_fixed: Optional[Mapping] = None, selection_scores: Optional[str] = None,
            paired: Optional[Mapping[str, str]] = None):
    """Decorator: turns a validation function (the op's signature + docstring) into an OpSpec."""
    if returns not in RETURNS:
        raise ValueError(f"op_spec: returns must be one of {RETURNS}, got {returns!r}")

    def wrap(fn: Callable) -> OpSpec:
        sig = inspect.signature(fn)
        tensor_args = tuple(
            n for n, p in sig.parameters.items()
            if "Tensor" in str(p.annotation) or "DispatchPlan" in str(p.annotation)
        )
        return OpSpec(fn.__name__, family, summary, fn, dict(outputs), tensor_args, meta, sample, returns,
                      dict(torch_fixed or {}), selection_scores, dict(paired or {}))

    return wrap
