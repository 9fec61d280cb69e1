"""Installing a backend package never replaces the user's torch build."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installing_hal_ascend_installs_nothing_but_itself(tmp_path):
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--quiet",
                          "--disable-pip-version-check", "--report", str(report), str(ROOT / "backends" / "ascend")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert names == ["hal-ascend"], names


def test_the_ascend_probe_names_the_torch_npu_matching_this_torch():
    import torch

    from hal_ascend.plugin import import_failure_reason
    reason = import_failure_reason(ModuleNotFoundError("No module named 'torch_npu'"))
    assert f"pip install torch-npu=={torch.__version__.split('+')[0]}" in reason
