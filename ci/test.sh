#!/usr/bin/env bash
# The project's test command (the README's second quickstart command; .ci/run calls it).
# Installs everything the tests need by itself, then runs the whole suite on the CPU:
#   - torch 2.13.0 CPU build first, so that nothing below pulls a CUDA build of torch;
#   - the core (editable, with its test extra) and every backend package under backends/ that has
#     a pyproject.toml (hal-cuda: Triton, tested under the Triton interpreter; hal-ascend: torch-npu,
#     tested through its emulator and, since CANN is absent, its real-import failure path);
# Extra arguments go to pytest, e.g. `bash ci/test.sh -k registry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --disable-pip-version-check -q "torch==2.13.0"
backends=()
for b in backends/*/pyproject.toml; do backends+=(-e "$(dirname "$b")"); done   # every backend package here
"$PY" -m pip install --disable-pip-version-check -q -e ".[test]" "${backends[@]}"
"$PY" -m pytest -q --durations=20 "$@"
