"""``hal doctor``: what this machine has, and what HAL will do with it."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys

import click

from hal.cli import EXIT_FAILED
from hal.commands._common import emit_json

PACKAGES = ("hal", "hal-cuda", "hal-ascend", "torch", "triton", "torch-npu", "numpy", "pluggy", "click",
            "transformers", "safetensors", "tokenizers", "onnx", "onnxruntime")
ENV_VARS = ("HAL_BACKEND", "HAL_BACKENDS", "HAL_CHECKED", "HAL_CUDA_INTERPRET", "HAL_ASCEND_EMULATE",
            "HAL_COMPILED_CHECK", "HAL_EXTENSIONS_DIR",
            "TRITON_INTERPRET", "ASCEND_HOME_PATH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES")


def collect() -> dict:
    """The environment report: python, installed package versions, HAL env vars, backends, auto pick."""
    import hal
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    backends = [r.to_dict() for r in hal.list_backends()]
    try:
        from hal.binding import resolve
        auto = resolve("auto").name
        auto_error = None
    except hal.BackendUnavailable as exc:
        auto, auto_error = None, str(exc)
    from hal import compiled_check
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "compiled_check": compiled_check.status(),
        "packages": versions, "env": {k: os.environ.get(k) for k in ENV_VARS if os.environ.get(k) is not None},
        "contract_version": hal.CONTRACT_VERSION, "backends": backends, "auto_backend": auto,
        "auto_error": auto_error,
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool):
    """Diagnose the installation: versions, HAL_* variables, every backend's status and reason,
    and which backend `--backend auto` would pick. Exit 1 if a plugin is broken."""
    rep = collect()
    broken = [b["name"] for b in rep["backends"] if b["status"] == "broken"]
    if as_json:
        emit_json(rep)
    else:
        click.echo(f"python {rep['python']} on {rep['platform']}")
        click.echo("packages: " + ", ".join(f"{k} {v}" for k, v in rep["packages"].items() if v))
        missing = [k for k, v in rep["packages"].items() if not v]
        if missing:
            click.echo("not installed: " + ", ".join(missing))
        for k, v in rep["env"].items():
            click.echo(f"env {k}={v}")
        for b in rep["backends"]:
            click.echo(f"backend {b['name']}: {b['status']}: {b['reason']}")
        click.echo(f"auto picks: {rep['auto_backend'] or rep['auto_error']}")
        cc = rep["compiled_check"]
        click.echo(f"compiled signature check: {'active' if cc['active'] else 'not active'}: {cc['reason']}")
        for name in broken:
            click.echo(f"backend {name} is broken: run `hal backends --traceback` for its traceback")
    if broken:
        sys.exit(EXIT_FAILED)
