"""Conformance reports, golden vectors, the onnxruntime check, the CLI and the pytest plugin."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner

import hal
from hal.cli import cli
from hal.conformance import environment, reports
from hal.conformance.golden import certify_golden, export
from hal.conformance.onnx_check import check_exported, check_reference
from hal.conformance.runner import STATUSES, certify

SCHEMA = json.loads(reports.SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def cpu_report():
    run = certify("cpu")
    return reports.build_report([run], environment=environment.collect(seed=0, level="quick"), level="quick")


def test_json_validates_and_carries_the_environment(cpu_report, tmp_path):
    paths = reports.write_reports(cpu_report, tmp_path)
    data = json.loads(Path(paths["json"]).read_text())
    jsonschema.validate(data, SCHEMA)
    env = data["environment"]
    assert env["versions"]["torch"] and env["versions"]["hal"] == hal.__version__ and env["seed"] == 0
    assert data["backends"][0]["plan"] and data["summary"]["passed"]


def test_junit_parses_and_counts_match(cpu_report, tmp_path):
    paths = reports.write_reports(cpu_report, tmp_path, ["junit"])
    root = ET.parse(paths["junit"]).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == cpu_report["summary"]["total"]
    suite = root.find("testsuite")
    assert int(suite.get("tests")) == len(cases) and suite.get("failures") == "0" and suite.get("errors") == "0"
    assert {c.get("classname").split(".")[-1] for c in cases} == set(hal.CONTRACT)


_VOID = {"meta", "br", "line", "rect", "link", "img", "hr", "input"}


class _Collector(HTMLParser):
    """Counts tags and status cells, and checks every element is closed in order."""

    def __init__(self):
        super().__init__()
        self.tags, self.cells, self.open, self.errors, self.colours = [], 0, [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "div" and ("class", "st") in attrs:
            self.cells += 1
            self.colours.append(dict(attrs)["style"])
        if tag not in _VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.open[-1] if self.open else None}>")
        else:
            self.open.pop()


def test_html_is_self_contained_with_matrix_and_plots(cpu_report, tmp_path):
    text = Path(reports.write_reports(cpu_report, tmp_path, ["html"])["html"]).read_text()
    p = _Collector()
    p.feed(text)
    p.close()
    assert not p.errors and not p.open, (p.errors, p.open)                # well-formed
    assert p.cells == cpu_report["summary"]["total"]            # one coloured cell per op x case
    assert set(p.colours) == {f"background:{reports.COLOURS['PASS']}"}
    reported = {r["op"] for b in cpu_report["backends"] for r in b["results"]}
    float_ops = {op for op, s in hal.CONTRACT.items() if op in reported
                 and any(b.kind in ("float", "fp8") for b in s.outputs.values())}
    assert len(float_ops) >= 9
    assert p.tags.count("svg") == len(float_ops)                  # an error-vs-budget plot per float op
    for svg in re.findall(r"<svg.*?</svg>", text, flags=re.S):     # each plot is valid SVG (XML) with bars
        root = ET.fromstring(svg)
        assert root.tag.endswith("svg") and root.findall("{http://www.w3.org/2000/svg}rect")
        ticks = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.get("class") == "tick"]
        assert ticks[0] == "0" and "1" in ticks                      # a numbered linear axis through the budget
    assert "http" not in text.replace("http://www.w3.org/2000/svg", "")   # nothing fetched from outside
    for must in ("torch", "seed", "git commit", "runtime plan", "cpu (reference)"):
        assert must in text, must
    md = Path(reports.write_reports(cpu_report, tmp_path, ["md"])["md"]).read_text()
    assert md.startswith("# HAL conformance report") and "| moe_route |" in md


def test_failed_render_writes_nothing(cpu_report, tmp_path, monkeypatch):
    def broken(report):
        raise RuntimeError("renderer crashed")
    monkeypatch.setitem(reports.WRITERS, "html", broken)
    with pytest.raises(RuntimeError):
        reports.write_reports(cpu_report, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_report_with_failures_and_non_finite_errors_validates(fresh_registry, tmp_path):
    import torch
    from hal.backends.cpu import KERNELS

    def inf_gemm(a, a_scale, b, b_scale, *, out_dtype, bias):
        y = KERNELS["fp8_gemm"](a, a_scale, b, b_scale, out_dtype=out_dtype, bias=bias).clone()
        if y.numel():
            y[0, 0] = 3e38 if out_dtype == torch.float32 else 1e4     # a huge error, not a NaN
        return y

    def boom(*a, **k):
        raise RuntimeError("kernel launch failed")
    backend = hal.Backend("bad_report", kernels={**KERNELS, "fp8_gemm": inf_gemm, "fp8_quantize": boom},
                          capabilities={op: hal.OpCapability("native") for op in KERNELS})
    from hal.registry import get_registry
    get_registry().register_backend(backend)
    try:
        run = certify("bad_report", ops=["fp8_gemm", "fp8_quantize"])
    finally:
        get_registry().unregister("bad_report")
    report = reports.build_report([run], environment=environment.collect(seed=0, level="quick"), level="quick")
    paths = reports.write_reports(report, tmp_path)
    data = json.loads(Path(paths["json"]).read_text())
    jsonschema.validate(data, SCHEMA)
    assert not data["summary"]["passed"] and data["summary"]["counts"]["ERROR"] == len(
        [r for r in run.results if r.op == "fp8_quantize"])
    suite = ET.parse(paths["junit"]).getroot().find("testsuite")
    assert int(suite.get("failures")) == data["summary"]["counts"]["FAIL"] > 0
    assert int(suite.get("errors")) == data["summary"]["counts"]["ERROR"]
    assert "kernel launch failed" in Path(paths["junit"]).read_text()


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    export(d, ops=["moe_dispatch", "lightning_indexer", "fp8_gemm", "fp8_quantize", "moe_experts"])
    return d


def test_golden_layout_and_round_trip(golden):
    manifest = json.loads((golden / "manifest.json").read_text())
    e = next(c for c in manifest["cases"] if c["op"] == "fp8_gemm" and c["case"] == "ragged_bfloat16")
    data = golden / "fp8_gemm" / "ragged_bfloat16" / "test_data_set_0"
    assert (data / "input_0.pb").exists() and (data / "output_0.pb").exists() and e["has_onnx_model"]
    from onnx import TensorProto
    p = TensorProto()
    p.ParseFromString((data / "input_0.pb").read_bytes())
    assert p.data_type == TensorProto.FLOAT8E4M3FN
    run = certify_golden(golden, "cpu")
    assert {r.status for r in run.results} == {"PASS"} and len(run.results) == len(manifest["cases"])


def test_corrupted_vector_is_reported_as_corrupt(golden, tmp_path):
    import shutil
    d = tmp_path / "g"
    shutil.copytree(golden, d)
    victim = d / "moe_dispatch" / "T1_align4" / "test_data_set_0" / "input_0.pb"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    st = {(r.op, r.case): r.status for r in certify_golden(d, "cpu").results}
    assert st[("moe_dispatch", "T1_align4")] == "CORRUPT"
    assert {s for k, s in st.items() if k != ("moe_dispatch", "T1_align4")} == {"PASS"}


def test_onnxruntime_reproduces_the_reference():
    rows = check_reference("quick")
    ran = [r for r in rows if r["status"] != "NOT_EXPRESSIBLE"]
    assert len(ran) >= 30 and {r["op"] for r in ran} == {"moe_route", "fp8_quantize", "fp8_gemm"}
    assert {"grouped_sigmoid", "bf16_grouped"} <= {r["case"] for r in ran if r["op"] == "moe_route"}
    bad = [r for r in ran if not (r["status"] == "PASS" and r["within_budget"] and r["exact"])]
    assert not bad, bad


def test_onnxruntime_runs_the_exported_models_within_budget(tmp_path):
    export(tmp_path, ops=["fp8_gemm", "moe_route"])
    rows = check_exported(tmp_path)
    ran = [r for r in rows if r["status"] != "NOT_EXPRESSIBLE"]
    models = list(tmp_path.glob("*/*/model.onnx"))
    assert len(ran) == len(models) >= 15 and all(r["status"] == "PASS" for r in ran), ran
    # the check can fail: a reference whose stored outputs are wrong disagrees with onnxruntime
    from hal.conformance import tensorproto
    case = tmp_path / "fp8_gemm" / "aligned_float32"
    y = tensorproto.load(case / "test_data_set_0" / "output_0.pb")         # the float64 truth, 1% off in a row
    y[0, :] *= 1.01
    tensorproto.save(y, case / "test_data_set_0" / "output_0.pb", "output_0")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = next(e for e in manifest["cases"] if e["op"] == "fp8_gemm" and e["case"] == "aligned_float32")
    for rel in entry["files"]:                      # re-sign, so it is a wrong vector, not a corrupt one
        entry["files"][rel] = __import__("hashlib").sha256((tmp_path / rel).read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "moe_route" / "small_sigmoid" / "model.onnx").write_bytes(b"not a model")
    st = {(r["op"], r["case"]): r["status"] for r in check_exported(tmp_path)}
    assert st[("fp8_gemm", "aligned_float32")] == "FAIL" and st[("moe_route", "small_sigmoid")] == "CORRUPT"
    assert {s for k, s in st.items() if k not in {("fp8_gemm", "aligned_float32"), ("moe_route", "small_sigmoid")}} \
        <= {"PASS", "NOT_EXPRESSIBLE"}


def test_cli_conformance_json_and_exit_codes(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["conformance", "--backend", "cpu", "--ops", "moe_route,fp8_gemm", "--json",
                              "--report-dir", str(tmp_path), "--format", "json,junit"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["summary"]["passed"] and set(data["report_files"]) == {"json", "junit"}
    assert runner.invoke(cli, ["conformance", "--backend", "nosuch"]).exit_code == 3
    assert runner.invoke(cli, ["conformance", "--backend", "cpu", "--format", "pdf"]).exit_code == 2
    assert runner.invoke(cli, ["conformance", "--backend", "cpu", "--ops", "nope"]).exit_code == 2
    assert runner.invoke(cli, ["conformance"]).exit_code == 2
    res = runner.invoke(cli, ["conformance", "--backend", "all", "--ops", "fp8_quantize_weight", "--json"])
    assert res.exit_code == 0 and "cpu" in {b["backend"] for b in json.loads(res.output)["backends"]}


def test_cli_export_and_golden(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["conformance", "export", "--out", str(tmp_path), "--ops", "fp8_quantize,moe_route"])
    assert res.exit_code == 0, res.output
    assert "onnxruntime check of the reference" in res.output and "FAIL" not in res.output
    res = runner.invoke(cli, ["conformance", "--golden", str(tmp_path), "--backend", "cpu", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["kind"] == "golden"


_FAULTY_PLUGIN_CONFTEST = """
import torch
import hal
from hal.backends.cpu import KERNELS
from hal.registry import get_registry


