"""Helpers shared by the subcommands: JSON output, error exits without tracebacks, optional extras."""
from __future__ import annotations

import importlib.util
import json
import sys

import click

from hal.cli import EXIT_BACKEND, EXIT_USAGE

# importable module -> the optional extra of pyproject.toml that installs it
EXTRA_OF_MODULE = {"onnx": "conformance", "onnxruntime": "conformance", "ml_dtypes": "conformance",
                   "jsonschema": "conformance", "safetensors": "models", "tokenizers": "models", "tqdm": "models"}


def emit_json(obj) -> None:
    """Print ``obj`` as indented JSON on stdout (the --json form of every command)."""
    click.echo(json.dumps(obj, indent=2, default=str))


def fail(message: str, code: int, *, as_json: bool = False, **extra) -> None:
    """Exit with ``code`` after printing ``message`` (stderr; or a JSON error object on stdout)."""
    if as_json:
        emit_json({"error": message, "exit_code": code, **extra})
    else:
        click.echo(f"hal: error: {message}", err=True)
    sys.exit(code)


def backend_unavailable(exc, *, as_json: bool = False) -> None:
    fail(str(exc), EXIT_BACKEND, as_json=as_json, backend=exc.backend, status=exc.status, reason=exc.reason)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):        # a None entry in sys.modules, a broken parent package
        return False


def missing_extra_message(what: str, modules) -> str | None:
    """None when every module in ``modules`` can be imported; else the one line telling the user
    which ``pip install 'hal[EXTRA]'`` brings them (``what`` names the command or option)."""
    missing = [m for m in modules if not _importable(m)]
    if not missing:
        return None
    extras = sorted({EXTRA_OF_MODULE.get(m.split(".")[0], "conformance") for m in missing})
    install = " ".join(f"'hal[{e}]'" for e in extras)
    return f"{what} needs {', '.join(missing)}, not installed: pip install {install}"


def require_extra(what: str, modules, *, as_json: bool = False) -> None:
    """Exit 2 (nothing ran) with :func:`missing_extra_message` when one of ``modules`` is missing."""
    message = missing_extra_message(what, modules)
    if message:
        fail(message, EXIT_USAGE, as_json=as_json, missing_extra=True)


def missing_module_exit(exc: ImportError, what: str, *, as_json: bool = False) -> None:
    """Turn an ImportError of an optional extra's module raised mid-command into the one-line exit
    2 of :func:`require_extra`; any other ImportError is raised again."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name not in EXTRA_OF_MODULE:
        raise exc
    fail(f"{what} needs {name}, not installed: pip install 'hal[{EXTRA_OF_MODULE[name]}]'", EXIT_USAGE,
         as_json=as_json, missing_extra=True)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def file_target(ctx, param, value):
    """click callback for an output file option: ``value`` must name a file (not a folder) in an
    existing, writable folder; checked before anything is loaded or computed, so a bad path costs
    nothing and writes nothing. None passes through (an optional option left out)."""
    import os

    import click
    if value is None:
        return None
    folder = os.path.dirname(os.path.abspath(value))
    if os.path.isdir(value):
        raise click.BadParameter(f"{value!r} is a folder; give a file name in it", param=param)
    if not os.path.isdir(folder):
        raise click.BadParameter(f"folder {folder!r} does not exist", param=param)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"folder {folder!r} is not writable", param=param)
    return value
