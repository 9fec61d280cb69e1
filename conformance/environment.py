"""The environment every report carries: versions, device, seed, date, git commit."""
from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("hal", "hal-cuda", "hal-ascend", "torch", "triton", "torch-npu", "numpy", "onnx", "onnxruntime")


def _version(pkg: str):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _cann_version():
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        home = os.environ.get(var)
        if home:
            for name in ("version.cfg", "version.info"):
                f = Path(home) / name
                if f.exists():
                    return f.read_text(errors="replace").strip().splitlines()[0][:200]
            return f"present at {home} (version file not found)"
    return None


def git_commit() -> str | None:
    """The project's git commit when running from a checkout (None otherwise)."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def collect(*, seed: int, level: str) -> dict:
    import torch
    versions = {p: _version(p) for p in PACKAGES}
    versions["cuda"] = torch.version.cuda
    versions["cann"] = _cann_version()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed, "level": level, "git_commit": git_commit(),
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "versions": {k: v for k, v in versions.items() if v},
    }
