"""Report writers: JSON (versioned schema), JUnit XML, Markdown and a self-contained HTML page.

One run's reports are written as a *set* (:func:`write_reports`): all files go into a fresh
hidden folder, which is renamed to its final name ``KEY.run-STAMP-PID-TOKEN/`` once complete; then
the pointer ``KEY.latest.json`` (which names the set's files with their SHA-256) is replaced in one
rename. KEY carries the backend (``cpu``, ``cuda.golden``, ``all``), so runs for different backends
share a folder. A run killed at any moment leaves the previous set as the latest; its leftovers
are removed by the next run that writes into the folder.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from hal import atomic
from hal.conformance.runner import FAILING, STATUSES

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
FORMATS = ("json", "junit", "md", "html")
EXTENSIONS = {"json": ".json", "junit": ".junit.xml", "md": ".md", "html": ".html"}
POINTER_SUFFIX = ".latest.json"
REPORT_SET_VERSION = "1.0"
BROKEN_STATUSES = ("broken", "incompatible")
_SET_NAME = re.compile(r"^(?P<key>[A-Za-z0-9_+.-]+?)\.run-(?P<stamp>\d{8}T\d{6}Z)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")
COLOURS = {"PASS": "#2e7d32", "FAIL": "#c62828", "ERROR": "#6a1b9a", "UNSUPPORTED": "#9e9e9e", "SKIPPED": "#bdbdbd",
           "NONDETERMINISTIC": "#ef6c00", "CORRUPT": "#4e342e"}


def build_report(runs, *, environment: dict, kind: str = "ops", level=None, golden_dir=None, models=None) -> dict:
    """The report document (what the JSON report holds) from BackendRun objects.

    ``summary.passed`` is False when any case FAILed, ERRORed or was CORRUPT, a model failed, or a
    certified backend is broken or incompatible (``summary.backends_broken`` names them: a plugin
    that cannot even load is a failure of ``--backend all``, not a skip)."""
    from hal.contract import CONTRACT_VERSION
    counts = {s: 0 for s in STATUSES}
    for run in runs:
        for s, n in run.counts().items():
            counts[s] += n
    models_failed = sum(not m.get("passed", False) for m in (models or []))
    broken = [r.backend for r in runs if r.status in BROKEN_STATUSES]
    return {
        "schema_version": SCHEMA_VERSION, "kind": kind, "contract_version": CONTRACT_VERSION, "level": level,
        "golden_dir": golden_dir, "environment": environment,
        "summary": {"total": sum(counts.values()), "counts": counts, "models": len(models or []),
                    "models_failed": models_failed, "backends_broken": broken,
                    "passed": not any(counts[s] for s in FAILING) and not models_failed and not broken},
        "backends": [r.to_dict() for r in runs], "models": list(models or []),
    }


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
        broken = int(b["status"] in BROKEN_STATUSES)
        suite = ET.SubElement(root, "testsuite", name=f"hal-conformance[{b['label']}]", tests=str(len(res) + broken),
                              failures=str(sum(r["status"] in ("FAIL", "NONDETERMINISTIC") for r in res)),
                              errors=str(sum(r["status"] in ("ERROR", "CORRUPT") for r in res) + broken),
                              skipped=str(sum(r["status"] in ("SKIPPED", "UNSUPPORTED") for r in res)),
                              time=f"{sum(r['duration_s'] for r in res):.3f}")
        props = ET.SubElement(suite, "properties")
        for k, v in [("label", b["label"]), ("device", b["device"]), ("seed", report["environment"]["seed"]),
                     ("level", report.get("level")), ("git_commit", report["environment"].get("git_commit"))]:
            ET.SubElement(props, "property", name=k, value=str(v))
        if b["status"] in BROKEN_STATUSES:
            tc = ET.SubElement(suite, "testcase", classname=f"hal.{b['backend']}.plugin", name="load", time="0")
            ET.SubElement(tc, "error", message=f"plugin {b['status']}: {b['reason']}", type=b["status"]).text = \
                f"plugin {b['status']}: {b['reason']}"
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
           ""]
    if s.get("backends_broken"):
        out += [f"Broken plugins (a failure): {', '.join(s['backends_broken'])}", ""]
    out += ["## Environment", "", *_env_lines(report), ""]
    for b in report["backends"]:
        out += [f"## {b['label']}", "", f"- status: {b['status']} ({b['reason']})", f"- device: {b['device'] or '-'}", ""]
        if b["plan"]:
            out += ["| op | path | reason |", "|---|---|---|"]
            out += [f"| {p['op']} | {p['path']} | {p['reason']} |" for p in b["plan"]]
            out.append("")
        ops = {}
        for r in b["results"]:
            ops.setdefault(r["op"], []).append(r)
        out += ["| op | " + " | ".join(STATUSES) + " |", "|---|" + "---|" * len(STATUSES)]
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


def _number(v) -> float | None:
    """A report number (a float, or "inf" / "nan" once through JSON) as a float; None if absent."""
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def budget_ratios(results: list) -> list[tuple]:
    """(label, ratio, which, passed) for every judged float output of ``results``: the larger of
    max_abs / budget_abs and calc_diff / budget_calc_diff (``which`` says which one; 1 = at the
    budget). A zero budget gives 0 for a zero error and inf otherwise."""
    points = []
    for r in results:
        for o in r["outputs"]:
            best = None
            for which, err_key, budget_key in (("abs", "max_abs", "budget_abs"),
                                               ("calc_diff", "calc_diff", "budget_calc_diff")):
                err, budget = _number(o.get(err_key)), _number(o.get(budget_key))
                if err is None or budget is None:
                    continue
                if math.isnan(err):
                    ratio = math.nan
                elif budget > 0:
                    ratio = abs(err) / budget
                else:
                    ratio = 0.0 if err == 0 else math.inf
                if best is None or (not math.isnan(best[0]) and (math.isnan(ratio) or ratio > best[0])):
                    best = (ratio, which)                             # NaN counts as the worst
            if best is not None:
                points.append((f"{r['case']}:{o['name']}", best[0], best[1], bool(o.get("passed"))))
    return points


_AXIS_ENDS = (1.0, 1.5, 2.0, 3.0, 4.0)


def _axis(points: list) -> tuple[float, list[float]]:
    """Linear x axis for budget ratios: its end (at least 1, at most 4: larger ratios are drawn
    off scale) and its tick values."""
    finite = [p[1] for p in points if math.isfinite(p[1])]
    top = max(finite, default=0.0)
    end = next((e for e in _AXIS_ENDS if top <= e), _AXIS_ENDS[-1])
    step = 0.25 if end <= 1.5 else 0.5 if end <= 3 else 1.0
    return end, [round(i * step, 6) for i in range(int(round(end / step)) + 1)]


def _fmt_ratio(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if v >= 1e-3 or v == 0 else f"{v:.1e}"


def _svg_plot(results: list) -> str:
    """Error vs budget for one op: a horizontal bar per judged float output of each case, on a
    linear axis of error / budget with numbered ticks and the budget line at 1; bars beyond the
    axis end at its edge with an arrow, every bar's value written beside it."""
    points = budget_ratios(results)
    if not points:
        return "<p><em>no float outputs to plot</em></p>"
    end, ticks = _axis(points)
    w, label_w, x0, x1, row, top = 900, 300, 300, 760, 16, 6
    plot_h = row * len(points)
    h = top + plot_h + 44
    x_of = lambda v: x0 + (x1 - x0) * min(max(v, 0.0), end) / end       # noqa: E731
    axis_y = top + plot_h + 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             f'role="img" class="chart">',
             f"<title>error / budget per output: linear axis 0 to {end:g}, budget at 1</title>"]
    for t in ticks:
        x = x_of(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#ddd"/>')
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 16}" font-size="10" text-anchor="middle" '
                     f'class="tick">{t:g}</text>')
    parts.append(f'<line x1="{x0}" y1="{axis_y}" x2="{x1}" y2="{axis_y}" stroke="#333"/>')
    parts.append(f'<line x1="{x_of(1):.1f}" y1="{top}" x2="{x_of(1):.1f}" y2="{axis_y}" stroke="#c62828" '
                 f'stroke-dasharray="4"/>')
    parts.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{axis_y + 32}" font-size="11" text-anchor="middle">'
                 f'error / budget (linear; 1 = the budget, dashed red line)</text>')
    for i, (label, ratio, which, ok) in enumerate(points):
        y = top + i * row
        colour = "#2e7d32" if ok else "#c62828"
        off = not (ratio <= end)
        bar = x_of(end if off else ratio) - x0
        parts.append(f'<text x="{label_w - 6}" y="{y + 11}" font-size="10" text-anchor="end">'
                     f'{html.escape(label if len(label) <= 46 else label[:45] + "~")}</text>')
        parts.append(f'<rect x="{x0}" y="{y + 2}" width="{bar:.1f}" height="11" fill="{colour}">'
                     f'<title>{html.escape(label)}: {_fmt_ratio(ratio)} x budget ({which})</title></rect>')
        if off:
            parts.append(f'<path d="M{x1} {y + 1} l8 6.5 l-8 6.5 z" fill="{colour}"/>')
        parts.append(f'<text x="{x1 + 12}" y="{y + 11}" font-size="10" class="value">{_fmt_ratio(ratio)} '
                     f'({which}){" off scale" if off else ""}</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = ("*{box-sizing:border-box}body{font-family:sans-serif;margin:16px;max-width:1248px;overflow-wrap:anywhere}"
        "h1{font-size:22px}table{border-collapse:collapse;margin:1em 0;max-width:100%}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px;overflow-wrap:anywhere;text-align:left}"
        "li{overflow-wrap:anywhere}.row{display:flex;gap:6px;margin:4px 0;align-items:flex-start}"
        ".opname{flex:0 0 150px;font-weight:bold;font-size:12px;overflow-wrap:anywhere}"
        ".cells{display:flex;flex-wrap:wrap;gap:2px;flex:1 1 auto;min-width:0}"
        ".st{color:#fff;font-size:11px;padding:2px 4px;text-align:center;max-width:220px;overflow-wrap:anywhere}"
        ".pos{width:10px;height:14px}svg.chart{max-width:100%;height:auto;display:block}")


