"""Report writers: JSON (versioned schema), JUnit XML, Markdown and a self-contained HTML page.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so a
crashed or killed run never leaves a half-written report.
"""
from __future__ import annotations

import html
import json
import math
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from hal.conformance.runner import FAILING, STATUSES

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
FORMATS = ("json", "junit", "md", "html")
FILENAMES = {"json": "conformance.json", "junit": "conformance.junit.xml", "md": "conformance.md",
             "html": "conformance.html"}
COLOURS = {"PASS": "#2e7d32", "FAIL": "#c62828", "ERROR": "#6a1b9a", "UNSUPPORTED": "#9e9e9e", "SKIPPED": "#bdbdbd",
           "NONDETERMINISTIC": "#ef6c00", "CORRUPT": "#4e342e"}


def build_report(runs, *, environment: dict, kind: str = "ops", level=None, golden_dir=None, models=None) -> dict:
    """The report document (what conformance.json holds) from BackendRun objects."""
    from hal.contract import CONTRACT_VERSION
    counts = {s: 0 for s in STATUSES}
    for run in runs:
        for s, n in run.counts().items():
            counts[s] += n
    models_failed = sum(not m.get("passed", False) for m in (models or []))
    return {
        "schema_version": SCHEMA_VERSION, "kind": kind, "contract_version": CONTRACT_VERSION, "level": level,
        "golden_dir": golden_dir, "environment": environment,
        "summary": {"total": sum(counts.values()), "counts": counts, "models": len(models or []),
                    "models_failed": models_failed,
                    "passed": not any(counts[s] for s in FAILING) and not models_failed},
        "backends": [r.to_dict() for r in runs], "models": list(models or []),
    }


_UMASK = None


def _file_mode() -> int:
    """0o666 minus the process umask: what ``open(path, "w")`` would give (mkstemp gives 0o600)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Delete temporary files left by writers that were killed (``.NAME.PID.XXXX.tmp`` whose PID
    is no longer running); a live writer's temporary file is left alone. Returns what was removed."""
    removed = []
    for f in Path(folder).glob(".*.tmp"):
        parts = f.name.split(".")
        pid = next((int(p) for p in reversed(parts[:-2]) if p.isdigit()), None)
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            try:
                f.unlink()
                removed.append(f.name)
            except OSError:
                pass
    return removed


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either untouched or complete: a temporary
    file in the same folder (``.NAME.PID.XXXX.tmp``), flushed (and fsynced when ``durable``, so a
    power loss cannot leave an empty file either), then ``os.replace``. A writer killed midway
    leaves only its temporary file, which the next write into that folder removes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str, allow_nan=False) if _finite(report) else \
        json.dumps(_jsonable(report), indent=2, default=str)


def _finite(obj) -> bool:
    try:
        json.dumps(obj, allow_nan=False, default=str)
        return True
    except ValueError:
        return False


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def to_junit(report: dict) -> str:
    """One <testsuite> per backend, one <testcase> per op x case (classname hal.<backend>.<op>)."""
    root = ET.Element("testsuites", name="hal-conformance")
    for b in report["backends"]:
        res = b["results"]
        suite = ET.SubElement(root, "testsuite", name=f"hal-conformance[{b['label']}]", tests=str(len(res)),
                              failures=str(sum(r["status"] in ("FAIL", "NONDETERMINISTIC") for r in res)),
                              errors=str(sum(r["status"] in ("ERROR", "CORRUPT") for r in res)),
                              skipped=str(sum(r["status"] in ("SKIPPED", "UNSUPPORTED") for r in res)),
                              time=f"{sum(r['duration_s'] for r in res):.3f}")
        props = ET.SubElement(suite, "properties")
        for k, v in [("label", b["label"]), ("device", b["device"]), ("seed", report["environment"]["seed"]),
                     ("level", report.get("level")), ("git_commit", report["environment"].get("git_commit"))]:
            ET.SubElement(props, "property", name=k, value=str(v))
        for r in res:
            tc = ET.SubElement(suite, "testcase", classname=f"hal.{b['backend']}.{r['op']}", name=r["case"],
                               time=f"{r['duration_s']:.3f}")
            msg = f"[{r['path']}] {r['reason']}"
            if r["status"] in ("FAIL", "NONDETERMINISTIC"):
                ET.SubElement(tc, "failure", message=msg, type=r["status"]).text = msg
            elif r["status"] in ("ERROR", "CORRUPT"):
                ET.SubElement(tc, "error", message=msg, type=r["status"]).text = r.get("traceback") or msg
            elif r["status"] in ("SKIPPED", "UNSUPPORTED"):
                ET.SubElement(tc, "skipped", message=f"{r['status']}: {msg}")
    for m in report.get("models", []):
        suite = ET.SubElement(root, "testsuite", name=f"hal-model[{m.get('model')} on {m.get('label')}]", tests="1",
                              failures=str(int(not m.get("passed", False))), errors="0", skipped="0")
        tc = ET.SubElement(suite, "testcase", classname=f"hal.model.{m.get('backend')}", name=str(m.get("model")))
        if not m.get("passed", False):
            ET.SubElement(tc, "failure", message=_model_line(m)).text = _model_line(m)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def _model_line(m: dict) -> str:
    return (f"top-1 agreement {m.get('top1_agreement', 0):.4f}, KL max {m.get('kl_max', float('nan')):.3g}, "
            f"mean {m.get('kl_mean', float('nan')):.3g} (budget {m.get('budget')})")


