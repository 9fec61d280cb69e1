"""``hal build-checks``: build HAL's compiled call-signature check for the installed torch."""
from __future__ import annotations

import sys
import time

import click

from hal.cli import EXIT_FAILED
from hal.commands._common import emit_json


@click.command(name="build-checks")
@click.option("--status", "only_status", is_flag=True, help="Only say whether a build exists and is used; build nothing.")
@click.option("--verbose", is_flag=True, help="Show the compiler's output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build_checks(only_status: bool, verbose: bool, as_json: bool):
    """Build the compiled call-signature check (hal/csrc/signature_check.cpp) for this torch.

    A runtime's bound ops skip contract validation for a call whose signature (every tensor's
    type, shape, strides, dtype, device, requires_grad; every other argument) was validated
    before. Comparing the tensors is most of that cost: torch's TensorGuards takes 0.2-0.45 µs per
    tensor on the CI CPU, this check about 0.05 µs (`hal bench overhead`, docs/perf.md).

    \b
    Needs a C++ compiler and ninja (torch's cpp_extension drives them) and takes about a minute.
    The build goes to HAL_EXTENSIONS_DIR (default ~/.cache/hal/extensions), named after the torch
    it was built for: after changing torch, build again. HAL_COMPILED_CHECK=0 turns it off.
    Without a build HAL uses TensorGuards; nothing else changes. Exit 1 if the build fails.
    """
    from hal import compiled_check, validation_cache
    if only_status:
        rep = compiled_check.status()
    else:
        t0 = time.perf_counter()
        if not as_json:
            click.echo(f"compiling {compiled_check.SOURCE} for this torch (about a minute) ...", err=True)
        try:
            compiled_check.build(verbose=verbose)
            validation_cache.forget_compiled()
            rep = {**compiled_check.status(), "build_s": round(time.perf_counter() - t0, 1)}
        except RuntimeError as e:
            rep = {"active": False, "path": str(compiled_check.built_path()), "reason": str(e),
                   "build_s": round(time.perf_counter() - t0, 1)}
    if as_json:
        emit_json(rep)
    else:
        click.echo(("active: " if rep["active"] else "not active: ") + rep["reason"])
        if "build_s" in rep and rep["active"]:
            click.echo(f"built in {rep['build_s']} s")
    if not only_status and not rep["active"]:
        sys.exit(EXIT_FAILED)