def to_html(report: dict) -> str:
    """The self-contained page (no scripts, no external resources): status matrix, charts, plan.
    Laid out to fit 1280 px wide: cells wrap, tables and charts shrink to the page."""
    s = report["summary"]
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>"
           "<meta name='viewport' content='width=device-width'><title>HAL conformance</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>HAL conformance report: {'PASSED' if s['passed'] else 'FAILED'}</h1>",
           "<p>" + ", ".join(f"{k}: {v}" for k, v in s["counts"].items() if v) + "</p>"]
    if s.get("backends_broken"):
        out.append(f"<p>broken plugins: {html.escape(', '.join(s['backends_broken']))}</p>")
    out.append("<h2>Environment</h2><ul>" + "".join(f"<li>{html.escape(line[2:])}</li>"
                                                    for line in _env_lines(report)) + "</ul>")
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
        out.append("<h3>op x case matrix</h3><div class='matrix'>")
        for op, rs in ops.items():
            cells = "".join(
                f"<div class='st' style='background:{COLOURS[r['status']]}' title='{html.escape(r['case'])} "
                f"[{html.escape(r['path'])}]: {html.escape(r['reason'])}'>{html.escape(r['case'])}<br>{r['status']}"
                + (f" <small>({html.escape(r['path'])})</small>" if r["path"] not in ("native", "-") else "")
                + "</div>" for r in rs)
            out.append(f"<div class='row'><div class='opname'>{html.escape(op)}</div><div class='cells'>{cells}"
                       "</div></div>")
        out.append("</div><h3>error vs budget per op</h3>")
        for op, rs in ops.items():
            out.append(f"<h4>{html.escape(op)}</h4>{_svg_plot(rs)}")
    for m in report.get("models", []):
        out.append(_model_html(m))
    out.append("</body></html>")
    return "\n".join(out)


