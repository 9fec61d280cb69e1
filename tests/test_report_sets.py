"""hal.atomic (the one atomic file writer) and conformance report sets: written as a set, switched
in by one rename, shared by backends, cleaned after kills, readable modes, unwritable folders."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from hal import atomic
from hal.cli import cli
from hal.conformance import environment, reports
from hal.conformance.runner import certify


@pytest.fixture
def umask():
    """Set a umask for the test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


# ---- hal.atomic ------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o002, 0o664, 0o775)])
def test_modes_come_from_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    f = atomic.write_text(tmp_path / "a.txt", "hello")
    assert f.read_text() == "hello" and _mode(f) == file_mode
    d = atomic.make_temporary_dir(tmp_path, "set")
    assert _mode(d) == dir_mode and d.name.startswith(".set.") and d.name.endswith(".tmp")
    assert atomic.temporary_owner(d.name) == os.getpid()


def test_replace_keeps_the_old_file_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "r.json"
    atomic.write_text(target, "old")
    atomic.write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"new" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_failure_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, where):
    target = tmp_path / "conformance.json"
    target.write_text('{"old": "complete"}')

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, where, boom)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(target, "x" * 100000)
    assert target.read_text() == '{"old": "complete"}'
    assert [p.name for p in tmp_path.iterdir()] == ["conformance.json"]


