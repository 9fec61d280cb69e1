"""``hal bench``: a backend's benchmarks, and ``hal bench overhead`` (HAL's per-call cost)."""
from __future__ import annotations

import platform
import sys

import click

from hal.cli import EXIT_FAILED
from hal.commands._common import backend_unavailable, emit_json


@click.group(invoke_without_command=True)
@click.option("--backend", "-b", "backend_name", default=None, metavar="NAME",
              help="Run this backend's benchmarks (e.g. cuda).")
@click.option("--op", "ops", multiple=True, metavar="OP", help="Only benchmarks of these ops (repeatable).")
@click.option("--dry", is_flag=True, help="Tiny shapes, same code path (e.g. Triton interpreter on the CPU): "
              "tests the harness, measures nothing meaningful.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.pass_context
def bench(ctx, backend_name, ops, dry, as_json):
    """Benchmarks (never tests): time HAL ops against named baselines in the same run.

    \b
    hal bench overhead             per-call cost HAL adds over the bare reference kernel
    hal bench --backend cuda       every benchmark the cuda backend ships (GPU)
    hal bench -b cuda --op fp8_gemm --json

    Each row prints the median time, the achieved TFLOP/s or TB/s, the floor (FLOPs / peak and
    bytes / bandwidth), the baseline's time measured in the same process, the ratio
    (baseline / HAL: > 1 means HAL is faster) and the goal. Exit 0 when the run completed (a goal
    not met is reported, not an error); 3 when the backend is unavailable.
    """
    if ctx.invoked_subcommand is not None:
        return
    if backend_name is None:
        click.echo(ctx.get_help(), err=True)
        raise click.UsageError("name a backend (--backend NAME) or a subcommand (hal bench overhead)")
    import hal
    from hal.bench import format_table
    from hal.registry import get_registry
    try:
        rec = get_registry().record(backend_name)
        if rec.status != "available":
            raise hal.BackendUnavailable(backend_name, rec.status, rec.reason)
    except hal.BackendUnavailable as exc:
        backend_unavailable(exc, as_json=as_json)
    marks = [b for b in rec.backend.benchmarks() if not ops or b.op in ops]
    if not marks:
        msg = f"backend {backend_name!r} ships no benchmarks" + (f" for ops {', '.join(ops)}" if ops else "")
        if as_json:
            emit_json({"backend": backend_name, "label": rec.label, "results": [], "note": msg})
        else:
            click.echo(msg)
        return
    results, errors = [], []
    for b in marks:
        if not as_json:
            click.echo(f"running {b.name} ...", err=True)
        try:
            results.extend(b.run(dry=dry))
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not lose the others
            errors.append({"benchmark": b.name, "error": f"{type(exc).__name__}: {exc}"})
    if as_json:
        emit_json({"backend": backend_name, "label": rec.label, "device": rec.availability.device,
                   "versions": dict(rec.availability.versions), "dry": dry,
                   "results": [r.to_dict() for r in results], "errors": errors})
    else:
        for e in errors:
            click.echo(f"benchmark {e['benchmark']} failed: {e['error']}", err=True)
        click.echo(format_table(results))
    if errors:
        sys.exit(EXIT_FAILED)


@bench.command()
@click.option("--op", "ops", multiple=True, metavar="OP", help="Only these ops (repeatable).")
@click.option("--number", default=200, show_default=True, help="Calls per timing round.")
@click.option("--repeat", default=40, show_default=True,
              help="Timing rounds; every variant of every op runs once per round (medians are reported).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def overhead(ops, number, repeat, as_json):
    """Per-call overhead of rt.<op> and hal.ops.<op> over calling a kernel directly.

    The kernel is a null kernel on shape-only ("meta") tensors, so the difference is HAL's own
    cost: contract validation, the bound-op call and (hal.ops) the device-type lookup.
    "validation" is what validation adds to rt.<op> (rt_us minus the same runtime built with
    validate=False, per round); goal: <= 2 µs, each miss is named. "guard" is the part of it
    that is the C++ comparison of the call's "tensors" with a remembered signature (HAL's compiled
    check after `hal build-checks`, else torch's TensorGuards, as the last line says; it grows with
    their number; the rest is HAL's Python). "validate" is the contract check alone
    (what a call with a new signature pays once); "cpu_data_checks" the extra data-dependent
    checks (index ranges, finite scales) that run only on CPU tensors or with HAL_CHECKED=1.
    """
    import torch

    from hal.contract import CONTRACT
    from hal.overhead import measure_overhead
    unknown = [o for o in ops if o not in CONTRACT]
    if unknown:
        raise click.BadParameter(f"unknown op(s) {', '.join(unknown)}", param_hint="--op")
    rows = measure_overhead(list(ops) or None, number=number, repeat=repeat)
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor(), "threads": torch.get_num_threads()}
    if as_json:
        emit_json({"environment": env, "results": rows})
        return
    click.echo(f"{'op':<20} {'bare_us':>8} {'rt_us':>7} {'ops_us':>7} {'rt_added':>9} {'ops_added':>10} "
               f"{'novalid_added':>13} {'validation':>10} {'validate':>9} {'cpu_data_checks':>16} "
               f"{'checked_out':>12} {'tensors':>7} {'guard':>6}  goal")
    for r in rows:
        click.echo(f"{r['op']:<20} {r['bare_us']:>8.2f} {r['runtime_us']:>7.2f} {r['ops_us']:>7.2f} "
                   f"{r['runtime_overhead_us']:>9.2f} {r['ops_overhead_us']:>10.2f} "
                   f"{r['runtime_novalidate_overhead_us']:>13.2f} {r['validation_us']:>10.2f} "
                   f"{r['validate_us']:>9.2f} {r['cpu_data_checks_us']:>16.2f} {r['checked_outputs_us']:>12.2f} "
                   f"{r['tensors']:>7} {r['guard_us']:>6.2f}  "
                   + ("met" if r["goal_met"] else "MISSED"))
    missed = [f"{r['op']} ({r['validation_us']:.2f} µs, {r['guard_us']:.2f} of it comparing {r['tensors']} tensors)"
              for r in rows if not r["goal_met"]]
    from hal.validation_cache import guard_kind
    click.echo("goal: validation <= 2 µs per call: "
               + (f"MISSED by {', '.join(missed)}" if missed else f"met by all {len(rows)} ops")
               + f"; python {env['python']}, torch {env['torch']}, {env['machine']}; call signatures "
               f"compared by {guard_kind()}; validate = the contract check alone (a new signature)")
