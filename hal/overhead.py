"""Per-call dispatch overhead of HAL: ``rt.<op>`` and ``hal.ops.<op>`` vs the bare reference kernel.

Used by ``hal bench overhead``. Inputs are tiny CPU tensors so that the kernel's own time is
small and the difference is the cost HAL adds per call (argument validation, the bound-op frame,
and for ``hal.ops`` the device-type lookup). Each variant is timed as the median, over
``repeat`` rounds, of the mean time of ``number`` back-to-back calls; the variants are interleaved
round by round so that drift hits them alike.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from hal.contract import CONTRACT
from hal.validation_cache import tensor_guard

GOAL_US = 2.0      # what contract validation may add per call (issue 12's goal; docs/perf.md)


def tiny_args(op: str) -> tuple[tuple, dict]:
    """Small valid CPU arguments for ``op``: the contract's own sample (fixed seed, never zeros)."""
    return CONTRACT[op].sample(torch.Generator().manual_seed(0))


def _per_call_us(fn: Callable[[], object], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number * 1e6


def _on_meta(obj):
    from hal.contract import DispatchPlan
    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if isinstance(obj, DispatchPlan):
        return obj.to("meta")
    return obj


def _null_kernel(*args, **kwargs):
    return None


def _empty_call():
    return None


def meta_kernel(spec):
    """A kernel that returns outputs of the contract's shapes and dtypes on the "meta" device (no
    arithmetic): what the checked-mode output check needs to pass. Data-dependent extents are 0."""
    from hal.contract import DispatchPlan

    def kernel(*args, **kwargs):
        metas = spec.meta(spec.bind(*args, **kwargs))
        outs = [torch.empty([0 if d is None else d for d in m.shape], dtype=m.dtype, device="meta") for m in metas]
        if spec.returns == "plan":
            a = spec.bind(*args, **kwargs)
            return DispatchPlan(*outs, num_tokens=a.hidden.shape[0], top_k=a.expert_ids.shape[1], align=a.align)
        return outs[0] if spec.returns == "tensor" else tuple(outs)
    kernel.__signature__ = spec.signature
    return kernel


def _interleaved_us(variants: dict, number: int, repeat: int) -> dict[str, list[float]]:
    """Per variant, ``repeat`` per-call times (µs): round by round, each variant ``number`` times."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            times[name].append(_per_call_us(fn, number))
    return times


def _median_difference(times: dict, minuend: str, subtrahend: str) -> float:
    """The median over rounds of ``minuend - subtrahend`` measured in the same round (drift cancels)."""
    return statistics.median(a - b for a, b in zip(times[minuend], times[subtrahend]))


def call_tensors(spec, args: tuple, kwargs: dict) -> tuple:
    """The tensors a remembered call signature compares for this call (present ones, a
    DispatchPlan as its four), in parameter order."""
    from hal.contract import DispatchPlan
    bound = spec.signature.bind(*args, **kwargs)
    out = []
    for value in bound.arguments.values():
        if isinstance(value, DispatchPlan):
            out += value.tensors()
        elif isinstance(value, torch.Tensor):
            out.append(value)
    return tuple(out)


def _variants(op: str, rt, rt_fast, rt_shaped, rt_checked, hal_ops) -> tuple[dict, tuple]:
    """The timed calls for ``op`` (see :func:`measure_overhead`) and the tensors its guard compares."""
    cpu_args, cpu_kwargs = tiny_args(op)
    args = tuple(_on_meta(a) for a in cpu_args)
    kwargs = {k: _on_meta(v) for k, v in cpu_kwargs.items()}
    spec = CONTRACT[op]
    tensors = call_tensors(spec, args, kwargs)
    guard = tensor_guard(tensors)
    bound, unvalidated, shaped, checked, via_ops = (getattr(r, op) for r in (rt, rt_fast, rt_shaped, rt_checked,
                                                                               hal_ops))
    return {
        "bare": lambda: _null_kernel(*args, **kwargs),
        "runtime": lambda: bound(*args, **kwargs),
        "novalidate": lambda: unvalidated(*args, **kwargs),
        "ops": lambda: via_ops(*args, **kwargs),
        "validate": lambda: spec.validate(*args, **kwargs),
        "validate_cpu": lambda: spec.validate(*cpu_args, **cpu_kwargs),
        "shaped": lambda: shaped(*args, **kwargs),
        "checked": lambda: checked(*args, **kwargs),
        "guard": lambda: guard.check(*tensors),
        "empty": _empty_call,
    }, tensors


def measure_overhead(ops=None, *, number: int = 200, repeat: int = 40) -> list[dict]:
    """Per op, the per-call cost in µs of the variants below, timed in interleaved rounds (in
    each of ``repeat`` rounds every variant of every op runs ``number`` calls, so all ops see the
    same mix of the machine's fast and slow spells). Plain costs are medians over rounds;
    every ``*_overhead_us`` / added cost is the median over rounds of the difference between two
    variants timed in the same round, so drift of the machine cancels:

    - ``bare``: a kernel that does nothing, called directly (the floor of a Python call);
    - ``runtime``: the same null kernel bound by a runtime (``rt.<op>``): contract validation of
      shapes/dtypes/devices plus the bound-op frame; ``runtime_overhead_us`` = runtime - bare;
    - ``runtime_novalidate``: a runtime built with ``validate=False`` (the bound-op frame alone);
    - ``ops``: through ``hal.ops.<op>`` (adds the device-type lookup); ``ops_overhead_us``;
    - ``validate``: the contract check alone;
    - ``cpu_data_checks``: the extra cost of the data-dependent checks (index ranges, finite
      scales) that run only on CPU tensors or in checked mode;
    - ``checked_outputs``: the extra cost of checked mode's output shape/dtype check (a kernel
      returning meta outputs of the contract's shapes, bound with and without ``checked=True``);
    - ``validation_us``: what validation adds to a bound op: ``runtime`` - ``runtime_novalidate``
      (a remembered call signature checked; :mod:`hal.validation_cache`);
    - ``guard_us``: the C++ comparison of this call's ``tensors`` (how many: present tensors, a
      DispatchPlan as four) with a remembered signature, alone: the part of ``validation_us``
      that grows with the number of tensors (about 0.3 µs each on the CI CPU);
    - ``goal_met``: whether ``validation_us`` is <= 2 µs (the issue's goal for contract validation;
      the totals ``runtime_overhead_us`` and ``ops_overhead_us`` are reported beside it).

    The null kernel runs on "meta" tensors (shape-only), so what is measured is HAL's own cost and
    nothing of the arithmetic. A temporary null backend serves the "meta" device type."""
    import hal
    from hal.backend import Backend, OpCapability
    from hal.registry import get_registry
    reg = get_registry()
    null = Backend("null-overhead", device_type="meta", priority=-100,
                   capabilities={op: OpCapability("native", (), "does nothing") for op in CONTRACT},
                   kernels={op: _null_kernel for op in CONTRACT})
    shaped = Backend("meta-outputs-overhead", device_type="meta", priority=-101,
                     capabilities={op: OpCapability("native", (), "meta outputs") for op in CONTRACT},
                     kernels={op: meta_kernel(spec) for op, spec in CONTRACT.items()})
    reg.register_backend(null, replace=True)
    reg.register_backend(shaped, replace=True)
    try:
        import hal.ops as hops
        hops._reset()
        rt = hal.runtime("null-overhead")
        rt_fast = hal.runtime("null-overhead", validate=False)
        rt_shaped = hal.runtime("meta-outputs-overhead", checked=False)
        rt_checked = hal.runtime("meta-outputs-overhead", checked=True)
        names = list(ops or CONTRACT)
        variants, tensors = {}, {}
        for op in names:
            per_op, tensors[op] = _variants(op, rt, rt_fast, rt_shaped, rt_checked, hal.ops)
            variants.update({(op, v): fn for v, fn in per_op.items()})
        times = _interleaved_us(variants, number, repeat)
        rows = []
        for op in names:
            t = {v: times[(op, v)] for v in ("bare", "runtime", "novalidate", "ops", "validate", "validate_cpu",
                                              "shaped", "checked", "guard", "empty")}
            med = {name: statistics.median(v) for name, v in t.items()}
            validation = _median_difference(t, "runtime", "novalidate")
            rows.append({
                "op": op, "bare_us": med["bare"], "runtime_us": med["runtime"], "ops_us": med["ops"],
                "runtime_overhead_us": _median_difference(t, "runtime", "bare"),
                "ops_overhead_us": _median_difference(t, "ops", "bare"),
                "runtime_novalidate_us": med["novalidate"],
                "runtime_novalidate_overhead_us": _median_difference(t, "novalidate", "bare"),
                "validate_us": med["validate"],
                "cpu_data_checks_us": max(_median_difference(t, "validate_cpu", "validate"), 0.0),
                "checked_outputs_us": max(_median_difference(t, "checked", "shaped"), 0.0),
                "tensors": len(tensors[op]),
                "guard_us": _median_difference(t, "guard", "empty"),
                "goal_us": GOAL_US, "validation_us": validation, "goal_met": validation <= GOAL_US,
            })
        return rows
    finally:
        reg.unregister("null-overhead")
        reg.unregister("meta-outputs-overhead")
        hal.ops._reset()