def test_missing_folder_and_bad_data_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic.write_text(tmp_path / "missing" / "x.txt", "x")
    assert not (tmp_path / "missing").exists()
    assert atomic.write_text(tmp_path / "made" / "x.txt", "x", parents=True).read_text() == "x"
    with pytest.raises(TypeError, match="write_bytes: data: expected bytes, got str"):
        atomic.write_bytes(tmp_path / "y", "text")
    with pytest.raises(TypeError, match="write_text: text: expected str, got bytes"):
        atomic.write_text(tmp_path / "y", b"bytes")


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    names = {f".r.json.{dead}.0123abcd.tmp": True, f".r.json.{alive}.0123abcd.tmp": False,
             f".r.json.{os.getpid()}.0123abcd.tmp": False, f".r.json.{dead}.notours.tmp": False,
             "r.json": False, f"r.json.{dead}.0123abcd.tmp": False}
    for n in names:
        (tmp_path / n).write_text("partial")
    (tmp_path / f".set.{dead}.89abcdef.tmp").mkdir()                 # a killed run's staging folder
    (tmp_path / f".set.{dead}.89abcdef.tmp" / "conformance-cpu.json").write_text("{")
    removed = atomic.remove_stale_temporaries(tmp_path)
    assert removed == sorted([n for n, gone in names.items() if gone] + [f".set.{dead}.89abcdef.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, gone in names.items() if not gone)
    # the next write into the folder does the same
    (tmp_path / f".x.{dead}.00000000.tmp").write_text("partial")
    atomic.write_text(tmp_path / "x", "x")
    assert not (tmp_path / f".x.{dead}.00000000.tmp").exists()


# ---- report sets -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_report():
    run = certify("cpu", ops=["fp8_quantize_weight"])
    return reports.build_report([run], environment=environment.collect(seed=0, level="quick"), level="quick")


def _with_seed(report: dict, seed: int) -> dict:
    return {**report, "environment": {**report["environment"], "seed": seed}}


def _check_latest_set(folder: Path, key: str) -> dict:
    """The pointer of ``key`` names a complete set: every file there, each with the pointer's
    SHA-256, and all four formats from the same run (the same seed in each). Returns the pointer."""
    pointer = json.loads((folder / f"{key}.latest.json").read_text())
    assert pointer["key"] == key and set(pointer["files"]) == set(reports.FORMATS)
    for fmt, rel in pointer["files"].items():
        data = (folder / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == pointer["sha256"][fmt], fmt
        assert Path(rel).parent.name == pointer["set"] and Path(rel).name == f"conformance-{key}" \
            + reports.EXTENSIONS[fmt]
    files = {fmt: folder / rel for fmt, rel in pointer["files"].items()}
    seed = json.loads(files["json"].read_text())["environment"]["seed"]
    assert f"- seed: {seed}," in files["md"].read_text()
    assert f"seed: {seed}," in files["html"].read_text()
    props = {p.get("name"): p.get("value") for p in ET.parse(files["junit"]).getroot().iter("property")}
    assert props["seed"] == str(seed)
    return pointer


def _sets(folder: Path, key: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f"{key}.run-"))


def test_a_set_is_named_by_its_backend_and_two_backends_share_a_folder(tmp_path, small_report, umask):
    umask(0o022)
    paths = reports.write_reports(small_report, tmp_path)
    assert set(paths) == set(reports.FORMATS)
    p_cpu = _check_latest_set(tmp_path, "cpu")
    other = reports.write_reports(_with_seed(small_report, 5), tmp_path, key="cuda")
    p_cuda = _check_latest_set(tmp_path, "cuda")
    assert _check_latest_set(tmp_path, "cpu") == p_cpu                       # cpu's set untouched
    assert json.loads(Path(other["json"]).read_text())["environment"]["seed"] == 5
    assert Path(other["json"]).name == "conformance-cuda.json" and p_cuda["set"].startswith("cuda.run-")
    assert reports.latest_reports(tmp_path, "cuda") == {f: Path(p) for f, p in other.items()}
    for p in [*paths.values(), *other.values(), tmp_path / "cpu.latest.json"]:
        assert _mode(Path(p)) == 0o644, p
    assert _mode(Path(paths["json"]).parent) == 0o755
    # a second cpu run replaces cpu's set and removes the old one
    reports.write_reports(_with_seed(small_report, 9), tmp_path)
    p2 = _check_latest_set(tmp_path, "cpu")
    assert p2["set"] != p_cpu["set"] and _sets(tmp_path, "cpu") == [p2["set"]]
    assert json.loads((tmp_path / p2["files"]["json"]).read_text())["environment"]["seed"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["cpu.latest.json", "cuda.latest.json", p2["set"], p_cuda["set"]])
    with pytest.raises(FileNotFoundError, match="no complete report set for 'rocm'"):
        reports.latest_reports(tmp_path, "rocm")


def test_report_keys(small_report):
    assert reports.report_key(small_report) == "cpu"
    assert reports.report_key(small_report, "all") == "all"
    assert reports.report_key({**small_report, "kind": "golden"}, "my.backend/x") == "my_backend_x.golden"
    assert reports.report_key({"kind": "model", "backends": [], "models": [{"backend": "cuda"}]}) == "cuda.model"
    with pytest.raises(ValueError, match="write_reports: key: .* got '../x'"):
        reports.write_reports(small_report, "/nonexistent-never-created", key="../x")
    with pytest.raises(ValueError, match="write_reports: formats: .* got pdf"):
        reports.write_reports(small_report, "/nonexistent-never-created", ["json", "pdf"])
    assert not Path("/nonexistent-never-created").exists()


@pytest.mark.parametrize("failing_file", [1, 2, 4])
def test_a_failure_between_files_leaves_the_previous_set_latest(tmp_path, small_report, monkeypatch, failing_file):
    reports.write_reports(_with_seed(small_report, 1), tmp_path)
    before = _check_latest_set(tmp_path, "cpu")
    real, calls = atomic.write_bytes, []

    def flaky(path, data, **kw):
        calls.append(path)
        if len(calls) == failing_file:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data, **kw)
    monkeypatch.setattr(atomic, "write_bytes", flaky)
    with pytest.raises(OSError, match="No space"):
        reports.write_reports(small_report, tmp_path)
    monkeypatch.setattr(atomic, "write_bytes", real)
    assert _check_latest_set(tmp_path, "cpu") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.latest.json", before["set"]]   # nothing left over


_KILL_AT = """
import os, sys, time
from hal import atomic
from hal.conformance import reports, runner
out, marker, point = sys.argv[1], sys.argv[2], sys.argv[3]

def stop():
    open(marker, "w").close()
    time.sleep(120)

real_case, real_write, real_publish, real_clean, real_replace = (
    runner.run_case, atomic.write_bytes, reports._publish, reports.clean_report_dir, os.replace)
seen = {"cases": 0, "files": 0, "cleans": 0}

def run_case(*a, **k):
    seen["cases"] += 1
    if point == "cases" and seen["cases"] == 3:
        stop()
    return real_case(*a, **k)

def write_bytes(path, data, **k):
    seen["files"] += 1
    if point == "second_file" and seen["files"] == 2:
        f = open(path, "wb"); f.write(data[: len(data) // 2]); f.flush()   # half of the junit file is out
        stop()
    return real_write(path, data, **k)

def publish(*a):
    done = real_publish(*a)
    if point == "published":
        stop()
    return done

def replace(src, dst):
    if point == "pointer" and str(dst).endswith(".latest.json"):
        stop()                                    # the new pointer's bytes are fsynced in its temporary
    return real_replace(src, dst)

def clean(folder):
    seen["cleans"] += 1
    if point == "switched" and seen["cleans"] == 2:
        stop()
    return real_clean(folder)

runner.run_case, atomic.write_bytes, reports._publish, reports.clean_report_dir = run_case, write_bytes, publish, clean
os.replace = replace
from hal.cli import cli
cli(["conformance", "--backend", "cpu", "--ops", "fp8_quantize_weight", "--seed", "0", "--report-dir", out],
    prog_name="hal")
"""


def _run_and_kill(tmp_path: Path, out: Path, point: str) -> None:
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_AT, str(out), str(marker), point],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the run never reached the point where it is killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("point, new_is_latest", [("cases", False), ("second_file", False), ("published", False),
                                                  ("pointer", False), ("switched", True)])