def _model_html(m: dict) -> str:
    """A model's section: verdict, per-position top-1 agreement (one coloured cell per token), plan."""
    status = "PASS" if m.get("passed") else "FAIL"
    out = [f"<h2>Model {html.escape(str(m.get('model')))} on {html.escape(str(m.get('label')))}</h2>",
           f"<p class='model' style='color:{COLOURS[status]}'><b>{status}</b>: {html.escape(_model_line(m))}</p>",
           "<h3>top-1 agreement per position</h3><div class='matrix'>"]
    for i, row in enumerate(m.get("per_position_top1", [])):
        cells = "".join(f"<div class='pos' style='background:{COLOURS['PASS' if ok else 'FAIL']}' "
                        f"title='position {j}: {'agree' if ok else 'disagree'}'></div>" for j, ok in enumerate(row))
        out.append(f"<div class='row'><div class='opname'>prompt {i}</div><div class='cells'>{cells}</div></div>")
    out.append("</div>")
    if m.get("plan"):
        out.append("<table><tr><th>op</th><th>backend</th><th>path</th><th>reason</th></tr>" + "".join(
            f"<tr><td>{html.escape(str(p.get('op')))}</td><td>{html.escape(str(p.get('label') or p.get('backend')))}"
            f"</td><td>{html.escape(str(p.get('path')))}</td><td>{html.escape(str(p.get('reason', '')))}</td></tr>"
            for p in m["plan"]) + "</table>")
    return "".join(out)


