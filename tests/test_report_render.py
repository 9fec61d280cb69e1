"""The HTML report as a browser shows it: it fits 1280 px wide (headless Chromium), and its
error-vs-budget charts have a linear axis with numbers, bars proportional to error / budget."""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hal.conformance import environment, reports
from hal.conformance.runner import certify

SVG = "{http://www.w3.org/2000/svg}"
_MEASURE = ("<script>var d=document.documentElement;var r=0;"
            "document.querySelectorAll('body *').forEach(function(e){r=Math.max(r,e.getBoundingClientRect().right)});"
            "document.body.setAttribute('data-measured',d.scrollWidth+','+d.clientWidth+','+Math.ceil(r));</script>")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    return path


def _chromium_args(tmp_path: Path, profile: str) -> list[str]:
    return [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={tmp_path / profile}", "--window-size=1280,900"]


def measure(page: str, tmp_path: Path, name: str) -> tuple[int, int, int]:
    """(document scrollWidth, clientWidth, right edge of the widest element) of ``page`` in headless
    Chromium at a 1280 x 900 window. A copy of the page gets a measuring script (the report itself
    has none)."""
    f = tmp_path / f"{name}.measure.html"
    f.write_text(page.replace("</body>", _MEASURE + "</body>"))
    out = subprocess.run(_chromium_args(tmp_path, f"profile-{name}") + ["--dump-dom", f.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'data-measured="(\d+),(\d+),(\d+)"', out.stdout)
    assert m, f"chromium printed no measurement (rc {out.returncode}): {out.stderr[-2000:]}"
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def screenshot(page_file: Path, tmp_path: Path, name: str) -> Path:
    png = tmp_path / f"{name}.png"
    subprocess.run(_chromium_args(tmp_path, f"shot-{name}") + [f"--screenshot={png}", page_file.as_uri()],
                   capture_output=True, text=True, timeout=120)
    return png


@pytest.fixture(scope="module")
def cpu_report():
    run = certify("cpu", ops=["fp8_quantize", "sparse_attention", "moe_route"])
    return reports.build_report([run], environment=environment.collect(seed=0, level="quick"), level="quick")


def _hostile(report: dict) -> dict:
    """The cpu report made as wide as reports get: 80 cases in one op, names and reasons without a
    space, failures far outside the budget (1e30 x, inf, nan), a broken plugin, 400 model positions."""
    b = dict(report["backends"][0])
    base = [r for r in b["results"] if r["outputs"]]
    results = []
    for i in range(80):
        r = dict(base[i % len(base)], case=f"case_{i}_" + "x" * (60 if i % 7 == 0 else 4))
        o = dict(r["outputs"][0], name="output_" + "y" * 40)
        if i % 5 == 1:
            r["status"], r["reason"] = "FAIL", "max_abs_error_" + "z" * 300
            o.update(passed=False, max_abs=[1e30, math.inf, math.nan, 3.0][i % 4] * (o["budget_abs"] or 1.0))
        r["outputs"] = [o]
        results.append(r)
    b["results"] = results
    b["plan"] = [dict(p, reason="reason_without_spaces_" + "w" * 250) for p in b["plan"]]
    broken = dict(b, backend="crashy", label="crashy (" + "v" * 120 + ")", status="broken",
                  reason="Traceback_" + "t" * 400, plan=[], results=[])
    model = {"model": "tiny-glm5", "backend": "cpu", "label": "cpu (reference)", "plan": b["plan"][:2],
             "prompts": [[1] * 400], "per_position_top1": [[j % 9 != 0 for j in range(400)], [True] * 3],
             "top1_agreement": 0.9, "kl_max": 0.5, "kl_mean": 0.01, "passed": False, "budget": {"kl_max": 1e-3}}
    env = dict(report["environment"], versions={f"package-{k}": "9" * 60 for k in range(12)},
               platform="Linux-" + "p" * 200)
    return {**report, "environment": env, "backends": [b, broken], "models": [model],
            "summary": {**report["summary"], "passed": False, "backends_broken": ["crashy"]}}


@pytest.mark.parametrize("which", ["cpu", "hostile"])
def test_the_html_report_fits_1280_px(cpu_report, tmp_path, which):
    report = cpu_report if which == "cpu" else _hostile(cpu_report)
    page = reports.to_html(report)
    scroll, client, right = measure(page, tmp_path, which)
    assert client <= 1280 and scroll <= client and right <= client, (scroll, client, right)
    f = tmp_path / f"{which}.html"
    f.write_text(page)
    png = screenshot(f, tmp_path, which)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


def test_the_measurement_sees_an_overflow(tmp_path):
    """The check above can fail: a page wider than the window is measured as such."""
    page = "<!DOCTYPE html><html><body><div style='width:1700px'>wide</div></body></html>"
    scroll, client, right = measure(page, tmp_path, "wide")
    assert scroll > 1280 and right > 1280 and client <= 1280


def _point(case, max_abs, budget_abs, calc_diff=None, budget_cd=None, passed=True, name="out"):
    return {"case": case, "outputs": [{"name": name, "max_abs": max_abs, "budget_abs": budget_abs,
                                       "calc_diff": calc_diff, "budget_calc_diff": budget_cd, "passed": passed}]}


def test_budget_ratios_take_the_worse_metric():
    pts = reports.budget_ratios([
        _point("a", 3.0, 2.0, 1e-6, 1e-5),           # abs 1.5, calc_diff 0.1
        _point("b", 1.0, 4.0, 6e-5, 1e-4),           # abs 0.25, calc_diff 0.6
        _point("c", 0.0, 0.0),                       # zero budget, zero error
        _point("d", 1e-9, 0.0, passed=False),        # zero budget, an error
        _point("e", "nan", 1.0, 0.0, 1.0, passed=False),    # as read back from JSON
        _point("f", "inf", 1.0, passed=False),
        {"case": "g", "outputs": [{"name": "ids", "passed": True}]},    # a selection: nothing to plot
    ])
    got = {label: (ratio, which, ok) for label, ratio, which, ok in pts}
    assert set(got) == {"a:out", "b:out", "c:out", "d:out", "e:out", "f:out"}
    assert got["a:out"] == (1.5, "abs", True) and got["b:out"][1:] == ("calc_diff", True)
    assert got["b:out"][0] == pytest.approx(0.6)
    assert got["c:out"][0] == 0.0 and got["d:out"][0] == math.inf and got["f:out"][0] == math.inf
    assert math.isnan(got["e:out"][0]) and got["e:out"][1] == "abs"


def _bars(svg: str) -> tuple[list[float], list[str], list[str]]:
    root = ET.fromstring(svg)
    widths = [float(r.get("width")) for r in root.iter(f"{SVG}rect")]
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "tick"]
    values = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "value"]
    return widths, ticks, values


