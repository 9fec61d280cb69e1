"""Benchmarks as data: what ``hal bench`` runs and prints.

A backend offers benchmarks through ``Backend.benchmarks()`` -> list of :class:`Benchmark`.
Each benchmark times the HAL op and its named baseline *in the same process* and returns
:class:`BenchResult` rows: measured time, achieved rate, the two floors (FLOPs / peak and
bytes / bandwidth) and the ratio to the baseline. Benchmarks are never timed tests: goals are
stated (``goal``) and compared (``meets_goal``), never asserted.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional


@dataclasses.dataclass
class BenchResult:
    """One measured configuration. Times in milliseconds (median over repetitions).

    ``ratio`` = baseline_ms / time_ms (> 1: HAL is faster). ``floor_ms`` = max(flops/peak,
    bytes/bandwidth) for the device, when the peak numbers are known. ``goal`` states the target
    (e.g. ">= 0.95x F.scaled_mm"); ``meets_goal`` is True/False/None (None: not judged here).
    """

    benchmark: str
    op: str
    shape: dict
    time_ms: float
    baseline: str = ""
    baseline_ms: Optional[float] = None
    ratio: Optional[float] = None
    flops: Optional[float] = None
    bytes: Optional[float] = None
    tflops: Optional[float] = None
    tbps: Optional[float] = None
    flops_floor_ms: Optional[float] = None
    bytes_floor_ms: Optional[float] = None
    floor_ms: Optional[float] = None
    goal: str = ""
    meets_goal: Optional[bool] = None
    device: str = ""
    notes: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Benchmark:
    """A named benchmark: ``run(dry=False) -> list[BenchResult]``.

    ``dry=True`` runs the same code path at tiny shapes (for CI without the device: e.g. Triton
    kernels under the interpreter), so the harness itself is tested."""

    name: str
    op: str
    run: Callable[..., list]
    description: str = ""


def median_time_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 20,
                   sync: Callable[[], None] = lambda: None, setup: Optional[Callable[[], object]] = None) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` calls; ``sync`` waits for the device.

    For GPU timing prefer ``triton.testing.do_bench`` or CUDA events; this is the portable fallback
    (CPU, emulators)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def format_table(results: list[BenchResult]) -> str:
    """The results as an aligned text table (the last thing ``hal bench`` prints)."""
    cols = ("benchmark", "shape", "time_ms", "rate", "floor_ms", "baseline", "baseline_ms", "ratio", "goal", "ok")
    rows = [cols]

    def f(v, fmt="{:.4g}"):
        return "-" if v is None else fmt.format(v)

    for r in results:
        rate = f"{r.tflops:.1f} TFLOP/s" if r.tflops is not None else (f"{r.tbps:.2f} TB/s" if r.tbps is not None else "-")
        shape = ",".join(f"{k}={v}" for k, v in r.shape.items())
        rows.append((r.benchmark, shape, f(r.time_ms), rate, f(r.floor_ms), r.baseline or "-", f(r.baseline_ms),
                     f(r.ratio, "{:.2f}x"), r.goal or "-", {True: "yes", False: "NO", None: "-"}[r.meets_goal]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