WRITERS = {"json": to_json, "junit": to_junit, "md": to_markdown, "html": to_html}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_+-]", "_", str(name)) or "_"


def report_key(report: dict, backend: str | None = None) -> str:
    """The name a report set is filed under: the backend (``backend`` if given, else the report's
    backends or model backends, several joined by "+"), then ``.golden`` / ``.model`` for those
    kinds. Only ``[A-Za-z0-9_+-]`` survive in the backend part; others become "_"."""
    if backend is None:
        names = [b["backend"] for b in report.get("backends", [])] or \
                [str(m.get("backend")) for m in report.get("models", [])] or ["none"]
        backend = "+".join(dict.fromkeys(names))
    kind = report.get("kind", "ops")
    return _safe(backend) + ("" if kind == "ops" else f".{_safe(kind)}")


def file_name(key: str, fmt: str) -> str:
    """``conformance-KEY.json`` / ``.junit.xml`` / ``.md`` / ``.html``."""
    return f"conformance-{key}{EXTENSIONS[fmt]}"


def pointer_path(report_dir, key: str) -> Path:
    """``REPORT_DIR/KEY.latest.json``: names the latest complete set of ``key``."""
    return Path(report_dir) / f"{key}{POINTER_SUFFIX}"


def read_pointer(report_dir, key: str) -> dict | None:
    """The pointer of ``key`` as written by :func:`write_reports`, or None when there is none.
    Raises ValueError when it exists but is not a pointer document."""
    try:
        doc = json.loads(pointer_path(report_dir, key).read_text())
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict) or doc.get("report_set_version") != REPORT_SET_VERSION or "set" not in doc:
        raise ValueError(f"{pointer_path(report_dir, key)}: not a report-set pointer of version {REPORT_SET_VERSION}")
    return doc


def latest_reports(report_dir, key: str) -> dict:
    """format -> Path of the latest complete report set of ``key`` in ``report_dir``.
    Raises FileNotFoundError when no run of ``key`` has completed there."""
    doc = read_pointer(report_dir, key)
    if doc is None:
        raise FileNotFoundError(f"no complete report set for {key!r} in {report_dir}")
    return {fmt: Path(report_dir) / rel for fmt, rel in doc["files"].items()}


