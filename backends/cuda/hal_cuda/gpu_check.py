"""The GPU check's driver (``ci/gpu_check.sh`` installs, then runs ``python -m hal_cuda.gpu_check``).

Stages, in this order, each inside one time budget: the quick conformance level, the benchmarks,
the full conformance level (its float64 reference evaluated on the GPU: the reference kernels are
torch code, and on the CPU the full level's references alone would outlast the budget). Every
case result and every benchmark row is written to ``<out>/gpu-check.json`` the moment it lands,
by writing a temporary file and renaming it over the old one, so a kill at any moment leaves one
valid JSON holding everything that finished. The budget is a deadline (``--deadline``, epoch
seconds, set by the shell from ``HAL_GPU_CHECK_BUDGET_S``): a stage does not start past it, and
an alarm at the deadline stops the running one; the JSON then says where it stopped.

Exit status: 0 every stage ran and passed; 1 a conformance case did not pass or a benchmark
failed; 2 the budget stopped the check before the end with nothing failed so far.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time


class BudgetExceeded(Exception):
    """The check's deadline passed."""


class Stream:
    """The check's one JSON document, rewritten atomically on every update."""

    def __init__(self, out_dir: str, doc: dict):
        self.path = os.path.join(out_dir, "gpu-check.json")
        self.tmp = os.path.join(out_dir, ".gpu-check.json.tmp")
        self.doc = doc
        self.write()

    def write(self) -> None:
        """Write the whole document to a temporary file, then rename it over the old one."""
        self.doc["updated"] = _now()
        with open(self.tmp, "w") as f:
            json.dump(self.doc, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def remaining(deadline: float) -> float:
    """Seconds left before ``deadline`` (epoch seconds); negative once it has passed."""
    return deadline - time.time()


def _arm(deadline: float) -> None:
    """SIGALRM at the deadline raises BudgetExceeded in the main thread (between bytecodes, so a
    running GPU kernel finishes first)."""
    def on_alarm(signum, frame):
        raise BudgetExceeded("deadline reached")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(remaining(deadline), 0.01))


def gpu_reference_outputs(case, args, kwargs):
    """(truth, ref) as ``conformance.runner.reference_outputs`` computes them, but evaluated on the
    GPU (the reference kernels are device-agnostic torch code); the results come back to the CPU.
    A case whose reference cannot run there falls back to the CPU evaluation."""
    import torch

    from hal.backends.cpu import KERNELS, float64_evaluation
    from hal.conformance import runner
    dev = torch.device("cuda")
    kernel = KERNELS[case.op]
    try:
        ga = runner.to_device(args, dev)
        gk = {k: runner.to_device(v, dev) for k, v in kwargs.items()}
        with float64_evaluation():
            truth = [t.cpu() for t in runner.flatten_outputs(kernel(*ga, **gk))]
        ref = [t.cpu() for t in runner.flatten_outputs(kernel(*ga, **gk))]
        REFERENCE_DEVICE["cuda"] += 1
        return truth, ref
    except Exception:  # noqa: BLE001 - recorded in the counts; the CPU evaluation is the definition
        REFERENCE_DEVICE["cpu (GPU evaluation failed)"] += 1
        return CPU_REFERENCE(case, args, kwargs)


REFERENCE_DEVICE = {"cuda": 0, "cpu (GPU evaluation failed)": 0}
CPU_REFERENCE = None


def run_conformance(stream: Stream, level: str, ops, report_dir: str, deadline: float) -> bool:
    """Certify the cuda backend at ``level``, streaming each case; True when every case passed."""
    from hal.conformance import environment, reports, runner
    from hal.conformance.cases import catalog
    entry = stream.doc["conformance"][level] = {"status": "running", "started": _now(), "counts": {},
                                                "not_passed": [], "results": []}
    cases = catalog(level, ops)
    entry["total"] = len(cases)
    stream.write()

    def progress(res):
        d = res.to_dict()
        entry["results"].append({k: d.get(k) for k in ("op", "case", "status", "path", "reason", "duration_s")})
        entry["counts"][res.status] = entry["counts"].get(res.status, 0) + 1
        if res.status not in ("PASS", "UNSUPPORTED"):
            entry["not_passed"].append({"op": res.op, "case": res.case, "status": res.status, "reason": res.reason})
        stream.write()
        if remaining(deadline) <= 0:
            raise BudgetExceeded(f"deadline reached during the {level} level")

    run = runner.certify("cuda", level=level, cases=cases, progress=progress)
    report = reports.build_report([run], environment=environment.collect(seed=0, level=level), kind="ops", level=level)
    entry["summary"] = report.get("summary")
    entry["report_files"] = reports.write_reports(report, os.path.join(report_dir, level),
                                                  ("json", "junit", "md", "html"),
                                                  key=reports.report_key(report, "cuda"))
    entry["status"] = "done"
    entry["finished"] = _now()
    stream.write()
    return not entry["not_passed"]


