"""The core CLI commands through click's test runner: --version, backends, ops, doctor, bench."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import hal
from hal.cli import COMMANDS, cli


@pytest.fixture
def runner():
    return CliRunner()


def test_version(runner):
    res = runner.invoke(cli, ["--version"])
    assert res.exit_code == 0 and hal.__version__ in res.output and hal.CONTRACT_VERSION in res.output


def test_help_lists_every_command(runner):
    res = runner.invoke(cli, ["--help"])
    assert res.exit_code == 0
    for name in COMMANDS:
        assert name in res.output


def test_backends_json(runner):
    res = runner.invoke(cli, ["backends", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    cpu = rows["cpu"]
    assert cpu["status"] == "available" and cpu["device_type"] == "cpu"
    assert set(cpu["ops"]) == set(hal.CONTRACT) and {o["path"] for o in cpu["ops"].values()} == {"native"}
    assert "torch" in cpu["versions"]


def test_backends_human(runner):
    res = runner.invoke(cli, ["backends"])
    assert res.exit_code == 0 and "cpu" in res.output and "available" in res.output and "native:" in res.output


def test_ops_json_and_doc(runner):
    res = runner.invoke(cli, ["ops", "--json"])
    data = json.loads(res.output)
    assert data["contract_version"] == hal.CONTRACT_VERSION
    assert [o["op"] for o in data["ops"]] == list(hal.CONTRACT)
    assert all(o["signature"].startswith(o["op"] + "(") and o["summary"] for o in data["ops"])
    res = runner.invoke(cli, ["ops", "--doc", "fp8_gemm"])
    assert res.exit_code == 0 and "a_scale" in res.output and "ceil(K/128)" in res.output
    res = runner.invoke(cli, ["ops", "--doc", "no_such_op"])
    assert res.exit_code == 2 and "unknown op" in res.output


def test_doctor_json(runner):
    res = runner.invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["packages"]["torch"] and data["contract_version"] == hal.CONTRACT_VERSION
    assert any(b["name"] == "cpu" for b in data["backends"])


def test_bench_overhead_json(runner):
    res = runner.invoke(cli, ["bench", "overhead", "--op", "fp8_quantize", "--op", "moe_route", "--number", "50",
                              "--repeat", "3", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["results"]
    assert [r["op"] for r in rows] == ["fp8_quantize", "moe_route"]
    for r in rows:
        assert r["runtime_us"] > 0 and r["runtime_novalidate_us"] > 0 and r["goal_us"] == 2.0
        assert r["goal_met"] == (r["validation_us"] <= 2.0)
        assert r["tensors"] == {"fp8_quantize": 1, "moe_route": 2}[r["op"]]     # x; logits and bias
        assert r["guard_us"] > 0
    res = runner.invoke(cli, ["bench", "overhead", "--op", "nope"])
    assert res.exit_code == 2


def test_bench_backend_errors(runner):
    res = runner.invoke(cli, ["bench", "--backend", "nosuch", "--json"])
    assert res.exit_code == 3
    assert json.loads(res.output)["status"] == "unknown"
    res = runner.invoke(cli, ["bench", "--backend", "cpu"])
    assert res.exit_code == 0 and "ships no benchmarks" in res.output


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "hal.cli", "ops", "--json"], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["ops"]
