"""Conformance reports, golden vectors, the onnxruntime check, the CLI and the pytest plugin."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

import hal
from hal.cli import cli
from hal.conformance import environment, reports
from hal.conformance.golden import certify_golden, export
from hal.conformance.onnx_check import check_reference
from hal.conformance.runner import certify

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


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.cells = [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "td" and ("class", "st") in attrs:
            self.cells += 1


def test_html_is_self_contained_with_matrix_and_plots(cpu_report, tmp_path):
    text = Path(reports.write_reports(cpu_report, tmp_path, ["html"])["html"]).read_text()
    p = _Collector()
    p.feed(text)
    assert p.cells == cpu_report["summary"]["total"]            # one coloured cell per op x case
    float_ops = {op for op, s in hal.CONTRACT.items() if any(b.kind in ("float", "fp8") for b in s.outputs.values())}
    assert p.tags.count("svg") == len(float_ops) == 9              # an error-vs-budget plot per float op
    assert "http" not in text.replace("http://www.w3.org/2000/svg", "")   # nothing fetched from outside
    md = Path(reports.write_reports(cpu_report, tmp_path, ["md"])["md"]).read_text()
    assert md.startswith("# HAL conformance report") and "| moe_route |" in md


def test_failed_render_writes_nothing(cpu_report, tmp_path, monkeypatch):
    def broken(report):
        raise RuntimeError("renderer crashed")
    monkeypatch.setitem(reports.WRITERS, "html", broken)
    with pytest.raises(RuntimeError):
        reports.write_reports(cpu_report, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_crash_during_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "conformance.json"
    target.write_text('{"old": "complete"}')

    def exploding_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", exploding_replace)
    with pytest.raises(OSError):
        reports.atomic_write(target, "x" * 100000)
    assert target.read_text() == '{"old": "complete"}'
    assert [p.name for p in tmp_path.iterdir()] == ["conformance.json"]


def test_killed_run_leaves_no_half_report(tmp_path):
    out = tmp_path / "reports"
    proc = subprocess.Popen([sys.executable, "-m", "hal.cli", "conformance", "--backend", "cpu", "--report-dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    files = list(out.iterdir()) if out.exists() else []
    assert not [f for f in files if f.name.endswith(".tmp")]
    for f in files:                                   # anything present is complete
        if f.suffix == ".json":
            json.loads(f.read_text())


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
    assert len(ran) >= 25 and {r["op"] for r in ran} == {"moe_route", "fp8_quantize", "fp8_gemm"}
    assert all(r["status"] == "PASS" for r in ran), [r for r in ran if r["status"] != "PASS"]


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
    res = runner.invoke(cli, ["conformance", "--backend", "all", "--ops", "fp8_quantize_weight", "--json"])
    assert res.exit_code == 0 and "cpu" in {b["backend"] for b in json.loads(res.output)["backends"]}


def test_cli_export_and_golden(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["conformance", "export", "--out", str(tmp_path), "--ops", "fp8_quantize,moe_route"])
    assert res.exit_code == 0, res.output
    assert "onnxruntime check of the reference" in res.output and "FAIL" not in res.output
    res = runner.invoke(cli, ["conformance", "--golden", str(tmp_path), "--backend", "cpu", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["kind"] == "golden"


def test_pytest_plugin_turns_the_catalog_into_tests(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hal-backend", "cpu",
                          "--hal-ops", "fp8_quantize,moe_dispatch"], cwd=tmp_path, capture_output=True, text=True)
    from hal.conformance.cases import catalog
    n = len(catalog("quick", ["fp8_quantize", "moe_dispatch"]))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{n} passed" in out.stdout