def _env_lines(report: dict) -> list[str]:
    env = report["environment"]
    return [f"- date: {env['date']}", f"- seed: {env['seed']}, level: {report.get('level')}",
            f"- git commit: {env.get('git_commit') or 'unknown'}",
            f"- python {env['python']} on {env['platform']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())]


def to_markdown(report: dict) -> str:
    s = report["summary"]
    out = [f"# HAL conformance report ({report['kind']})", "",
           f"**{'PASSED' if s['passed'] else 'FAILED'}**: " + ", ".join(f"{k} {v}" for k, v in s["counts"].items() if v),
           "", "## Environment", "", *_env_lines(report), ""]
    for b in report["backends"]:
        out += [f"## {b['label']}", "", f"- status: {b['status']} ({b['reason']})", f"- device: {b['device'] or '-'}", ""]
        if b["plan"]:
            out += ["| op | path | reason |", "|---|---|---|"]
            out += [f"| {p['op']} | {p['path']} | {p['reason']} |" for p in b["plan"]]
            out.append("")
        ops = {}
        for r in b["results"]:
            ops.setdefault(r["op"], []).append(r)
        out += ["| op | PASS | FAIL | ERROR | UNSUPPORTED | SKIPPED | NONDET | CORRUPT |",
                "|---|---|---|---|---|---|---|---|"]
        for op, rs in ops.items():
            c = {st: sum(r["status"] == st for r in rs) for st in STATUSES}
            out.append(f"| {op} | " + " | ".join(str(c[st]) for st in STATUSES) + " |")
        out.append("")
        for op, rs in ops.items():
            out += [f"### {op}", "", "| case | status | path | worst calc_diff / budget | detail |", "|---|---|---|---|---|"]
            for r in rs:
                ratio = _worst_ratio(r)
                out.append(f"| {r['case']} | {r['status']} | {r['path']} | {ratio} | {r['reason'].replace('|', '/')} |")
            out.append("")
    for m in report.get("models", []):
        out += [f"## Model {m.get('model')} on {m.get('label')}", "", f"**{'PASS' if m.get('passed') else 'FAIL'}**: "
                + _model_line(m), "", "| prompt | tokens | top-1 agreement | first disagreement |", "|---|---|---|---|"]
        for i, row in enumerate(m.get("per_position_top1", [])):
            first = next((str(j) for j, ok in enumerate(row) if not ok), "-")
            out.append(f"| {i} | {len(row)} | {sum(row)}/{len(row)} | {first} |")
        out.append("")
        if m.get("plan"):
            out += ["| op | backend | path | reason |", "|---|---|---|---|"]
            out += [f"| {p.get('op')} | {p.get('label') or p.get('backend')} | {p.get('path')} | "
                    f"{str(p.get('reason', '')).replace('|', '/')} |" for p in m["plan"]]
            out.append("")
    return "\n".join(out) + "\n"


def _worst_ratio(r: dict) -> str:
    vals = [(o["calc_diff"], o["budget_calc_diff"]) for o in r["outputs"]
            if o.get("calc_diff") is not None and o.get("budget_calc_diff")]
    if not vals:
        return "-"
    cd, b = max(vals, key=lambda v: v[0] / v[1] if v[1] else 0)
    return f"{cd:.2e} / {b:.2e}"


def _svg_plot(results: list) -> str:
    """Error vs budget for one op: one bar per float output of each case, log-scaled ratio."""
    points = []
    for r in results:
        for o in r["outputs"]:
            if o.get("budget_abs") is not None and o.get("max_abs") is not None:
                ratio = o["max_abs"] / o["budget_abs"] if o["budget_abs"] > 0 else (0.0 if o["max_abs"] == 0 else 1e9)
                points.append((f"{r['case']}:{o['name']}", ratio, o["passed"]))
    if not points:
        return "<p><em>no float outputs to plot</em></p>"
    w, row = 560, 16
    h = row * len(points) + 30
    x_of = lambda ratio: 200 + max(0.0, min(1.0, (math.log10(max(ratio, 1e-6)) + 6) / 7)) * (w - 220)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
             f'<line x1="{x_of(1):.1f}" y1="0" x2="{x_of(1):.1f}" y2="{h - 20}" stroke="#c62828" stroke-dasharray="4"/>',
             f'<text x="{x_of(1) + 3:.1f}" y="{h - 6}" font-size="10">budget</text>']
    for i, (name, ratio, ok) in enumerate(points):
        y = 10 + i * row
        parts.append(f'<text x="0" y="{y + 9}" font-size="10">{html.escape(name[:34])}</text>')
        parts.append(f'<rect x="200" y="{y}" width="{x_of(ratio) - 200:.1f}" height="10" '
                     f'fill="{"#2e7d32" if ok else "#c62828"}"><title>{ratio:.3g} x budget</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(report: dict) -> str:
    s = report["summary"]
    css = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
           "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px}td.st{color:#fff;text-align:center}")
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>HAL conformance</title>",
           f"<style>{css}</style></head><body>",
           f"<h1>HAL conformance report: {'PASSED' if s['passed'] else 'FAILED'}</h1>",
           "<p>" + ", ".join(f"{k}: {v}" for k, v in s["counts"].items() if v) + "</p>",
           "<h2>Environment</h2><ul>" + "".join(f"<li>{html.escape(line[2:])}</li>" for line in _env_lines(report))
           + "</ul>"]
    for b in report["backends"]:
        out.append(f"<h2>{html.escape(b['label'])}</h2><p>status: {html.escape(b['status'])} "
                   f"({html.escape(b['reason'])}); device: {html.escape(b['device'] or '-')}</p>")
        if b["plan"]:
            out.append(f"<h3>runtime plan (fallback policy: {html.escape(b.get('fallback', 'error'))})</h3>"
                       "<table><tr><th>op</th><th>runs on</th><th>path</th><th>reason</th></tr>" + "".join(
                           f"<tr><td>{html.escape(p['op'])}</td><td>{html.escape(p.get('label') or p['backend'])}</td>"
                           f"<td>{html.escape(p['path'])}</td><td>{html.escape(p['reason'])}</td></tr>"
                           for p in b["plan"]) + "</table>")
        ops = {}
        for r in b["results"]:
            ops.setdefault(r["op"], []).append(r)
        out.append("<h3>op x case matrix</h3><table>")
        for op, rs in ops.items():
            cells = "".join(
                f"<td class='st' style='background:{COLOURS[r['status']]}' title='{html.escape(r['case'])} "
                f"[{html.escape(r['path'])}]: {html.escape(r['reason'])}'>{html.escape(r['case'])}<br>{r['status']}"
                + (f" <small>({html.escape(r['path'])})</small>" if r["path"] not in ("native", "-") else "")
                + "</td>" for r in rs)
            out.append(f"<tr><th>{op}</th>{cells}</tr>")
        out.append("</table><h3>error vs budget per op</h3>")
        for op, rs in ops.items():
            out.append(f"<h4>{op}</h4>{_svg_plot(rs)}")
    for m in report.get("models", []):
        out.append(_model_html(m))
    out.append("</body></html>")
    return "\n".join(out)