def clean_report_dir(report_dir) -> list[str]:
    """Remove what killed runs left in ``report_dir``: temporary files and unfinished set folders
    of processes no longer running, and complete sets that their key's pointer does not name
    (superseded, or finished by a run killed before it switched the pointer) whose writer is gone
    or is this process. A set whose pointer cannot be read is kept. Returns the names removed."""
    folder = Path(report_dir)
    removed = atomic.remove_stale_temporaries(folder)
    pointers: dict = {}
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _SET_NAME.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink():
            continue
        key, pid = m.group("key"), int(m.group("pid"))
        if key not in pointers:
            try:
                doc = read_pointer(folder, key)
                pointers[key] = doc["set"] if doc else None
            except (OSError, ValueError):
                pointers[key] = entry.name          # unreadable pointer: keep every set of this key
                continue
        if pointers[key] == entry.name or (pid != os.getpid() and atomic.pid_alive(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


def _stage(folder: Path, set_name: str, files: dict) -> Path:
    """Every file of the set into a fresh hidden folder, each fsynced; returns that folder."""
    staging = atomic.make_temporary_dir(folder, set_name)
    try:
        for name, data in files.items():
            atomic.write_bytes(staging / name, data, clean_stale=False)
        atomic.fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _publish(folder: Path, staging: Path, set_name: str) -> Path:
    """The complete staging folder renamed to its final name (not yet the latest)."""
    final = folder / set_name
    try:
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic.fsync_dir(folder)
    return final


def _switch_pointer(folder: Path, key: str, pointer: dict) -> None:
    """Make the new set the latest: one atomic replace of ``KEY.latest.json``."""
    atomic.write_text(pointer_path(folder, key), json.dumps(pointer, indent=2) + "\n")


def write_reports(report: dict, report_dir, formats=FORMATS, *, key: str | None = None) -> dict:
    """Write the chosen formats of ``report`` into ``report_dir`` as one set; returns format -> path.

    Layout: ``REPORT_DIR/KEY.run-STAMP-PID-TOKEN/conformance-KEY.<ext>`` plus the pointer
    ``REPORT_DIR/KEY.latest.json`` (``key`` defaults to :func:`report_key`). Everything is rendered
    before anything is written (a renderer that raises writes nothing); the set is complete and
    fsynced before the pointer names it, and the pointer switches in one rename, so a run killed at
    any moment leaves the previous set as the latest. Leftovers of killed runs and superseded sets
    are removed (:func:`clean_report_dir`). Files get ``0o666`` minus the umask, folders
    ``0o777`` minus the umask. Raises OSError when the folder cannot be created or written.
    """
    unknown = [f for f in formats if f not in WRITERS]
    if unknown:
        raise ValueError(f"write_reports: formats: expected some of {', '.join(FORMATS)}, got {', '.join(unknown)}")
    key = key if key is not None else report_key(report)
    if not re.fullmatch(r"[A-Za-z0-9_+-]+(\.[A-Za-z0-9_+-]+)?", key):
        raise ValueError(f"write_reports: key: expected a backend name of [A-Za-z0-9_+-] and an optional "
                         f"'.kind', got {key!r}")
    rendered = {fmt: WRITERS[fmt](report).encode("utf-8") for fmt in formats}   # render all before writing any
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    clean_report_dir(folder)
    set_name = f"{key}.run-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}-{os.urandom(4).hex()}"
    files = {file_name(key, fmt): data for fmt, data in rendered.items()}
    staging = _stage(folder, set_name, files)
    _publish(folder, staging, set_name)
    pointer = {"report_set_version": REPORT_SET_VERSION, "key": key, "set": set_name,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kind": report.get("kind"),
               "passed": report.get("summary", {}).get("passed"),
               "files": {fmt: f"{set_name}/{file_name(key, fmt)}" for fmt in rendered},
               "sha256": {fmt: hashlib.sha256(data).hexdigest() for fmt, data in rendered.items()}}
    _switch_pointer(folder, key, pointer)
    clean_report_dir(folder)
    return {fmt: str(folder / rel) for fmt, rel in pointer["files"].items()}