def run_benchmarks(stream: Stream, ops, dry: bool, deadline: float) -> bool:
    """Every hal-cuda benchmark (of ``ops``), each row streamed; True when none raised."""
    from hal.registry import get_registry
    entry = stream.doc["bench"] = {"status": "running", "started": _now(), "results": [], "errors": []}
    rec = get_registry().record("cuda")
    for b in rec.backend.benchmarks():
        if ops and b.op not in ops:
            continue
        if remaining(deadline) <= 0:
            raise BudgetExceeded(f"deadline reached before benchmark {b.name}")
        try:
            for r in b.run(dry=dry):
                entry["results"].append(r.to_dict())
        except BudgetExceeded:
            raise
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not lose the others
            entry["errors"].append({"benchmark": b.name, "error": f"{type(exc).__name__}: {exc}"})
        stream.write()
    entry["status"] = "done"
    entry["finished"] = _now()
    stream.write()
    return not entry["errors"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="hal-cuda's GPU check (see ci/gpu_check.sh)")
    ap.add_argument("--out", required=True, help="folder for gpu-check.json and the reports")
    ap.add_argument("--deadline", type=float, required=True, help="epoch seconds: nothing starts after it")
    ap.add_argument("--budget-s", type=float, default=None, help="the budget the deadline came from (recorded)")
    ap.add_argument("--dry", action="store_true", help="CPU dry run: interpreter, quick level, tiny benchmarks")
    ap.add_argument("--ops", default="", help="only these ops (comma-separated)")
    a = ap.parse_args(argv)
    ops = [o for o in a.ops.split(",") if o] or None
    os.makedirs(a.out, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    stages = ["conformance quick", "benchmarks"] + ([] if a.dry else ["conformance full"])
    stream = Stream(a.out, {"date": _now(), "dry_run": a.dry, "git_commit": commit, "budget_s": a.budget_s,
                            "deadline": datetime.datetime.fromtimestamp(a.deadline, datetime.timezone.utc)
                            .isoformat(timespec="seconds"), "ops": ops, "stages": stages, "stages_done": [],
                            "complete": False, "stopped": None, "conformance": {}, "bench": None})
    import torch

    from hal.registry import get_registry
    rec = get_registry().record("cuda")
    av = rec.availability
    stream.doc.update(device=av.device if av else None, label=rec.label, status=rec.status, reason=rec.reason,
                      versions=dict(av.versions) if av else {})
    stream.write()
    if rec.status != "available":
        stream.doc["stopped"] = f"cuda backend {rec.status}: {rec.reason}"
        stream.write()
        print(stream.doc["stopped"], file=sys.stderr)
        return 1
    global CPU_REFERENCE
    from hal.conformance import runner
    CPU_REFERENCE = runner.reference_outputs
    ok = True
    _arm(a.deadline)
    try:
        for stage in stages:
            if remaining(a.deadline) <= 0:
                raise BudgetExceeded(f"deadline reached before {stage}")
            print(f"== {stage} ({remaining(a.deadline):.0f} s left)", file=sys.stderr)
            if stage == "benchmarks":
                ok &= run_benchmarks(stream, ops, a.dry, a.deadline)
            else:
                level = stage.split()[-1]
                on_gpu = level == "full" and torch.cuda.is_available()
                runner.reference_outputs = gpu_reference_outputs if on_gpu else CPU_REFERENCE
                try:
                    ok &= run_conformance(stream, level, ops, os.path.join(a.out, "conformance"), a.deadline)
                finally:
                    runner.reference_outputs = CPU_REFERENCE
                if on_gpu:
                    stream.doc["conformance"][level]["reference_evaluated_on"] = dict(REFERENCE_DEVICE)
            stream.doc["stages_done"].append(stage)
            stream.write()
        stream.doc["complete"] = True
    except BudgetExceeded as exc:
        stream.doc["stopped"] = f"budget: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for part in list(stream.doc["conformance"].values()) + [stream.doc["bench"] or {}]:
            if part.get("status") == "running":
                part["status"] = "stopped"
        stream.write()
    _print_summary(stream.doc, stream.path)
    if not ok:
        return 1
    return 0 if stream.doc["complete"] else 2


def _print_summary(doc: dict, path: str) -> None:
    """Conformance verdicts, then where the JSON is, then the benchmark table (printed last)."""
    from hal.bench import BenchResult, format_table
    for level, entry in doc["conformance"].items():
        print(f"conformance {level}: {entry['status']}, {entry['counts']} of {entry.get('total')} cases"
              + (f"; not passed: {[(r['op'], r['case']) for r in entry['not_passed']]}" if entry["not_passed"] else ""))
    if doc["stopped"]:
        print(f"stopped: {doc['stopped']}")
    print(f"wrote {path}")
    rows = (doc["bench"] or {}).get("results", [])
    if rows:
        print(format_table([BenchResult(**r) for r in rows]))


if __name__ == "__main__":
    sys.exit(main())
