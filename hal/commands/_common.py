"""Helpers shared by the subcommands: JSON output, error exits without tracebacks."""
from __future__ import annotations

import json
import sys

import click

from hal.cli import EXIT_BACKEND


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
