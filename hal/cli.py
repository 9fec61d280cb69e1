"""The ``hal`` command line. Subcommands live in ``hal/commands/<name>.py`` and load lazily.

Exit codes (every command): 0 success; 1 the command ran and found a failure (a conformance FAIL
or ERROR, a broken plugin under --backend all, a failed check); 2 usage error (bad option or
argument, click's convention; also a missing optional extra, whose line names the
`pip install 'hal[...]'` to run); 3 a named backend is unavailable, broken, incompatible or
unknown; 4 bad input data (a model directory, a checkpoint, a prompt the model cannot take) or an
output folder that cannot be written (results are printed first).
"""
from __future__ import annotations

import importlib

import click

from hal._version import CONTRACT_VERSION, __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BACKEND, EXIT_INPUT = 0, 1, 2, 3, 4

# command name -> "module:attribute"; loaded only when the command runs (or for --help listings)
COMMANDS = {
    "backends": "hal.commands.backends:backends",
    "ops": "hal.commands.ops:ops",
    "doctor": "hal.commands.doctor:doctor",
    "run": "hal.commands.run:run",
    "conformance": "hal.commands.conformance:conformance",
    "bench": "hal.commands.bench:bench",
    "export": "hal.commands.export:export",
    "build-checks": "hal.commands.build_checks:build_checks",
}


# the one-line help `hal --help` lists, so that listing imports no command (nor torch)
SHORT_HELP = {
    "backends": "Every backend plugin: status, reason, device, versions, native/emulated ops.",
    "ops": "The operator contract: every op, its signature and one-line semantics.",
    "doctor": "Versions, HAL_* variables, every backend's status and what auto picks.",
    "run": "Generate tokens with a model on a backend (default: tiny-glm5 on the best).",
    "conformance": "Certify a backend against the reference (reports, golden vectors, models).",
    "bench": "Benchmarks: HAL's per-call overhead, a backend's kernels against baselines.",
    "export": "Export a model to ONNX (onnxruntime-runnable for GQA + MoE; DSA/FP8 as hal.* nodes).",
    "build-checks": "Build the compiled call-signature check (C++): cheaper validation per call.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, SHORT_HELP.get(name, "")) for name in COMMANDS])

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version=__version__, prog_name="hal", message=f"%(prog)s %(version)s (contract {CONTRACT_VERSION})")
def cli():
    """HAL: one operator contract for MoE LLM inference, many backends.

    \b
    Start here:
      hal backends            which backends are installed, and why each is (un)available
      hal ops                 the operator contract: every op, its signature and meaning
      hal run                 generate with a model (default: tiny-glm5 on the best backend)
      hal conformance -b cpu  certify a backend against the reference
      hal bench overhead      per-call dispatch overhead

    Every command takes --json for machine-readable output. Exit codes: 0 ok, 1 a check failed,
    2 usage error, 3 backend unavailable, 4 bad input data.
    """


def main(args=None, **extra) -> None:
    """The ``hal`` console script (``args``: the command line, default sys.argv[1:])."""
    cli(args=args, prog_name="hal", **extra)


if __name__ == "__main__":
    main()
