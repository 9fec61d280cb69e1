"""``hal conformance``: certify backends against the reference (and ``export`` golden vectors)."""
from __future__ import annotations

import sys

import click

from hal.cli import EXIT_BACKEND, EXIT_FAILED, EXIT_INPUT, EXIT_USAGE
from hal.commands._common import emit_json, fail, missing_module_exit, require_extra


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


class _Progress:
    """A progress bar on stderr (none with --json or when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) if enabled else None
        if self.bar:
            self.bar.__enter__()

    def __call__(self, _item) -> None:
        if self.bar:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _summary_table(report: dict) -> list[str]:
    """backend x op rows: the count of each status (full names as headers), and the paths the cases ran on."""
    from hal.conformance.runner import STATUSES
    labels = [b["label"] for b in report["backends"]] or ["backend"]
    bw = max(len("backend"), *(len(x) for x in labels))
    ow = max([len("op")] + [len(r["op"]) for b in report["backends"] for r in b["results"]])
    widths = {s: max(len(s), 4) for s in STATUSES}
    lines = [f"{'backend':<{bw}}  {'op':<{ow}}  " + " ".join(f"{s:>{widths[s]}}" for s in STATUSES) + "  path"]
    for b in report["backends"]:
        ops, paths = {}, {}
        for r in b["results"]:
            ops.setdefault(r["op"], {s: 0 for s in STATUSES})[r["status"]] += 1
            paths.setdefault(r["op"], set()).add(r["path"])
        for op, c in ops.items():
            lines.append(f"{b['label']:<{bw}}  {op:<{ow}}  " + " ".join(f"{c[s]:>{widths[s]}}" for s in STATUSES)
                         + "  " + "+".join(sorted(paths[op])))
    return lines


def _first_line(text: str) -> str:
    line = next((x.strip() for x in str(text or "").splitlines() if x.strip()), "")
    return line or "(no reason given)"


def _detail_lines(report: dict) -> list[str]:
    """One line per result that is not PASS, naming the backend, op/case, path and the reason; a
    backend whose every case was SKIPPED for one reason gets one line; a broken plugin one BROKEN line."""
    from hal.conformance.reports import BROKEN_STATUSES
    lines = []
    for b in report["backends"]:
        res = b["results"]
        if b["status"] in BROKEN_STATUSES:
            lines.append(f"BROKEN {b['backend']}: plugin {b['status']}: {_first_line(b['reason'])} "
                         "(`hal backends --traceback` shows why)")
            res = [r for r in res if r["status"] != "SKIPPED"]
        skipped = [r for r in res if r["status"] == "SKIPPED"]
        if skipped and len(skipped) == len(res) and len({r["reason"] for r in skipped}) == 1:
            ops = ", ".join(dict.fromkeys(r["op"] for r in skipped))
            lines.append(f"SKIPPED {b['backend']}: all {len(skipped)} cases ({ops}): "
                         f"{_first_line(skipped[0]['reason'])}")
            res = []
        for r in res:
            if r["status"] != "PASS":
                lines.append(f"{r['status']} {b['backend']} {r['op']}/{r['case']} [{r['path']}]: "
                             f"{_first_line(r['reason'])}")
    return lines


def _verdict_line(report: dict) -> str:
    s = report["summary"]
    parts = [f"{k} {v}" for k, v in s["counts"].items() if v]
    if s.get("models"):
        failed = s.get("models_failed", 0)
        parts.append(f"models PASS {s['models'] - failed}" + (f", models FAIL {failed}" if failed else ""))
    line = ("PASSED" if s["passed"] else "FAILED") + ": " + (", ".join(parts) or "nothing was run")
    if s.get("backends_broken"):
        line += f"; broken plugins: {', '.join(s['backends_broken'])}"
    return line


_NEEDS_BACKEND = ("missing --backend NAME|all: say which backend to certify, e.g. `hal conformance --backend cpu` "
                  "(also with --model or --golden); `hal backends` lists the names")


@click.group(invoke_without_command=True)
@click.option("--backend", "-b", "backend", metavar="NAME|all", help="Backend to certify; 'all' = every installed one.")
@click.option("--ops", "ops", metavar="a,b", help="Only these ops (comma-separated).")
@click.option("--level", type=click.Choice(["quick", "full", "models"]), default="quick", show_default=True,
              help="quick: tiny shapes (CI, interpreters, emulators); full: real model shapes (a GPU/NPU machine); "
              "models: the calls the built-in models make under hal run, recorded and replayed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random case data.")
@click.option("--report-dir", type=click.Path(file_okay=False),
              help="Write the reports into this folder as one set: DIR/BACKEND.run-*/conformance-BACKEND.* and "
              "the pointer DIR/BACKEND.latest.json naming the latest complete set.")
@click.option("--format", "formats", default="json,junit,md,html", show_default=True,
              help="Report formats, comma-separated: json, junit, md, html.")
@click.option("--golden", "golden_dir", type=click.Path(exists=True, file_okay=False),
              help="Certify against stored golden vectors (from `hal conformance export`) instead of the reference.")
@click.option("--model", "model", metavar="NAME|DIR", help="Model-level conformance: the same prompts on the backend "
              "and on the reference; top-1 agreement and KL of next-token distributions.")
@click.option("--fallback", type=click.Choice(["error", "reference"]), default="error", show_default=True,
              help="error: an op the backend lacks or declines is UNSUPPORTED; reference: it runs the CPU "
              "reference as hal.runtime() would, recorded with path 'fallback'.")
@click.option("--world-size", "world_sizes", metavar="W,W", help="Also certify the expert-parallel ops (ep_dispatch, "
              "ep_combine) on W local processes joined by gloo, for each W (e.g. 2,4), against the single-process "
              "reference (cases world<W>/<scenario>); with --model, the model itself with its experts "
              "expert-parallel over W ranks (and --tp).")
@click.option("--tp", type=click.IntRange(1), default=1, show_default=True,
              help="With --model and --world-size: also split attention and dense layers over groups of T ranks.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.pass_context
def conformance(ctx, backend, ops, level, seed, report_dir, formats, golden_dir, model, fallback, world_sizes, tp,
                as_json):
    """Certify a backend: every contract op on every case, compared with the reference.

    \b
    hal conformance --backend cpu
    hal conformance --backend cuda --level full --report-dir out --format json,junit,md,html
    hal conformance --backend all
    hal conformance export --out golden/          # golden vectors + ONNX models
    hal conformance --golden golden/ --backend ascend
    hal conformance --model tiny-glm5 --backend cuda
    hal conformance --backend cpu --ops ep_dispatch,ep_combine --world-size 2,4
    hal conformance --model tiny-glm5 --backend cpu --world-size 4 --tp 2

    Each case runs twice. Statuses: PASS, FAIL (outside the op's budget), ERROR (the backend
    raised), UNSUPPORTED (the backend declares the op or case absent), SKIPPED (backend
    unavailable), NONDETERMINISTIC (the two runs differ bitwise), CORRUPT (a golden file is
    damaged). Paths: native, emulated, fallback (--fallback reference: the CPU reference ran
    it), absent. Every result that is not PASS is printed with its reason.

    \b
    Exit codes: 0 nothing FAILed, ERRORed or was CORRUPT, every --model passed, and (with
    --backend all) no plugin is broken or incompatible; 1 otherwise; 2 usage error (no --backend,
    bad options, or a missing optional extra: pip install 'hal[conformance]'); 3 a named backend
    is unavailable; 4 unreadable golden vectors, an unknown model, or a report folder that
    cannot be written (the results are printed first). Details: docs/conformance.md.
    """
    if ctx.invoked_subcommand is not None:
        return
    if not backend:
        fail(_NEEDS_BACKEND, EXIT_USAGE, as_json=as_json)
    if golden_dir and model:
        fail("--golden and --model exclude each other: certify ops against golden vectors, or compare a model",
             EXIT_USAGE, as_json=as_json)
    if golden_dir:
        require_extra("hal conformance --golden", ("onnx",), as_json=as_json)
    import hal
    from hal.conformance import environment, reports
    from hal.conformance.cases import catalog
    from hal.conformance.runner import certify
    from hal.registry import get_registry
    fmts = _split(formats) or []
    bad = [f for f in fmts if f not in reports.FORMATS]
    if bad:
        raise click.BadParameter(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(reports.FORMATS)}",
                                 param_hint="--format")
    if report_dir and not fmts:
        raise click.BadParameter(f"no format given; choose from {', '.join(reports.FORMATS)}", param_hint="--format")
    op_list = _split(ops)
    worlds = []
    for w in _split(world_sizes) or []:
        if not w.isdigit() or not 2 <= int(w) <= 64:
            raise click.BadParameter(f"{w!r} is not a world size from 2 to 64", param_hint="--world-size")
        worlds.append(int(w))
    if worlds and golden_dir:
        fail("--world-size certifies the expert-parallel ops (or, with --model, the model) against the reference; "
             "it does not combine with --golden", EXIT_USAGE, as_json=as_json)
    if tp > 1 and not (model and worlds):
        fail("--tp needs --model and --world-size (the model's attention and dense layers split over groups of "
             "--tp ranks)", EXIT_USAGE, as_json=as_json)
    if op_list:
        unknown = [o for o in op_list if o not in hal.CONTRACT]
        if unknown:
            raise click.BadParameter(f"unknown op(s) {', '.join(unknown)}", param_hint="--ops")
    reg = get_registry()
    if backend == "all":
        names = [r.name for r in reg.records()]
    else:
        try:
            rec = reg.record(backend)
        except hal.BackendUnavailable as exc:
            fail(str(exc), EXIT_BACKEND, as_json=as_json)
        if rec.status != "available":
            fail(str(hal.BackendUnavailable(backend, rec.status, rec.reason)), EXIT_BACKEND, as_json=as_json,
                 backend=backend, status=rec.status, reason=rec.reason)
        names = [backend]
    env = environment.collect(seed=seed, level=level)
    show = not as_json and sys.stderr.isatty()
    runs, models, kind = [], [], "ops"
    if model:
        kind = "model"
        try:
            from hal.models.conformance import compare_model
            from hal.spawn_ranks import RanksFailed
        except ImportError as exc:
            missing_module_exit(exc, "hal conformance --model", as_json=as_json)
        for name in names:
            try:
                for w in worlds or [1]:
                    on_ranks = {"world_size": w, "tp": tp} if w > 1 else {}
                    models.append(compare_model(model, name, seed=seed, **on_ranks))
            except hal.BackendUnavailable as exc:
                fail(str(exc), EXIT_BACKEND, as_json=as_json)
            except (FileNotFoundError, ValueError, KeyError) as exc:
                fail(f"model {model!r}: {exc}", EXIT_INPUT, as_json=as_json)
            except RanksFailed as exc:
                fail(f"model {model!r}: {len(exc.failures)} rank(s) failed: "
                     + "; ".join(f"rank {r}: {why.splitlines()[0]}" for r, why in sorted(exc.failures.items())),
                     EXIT_INPUT, as_json=as_json)
    elif golden_dir:
        kind = "golden"
        try:
            from hal.conformance.golden import CorruptVector, certify_golden, read_manifest
        except ImportError as exc:
            missing_module_exit(exc, "hal conformance --golden", as_json=as_json)
        try:
            total = len([e for e in read_manifest(golden_dir)["cases"] if not op_list or e["op"] in op_list])
        except CorruptVector as exc:
            fail(f"golden vectors unreadable: {exc}", EXIT_INPUT, as_json=as_json)
        for name in names:
            prog = _Progress(total, f"{name} (golden)", show)
            runs.append(certify_golden(golden_dir, name, ops=op_list, fallback=fallback, progress=prog))
            prog.close()
    else:
        cases = catalog(level, op_list)
        for name in names:
            prog = _Progress(len(cases), name, show)
            runs.append(certify(name, level=level, seed=seed, cases=cases, fallback=fallback, progress=prog))
            prog.close()
            for w in worlds if not op_list or {"ep_dispatch", "ep_combine"} & set(op_list) else []:
                from hal.conformance.world import OPS as EP_OPS, SCENARIOS, certify_world
                prog = _Progress(len(SCENARIOS) * len(EP_OPS), f"{name} (world size {w})", show)
                extra = certify_world(name, w, seed=seed, fallback=fallback, progress=prog)
                prog.close()
                runs[-1].results.extend(r for r in extra.results if not op_list or r.op in op_list)
    report = reports.build_report(runs, environment=env, kind=kind, level=level, golden_dir=golden_dir, models=models)
    paths, pointer, write_error = {}, None, None
    if report_dir:
        key = reports.report_key(report, backend)
        try:
            paths = reports.write_reports(report, report_dir, fmts, key=key)
            pointer = str(reports.pointer_path(report_dir, key))
        except OSError as exc:
            write_error = (f"cannot write reports into {report_dir}: {exc.strerror or exc}"
                           + (f" ({exc.filename})" if getattr(exc, "filename", None) else "")
                           + "; the results are above, nothing was written")
    if as_json:
        emit_json({**report, "report_files": paths, "report_pointer": pointer, "report_error": write_error})
    else:
        if runs:
            for line in _summary_table(report):
                click.echo(line)
        for line in _detail_lines(report):
            click.echo(line)
        for m in models:
            where = f", {m['world_size']} ranks (EP {m['world_size']} x TP {m['tp']})" if m.get("world_size", 1) > 1 else ""
            click.echo(f"model {m['model']} on {m['label']}{where}: {'PASS' if m['passed'] else 'FAIL'}: "
                       + reports._model_line(m))
        click.echo(_verdict_line(report))
        for fmt, path in paths.items():
            click.echo(f"{fmt} report: {path}")
        if pointer:
            click.echo(f"latest-set pointer: {pointer}")
    if write_error:
        click.echo(f"hal: error: {write_error}", err=True)
        sys.exit(EXIT_INPUT)
    if not report["summary"]["passed"]:
        sys.exit(EXIT_FAILED)


@conformance.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
@click.option("--level", type=click.Choice(["quick", "full"]), default="quick", show_default=True)
@click.option("--ops", "ops", metavar="a,b", help="Only these ops (comma-separated).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and the onnxruntime check as JSON.")
def export(out_dir, level, ops, seed, as_json):
    """Write golden vectors: every case's inputs and reference outputs as ONNX TensorProto files.

    Layout (ONNX backend-test style): OUT/<op>/<case>/test_data_set_0/input_N.pb, output_N.pb
    (float64 truth), reference_N.pb (reference at working precision), OUT/<op>/<case>/model.onnx
    where standard ONNX expresses the op, and OUT/manifest.json. FP8 tensors are FLOAT8E4M3FN.
    Then the exported ONNX models run on onnxruntime (CPU) and are compared with the reference:
    an independent check of the reference itself; exit 1 if it disagrees.
    """
    require_extra("hal conformance export", ("onnx", "onnxruntime"), as_json=as_json)
    import hal
    from hal.conformance.cases import catalog
    try:
        from hal.conformance.golden import export as do_export
        from hal.conformance.onnx_check import check_exported
    except ImportError as exc:
        missing_module_exit(exc, "hal conformance export", as_json=as_json)
    op_list = _split(ops)
    unknown = [o for o in op_list or [] if o not in hal.CONTRACT]
    if unknown:
        raise click.BadParameter(f"unknown op(s) {', '.join(unknown)}", param_hint="--ops")
    prog = _Progress(len(catalog(level, op_list)), "export", not as_json and sys.stderr.isatty())
    try:
        manifest = do_export(out_dir, level=level, ops=op_list, seed=seed, progress=prog)
    except OSError as exc:
        prog.close()
        fail(f"cannot write golden vectors into {out_dir}: {exc.strerror or exc}"
             + (f" ({exc.filename})" if getattr(exc, "filename", None) else ""), EXIT_INPUT, as_json=as_json)
    finally:
        prog.close()
    check = check_exported(out_dir, op_list)
    failed = [r for r in check if r["status"] in ("FAIL", "ERROR", "CORRUPT")]
    if as_json:
        emit_json({"out": out_dir, "cases": len(manifest["cases"]), "manifest": manifest, "onnxruntime_check": check})
    else:
        click.echo(f"wrote {len(manifest['cases'])} cases to {out_dir}")
        ran = [r for r in check if r["status"] != "NOT_EXPRESSIBLE"]
        click.echo(f"onnxruntime check of the reference: {len(ran) - len(failed)}/{len(ran)} PASS")
        for r in failed:
            click.echo(f"  {r['status']} {r['op']}/{r['case']}: {r['detail']}")
    if failed:
        sys.exit(EXIT_FAILED)
