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


def _median_us(fn, number, repeat) -> float:
    fn()
    return statistics.median(_per_call_us(fn, number) for _ in range(repeat))


def measure_overhead(ops=None, *, number: int = 2000, repeat: int = 15) -> list[dict]:
    """Per op, the median per-call cost in µs of:

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
        rows = []
        for op in ops or list(CONTRACT):
            cpu_args, cpu_kwargs = tiny_args(op)
            args = tuple(_on_meta(a) for a in cpu_args)
            kwargs = {k: _on_meta(v) for k, v in cpu_kwargs.items()}
            spec = CONTRACT[op]
            bare = _median_us(lambda: _null_kernel(*args, **kwargs), number, repeat)
            bound = _median_us(lambda: getattr(rt, op)(*args, **kwargs), number, repeat)
            unvalidated = _median_us(lambda: getattr(rt_fast, op)(*args, **kwargs), number, repeat)
            via_ops = _median_us(lambda: getattr(hal.ops, op)(*args, **kwargs), number, repeat)
            validate = _median_us(lambda: spec.validate(*args, **kwargs), number, repeat)
            validate_cpu = _median_us(lambda: spec.validate(*cpu_args, **cpu_kwargs), number, repeat)
            shaped = _median_us(lambda: getattr(rt_shaped, op)(*args, **kwargs), number, repeat)
            checked = _median_us(lambda: getattr(rt_checked, op)(*args, **kwargs), number, repeat)
            rows.append({
                "op": op, "bare_us": bare, "runtime_us": bound, "ops_us": via_ops,
                "runtime_overhead_us": bound - bare, "ops_overhead_us": via_ops - bare,
                "runtime_novalidate_us": unvalidated, "runtime_novalidate_overhead_us": unvalidated - bare,
                "validate_us": validate, "cpu_data_checks_us": max(validate_cpu - validate, 0.0),
                "checked_outputs_us": max(checked - shaped, 0.0), "goal_us": GOAL_US,
                "validation_us": bound - unvalidated, "goal_met": bound - unvalidated <= GOAL_US,
            })
        return rows
    finally:
        reg.unregister("null-overhead")
        reg.unregister("meta-outputs-overhead")
        hal.ops._reset()