def test_a_run_killed_at_any_moment_leaves_one_complete_latest_set(tmp_path, small_report, point, new_is_latest):
    out = tmp_path / "reports"
    reports.write_reports(_with_seed(small_report, 1), out)          # an earlier complete run (seed 1)
    before = _check_latest_set(out, "cpu")
    _run_and_kill(tmp_path, out, point)
    after = _check_latest_set(out, "cpu")                              # complete and consistent, always
    seed = json.loads((out / after["files"]["json"]).read_text())["environment"]["seed"]
    if new_is_latest:
        assert after["set"] != before["set"] and seed == 0
    else:
        assert after == before and seed == 1
    assert (out / before["set"]).is_dir()             # killed before any clean-up: the old set is still there
    # the next run removes every leftover: temporaries, staging folders, unnamed or superseded sets
    res = CliRunner().invoke(cli, ["conformance", "--backend", "cpu", "--ops", "fp8_quantize_weight", "--seed", "2",
                                   "--report-dir", str(out)])
    assert res.exit_code == 0, res.output
    final = _check_latest_set(out, "cpu")
    assert json.loads((out / final["files"]["json"]).read_text())["environment"]["seed"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(["cpu.latest.json", final["set"]])
    assert sorted(p.name for p in (out / final["set"]).iterdir()) == sorted(
        f"conformance-cpu{ext}" for ext in reports.EXTENSIONS.values())


def test_a_running_writers_files_are_not_removed(tmp_path, small_report):
    """Another live process's staging folder and its finished-but-not-yet-named set survive a clean."""
    alive = os.getppid()
    staging = tmp_path / f".cpu.run-20260101T000000Z-{alive}-0123abcd.{alive}.89abcdef.tmp"
    finished = tmp_path / f"cpu.run-20260101T000000Z-{alive}-0123abcd"
    orphan = tmp_path / f"cpu.run-20260101T000000Z-{_dead_pid()}-0123abcd"
    for d in (staging, finished, orphan):
        d.mkdir()
    reports.write_reports(small_report, tmp_path)
    assert staging.exists() and finished.exists() and not orphan.exists()