def test_the_chart_axis_is_linear_with_numbered_ticks():
    plot_w = 760 - 300
    widths, ticks, values = _bars(reports._svg_plot([_point("a", 0.5, 1.0), _point("b", 0.25, 1.0),
                                                     _point("c", 0.0, 1.0)]))
    assert ticks == ["0", "0.25", "0.5", "0.75", "1"]
    assert widths == pytest.approx([0.5 * plot_w, 0.25 * plot_w, 0.0], abs=0.1)     # proportional, not log
    assert values == ["0.5 (abs)", "0.25 (abs)", "0 (abs)"]
    widths, ticks, _ = _bars(reports._svg_plot([_point("a", 1.7, 1.0, passed=False), _point("b", 0.5, 1.0)]))
    assert ticks == ["0", "0.5", "1", "1.5", "2"] and widths == pytest.approx([0.85 * plot_w, 0.25 * plot_w], abs=0.1)
    svg = reports._svg_plot([_point("a", 1e30, 1.0, passed=False), _point("b", "inf", 1.0, passed=False),
                             _point("c", 2.0, 1.0, passed=False)])
    widths, ticks, values = _bars(svg)
    assert ticks == ["0", "1", "2", "3", "4"]                         # the axis stops at 4 x the budget
    assert widths == pytest.approx([plot_w, plot_w, 0.5 * plot_w], abs=0.1)
    assert values == ["1e+30 (abs) off scale", "inf (abs) off scale", "2 (abs)"]
    assert svg.count("<path") == 2 and 'stroke-dasharray="4"' in svg              # off-scale arrows, budget line
    assert "log" not in svg.lower() and "error / budget (linear" in svg
    assert reports._svg_plot([{"case": "x", "outputs": []}]) == "<p><em>no float outputs to plot</em></p>"