def _model_html(m: dict) -> str:
    """A model's section: verdict, per-position top-1 agreement (one coloured cell per token), plan."""
    status = "PASS" if m.get("passed") else "FAIL"
    out = [f"<h2>Model {html.escape(str(m.get('model')))} on {html.escape(str(m.get('label')))}</h2>",
           f"<p class='model' style='color:{COLOURS[status]}'><b>{status}</b>: {html.escape(_model_line(m))}</p>",
           "<h3>top-1 agreement per position</h3><table>"]
    for i, row in enumerate(m.get("per_position_top1", [])):
        cells = "".join(f"<td class='pos' style='background:{COLOURS['PASS' if ok else 'FAIL']}' title='position {j}'>"
                        "</td>" for j, ok in enumerate(row))
        out.append(f"<tr><th>prompt {i}</th>{cells}</tr>")
    out.append("</table>")
    if m.get("plan"):
        out.append("<table><tr><th>op</th><th>backend</th><th>path</th><th>reason</th></tr>" + "".join(
            f"<tr><td>{html.escape(str(p.get('op')))}</td><td>{html.escape(str(p.get('label') or p.get('backend')))}"
            f"</td><td>{html.escape(str(p.get('path')))}</td><td>{html.escape(str(p.get('reason', '')))}</td></tr>"
            for p in m["plan"]) + "</table>")
    return "".join(out)


WRITERS = {"json": to_json, "junit": to_junit, "md": to_markdown, "html": to_html}


def write_reports(report: dict, report_dir, formats=FORMATS) -> dict:
    """Write the chosen formats into ``report_dir`` atomically; returns format -> path."""
    paths = {}
    rendered = {fmt: WRITERS[fmt](report) for fmt in formats}      # render everything before writing anything
    for fmt, text in rendered.items():
        path = Path(report_dir) / FILENAMES[fmt]
        atomic_write(path, text)
        paths[fmt] = str(path)
    return paths