def gemm(a, a_scale, b, b_scale, *, out_dtype, bias):
    y = KERNELS["fp8_gemm"](a, a_scale, b, b_scale, out_dtype=out_dtype, bias=bias)
    return y * 1.01 if out_dtype == torch.float32 else y          # wrong in the fp32-output cases only


def pytest_configure(config):
    kernels = {**KERNELS, "fp8_gemm": gemm}
    get_registry().register_backend(hal.Backend("vendor", kernels=kernels,
                                                capabilities={op: hal.OpCapability("native") for op in kernels}))
"""


def test_pytest_plugin_turns_the_catalog_into_tests(tmp_path):
    from hal.conformance.cases import catalog
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hal-backend", "cpu",
                          "--hal-ops", "fp8_quantize,moe_dispatch"], cwd=tmp_path, capture_output=True, text=True)
    n = len(catalog("quick", ["fp8_quantize", "moe_dispatch"]))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{n} passed" in out.stdout
    # a vendor's own suite: its conftest registers the backend, one option certifies it
    (tmp_path / "conftest.py").write_text(_FAULTY_PLUGIN_CONFTEST)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hal-backend", "vendor",
                          "--hal-ops", "fp8_gemm"], cwd=tmp_path, capture_output=True, text=True)
    cases = catalog("quick", ["fp8_gemm"])
    wrong = [c for c in cases if c.materialize(0)[1]["out_dtype"] == torch.float32 and not c.name.startswith("M0")]
    assert out.returncode == 1 and f"{len(wrong)} failed, {len(cases) - len(wrong)} passed" in out.stdout, out.stdout
    assert "FAIL [native] fp8_gemm/aligned_float32 on vendor" in out.stdout


def _fake_model_result(name, backend, seed, passed):
    """What hal.models.conformance.compare_model returns (keys and types), with chosen numbers."""
    agree = [[True, True, True, passed], [True, True]]
    n = sum(map(len, agree))
    return {"model": name, "backend": backend, "label": f"{backend} (test)", "seed": seed,
            "plan": [{"op": "moe_route", "backend": backend, "path": "native", "reason": "kernel"}],
            "prompts": [[1, 2, 3, 4], [5, 6]], "per_position_top1": agree,
            "top1_agreement": sum(map(sum, agree)) / n, "kl_max": 1e-5 if passed else 0.7, "kl_mean": 1e-6,
            "passed": passed, "budget": {"top1_min": 0.98, "kl_max": 1e-3}}


@pytest.mark.parametrize("passed", [True, False])
def test_model_conformance_goes_into_every_report(monkeypatch, tmp_path, passed):
    # hal.models.conformance is another module's: here it is replaced so the wiring is what is tested
    import hal.models.conformance as model_conformance
    calls = []

    def compare_model(name_or_path, backend, *, seed=0):
        calls.append((name_or_path, backend, seed))
        return _fake_model_result(name_or_path, backend, seed, passed)
    monkeypatch.setattr(model_conformance, "compare_model", compare_model)
    res = CliRunner().invoke(cli, ["conformance", "--model", "tiny-glm5", "--backend", "cpu", "--seed", "7",
                                   "--report-dir", str(tmp_path), "--json"])
    assert res.exit_code == (0 if passed else 1), res.output
    assert calls == [("tiny-glm5", "cpu", 7)]
    files = reports.latest_reports(tmp_path, "cpu.model")
    data = json.loads(files["json"].read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["kind"] == "model" and data["summary"]["passed"] is passed and data["models"][0]["seed"] == 7
    assert data["summary"]["models_failed"] == (0 if passed else 1)
    md = files["md"].read_text()
    assert "## Model tiny-glm5 on cpu (test)" in md and ("| 0 | 4 | 4/4 | - |" if passed else "| 0 | 4 | 3/4 | 3 |") in md
    p = _Collector()
    page = files["html"].read_text()
    p.feed(page)
    assert page.count("class='pos'") == 6 and p.tags.count("td") >= 4      # one cell per position, plus the plan
    suites = ET.parse(files["junit"]).getroot().findall("testsuite")
    assert [s.get("failures") for s in suites] == ["0" if passed else "1"]


def test_model_conformance_with_an_unknown_backend_exits_3(monkeypatch):
    import hal.models.conformance as model_conformance
    monkeypatch.setattr(model_conformance, "compare_model", lambda *a, **k: pytest.fail("must not run"))
    res = CliRunner().invoke(cli, ["conformance", "--model", "tiny-glm5", "--backend", "nosuch"])
    assert res.exit_code == 3 and "Traceback" not in res.output


# ---- the command line: usage errors, broken plugins, named SKIPPED / CORRUPT lines, extras ----

@pytest.mark.parametrize("args", [[], ["--model", "tiny-glm5"], ["--ops", "fp8_gemm", "--level", "quick"]])
def test_conformance_without_a_backend_is_a_usage_error(args):
    res = CliRunner().invoke(cli, ["conformance", *args])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [res.stderr.strip()] and "missing --backend NAME|all" in res.stderr
    res = CliRunner().invoke(cli, ["conformance", *args, "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["exit_code"] == 2


def test_other_usage_errors_exit_2(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["conformance", "--backend", "cpu", "--golden", str(tmp_path), "--model", "tiny-glm5"])
    assert res.exit_code == 2 and "--golden and --model exclude each other" in res.stderr
    res = runner.invoke(cli, ["conformance", "--backend", "cpu", "--report-dir", str(tmp_path), "--format", ","])
    assert res.exit_code == 2 and "no format given" in res.output
    assert runner.invoke(cli, ["conformance", "--backend", "cpu", "--level", "huge"]).exit_code == 2
    assert runner.invoke(cli, ["conformance", "export"]).exit_code == 2                       # --out missing


def _table(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("backend "))
    return lines[start:]


def test_backend_all_fails_on_a_broken_plugin_and_names_every_skip(fresh_registry, tmp_path):
    from hal.conformance.cases import catalog
    from hal.registry import get_registry

    def crash():
        raise RuntimeError("driver crashed")
    get_registry().register_backend(hal.Backend("crashy", probe=crash))
    get_registry().register_backend(hal.Backend("gone", probe=lambda: hal.Availability(False, "device unplugged")))
    n = len(catalog("quick", ["fp8_quantize_weight"]))
    res = CliRunner().invoke(cli, ["conformance", "--backend", "all", "--ops", "fp8_quantize_weight",
                                   "--report-dir", str(tmp_path)])
    assert res.exit_code == 1, res.output
    lines = res.stdout.splitlines()
    assert "BROKEN crashy: plugin broken: probe raised RuntimeError: driver crashed " \
           "(`hal backends --traceback` shows why)" in lines
    assert f"SKIPPED gone: all {n} cases (fp8_quantize_weight): backend unavailable: device unplugged" in lines
    assert not [line for line in lines if line.startswith("SKIPPED crashy")]
    verdict = next(line for line in lines if line.startswith(("PASSED", "FAILED")))
    assert verdict.startswith("FAILED: PASS ") and verdict.endswith("; broken plugins: crashy")
    header = _table(res.stdout)[0].split()
    assert header[:2] == ["backend", "op"] and header[2:-1] == list(STATUSES) and header[-1] == "path"
    files = reports.latest_reports(tmp_path, "all")
    data = json.loads(files["json"].read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["summary"]["backends_broken"] == ["crashy"] and not data["summary"]["passed"]
    assert data["summary"]["counts"]["FAIL"] == data["summary"]["counts"]["ERROR"] == 0
    junit = ET.parse(files["junit"]).getroot()
    err = [tc for tc in junit.iter("testcase") if tc.get("classname") == "hal.crashy.plugin"]
    assert len(err) == 1 and "driver crashed" in err[0].find("error").get("message")
    assert "broken plugins: crashy" in files["html"].read_text() and "Broken plugins" in files["md"].read_text()
    # an unavailable backend is not a failure: without the broken one, --backend all passes
    get_registry().unregister("crashy")
    res = CliRunner().invoke(cli, ["conformance", "--backend", "all", "--ops", "fp8_quantize_weight", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["summary"]["backends_broken"] == []


def test_table_columns_are_whole_and_aligned():
    res = CliRunner().invoke(cli, ["conformance", "--backend", "cpu", "--ops", "fp8_quantize_weight,moe_combine"])
    assert res.exit_code == 0, res.output
    header, *rows = _table(res.stdout)[:3]
    for status in STATUSES:                            # each count ends exactly under its header
        end = header.index(f" {status} ") + len(status) + 1
        for row in rows:
            assert row[end - 1].isdigit() and row[end] == " ", (status, row)
    assert "SKIPPE " not in header and "CORRUP " not in header


def test_a_corrupt_golden_case_is_named_with_its_reason(golden, tmp_path):
    import shutil
    d = tmp_path / "g"
    shutil.copytree(golden, d)
    victim = d / "moe_dispatch" / "T1_align4" / "test_data_set_0" / "input_0.pb"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    res = CliRunner().invoke(cli, ["conformance", "--golden", str(d), "--backend", "cpu", "--ops", "moe_dispatch"])
    assert res.exit_code == 1
    bad = [line for line in res.stdout.splitlines() if line.startswith(("CORRUPT", "FAIL ", "ERROR"))]
    assert bad == ["CORRUPT cpu moe_dispatch/T1_align4 [native]: golden file "
                   "moe_dispatch/T1_align4/test_data_set_0/input_0.pb fails its SHA-256 checksum (corrupted or edited)"]


@pytest.mark.parametrize("as_json", [False, True])
def test_an_unwritable_report_folder_still_prints_the_results(tmp_path, as_json):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["conformance", "--backend", "cpu", "--ops", "fp8_quantize_weight", "--report-dir", str(blocker / "out")]
    res = CliRunner().invoke(cli, args + (["--json"] if as_json else []))
    assert res.exit_code == 4
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"hal: error: cannot write reports into {blocker}")
    assert "Not a directory" in res.stderr and "Traceback" not in res.output
    if as_json:
        data = json.loads(res.stdout)
        assert data["summary"]["passed"] and data["report_files"] == {} and "Not a directory" in data["report_error"]
    else:
        assert "fp8_quantize_weight" in res.stdout and res.stdout.splitlines()[-1].startswith("PASSED: PASS ")


def test_a_permission_error_while_writing_exits_4_and_leaves_nothing(tmp_path, monkeypatch):
    from hal import atomic

    def denied(*a, **k):                        # the tests run as root, which no folder mode stops
        raise PermissionError(13, "Permission denied", str(tmp_path))
    monkeypatch.setattr(atomic, "make_temporary_dir", denied)
    res = CliRunner().invoke(cli, ["conformance", "--backend", "cpu", "--ops", "fp8_quantize_weight",
                                   "--report-dir", str(tmp_path)])
    assert res.exit_code == 4 and "Permission denied" in res.stderr and "PASSED" in res.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing, args", [
    ("onnx", ["conformance", "export", "--out", "OUT"]),
    ("onnxruntime", ["conformance", "export", "--out", "OUT"]),
    ("onnx", ["conformance", "--golden", "GOLDEN", "--backend", "cpu"]),
])
def test_a_missing_extra_names_the_pip_install(tmp_path, monkeypatch, missing, args):
    monkeypatch.setitem(sys.modules, missing, None)          # `import onnx` now fails as if not installed
    args = [str(tmp_path / "out") if a == "OUT" else str(tmp_path) if a == "GOLDEN" else a for a in args]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and res.stdout == "" and "Traceback" not in res.stderr
    what = "conformance export" if args[1] == "export" else "conformance --golden"
    assert res.stderr.splitlines() == [f"hal: error: hal {what} needs {missing}, not installed: "
                                       "pip install 'hal[conformance]'"]
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(cli, args + ["--json"])
    assert res.exit_code == 2 and "pip install 'hal[conformance]'" in json.loads(res.stdout)["error"]


def test_a_missing_extra_found_only_at_import_gives_the_same_line(tmp_path, monkeypatch):
    from hal.commands import _common
    monkeypatch.setattr(_common, "_importable", lambda module: True)       # the up-front check is fooled
    monkeypatch.setitem(sys.modules, "onnx", None)
    for mod in ("hal.conformance.golden", "hal.conformance.tensorproto", "hal.conformance.onnx_check"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    res = CliRunner().invoke(cli, ["conformance", "export", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.stderr == \
        "hal: error: hal conformance export needs onnx, not installed: pip install 'hal[conformance]'\n"


def test_export_into_an_unwritable_folder_exits_4(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = CliRunner().invoke(cli, ["conformance", "export", "--out", str(blocker / "golden"), "--ops", "fp8_linear"])
    assert res.exit_code == 4 and res.stderr.startswith(f"hal: error: cannot write golden vectors into {blocker}")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output
