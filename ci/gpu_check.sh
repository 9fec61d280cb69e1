#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU (sized for the lent H200: 15 minutes
# of device time in all, one command at most 10 minutes; this one finishes within
# HAL_GPU_CHECK_BUDGET_S, default 450 s, install included).
#   1. installs the core and hal-cuda from this working tree (no registry needed:
#      pip install --no-deps --no-build-isolation; torch, triton, numpy, pluggy, click,
#      onnx, onnxruntime, setuptools must already be there),
#   2. runs python -m hal_cuda.gpu_check: the quick conformance level on the GPU, then every
#      hal-cuda benchmark, then the full level (float64 reference evaluated on the GPU),
#   3. streams every result into ONE JSON file ($OUT/gpu-check.json when OUT is set, else
#      ./gpu-check/gpu-check.json), rewritten by write-then-rename on every update: a kill at any
#      moment leaves one valid JSON of all that finished; it prints the benchmark table last.
# HAL_GPU_CHECK_DRY=1 proves the same path on a CPU: the Triton kernels under the interpreter
# (HAL_CUDA_INTERPRET=1), the quick level and tiny benchmark shapes, an editable install, no full
# level. HAL_GPU_CHECK_OPS=a,b limits the ops (CI uses it to stay fast); HAL_GPU_CHECK_INSTALL=0
# skips the install (the packages are already installed, e.g. editable in CI).
# Exit code: 0 every stage ran and passed; 1 a case or a benchmark failed (or the install);
# 2 the budget stopped it first (the JSON says where).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${HAL_GPU_CHECK_BUDGET_S:-450}
DEADLINE=$((START + BUDGET))
OUT_DIR=${OUT:-./gpu-check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
DRY=${HAL_GPU_CHECK_DRY:-0}
INSTALL=(. ./backends/cuda)
DRIVER_ARGS=(--out "$OUT_DIR" --deadline "$DEADLINE" --budget-s "$BUDGET" --ops "${HAL_GPU_CHECK_OPS:-}")
if [ "$DRY" = "1" ]; then
  export HAL_CUDA_INTERPRET=1
  INSTALL=(-e . -e ./backends/cuda)
  DRIVER_ARGS+=(--dry)
fi

if [ "${HAL_GPU_CHECK_INSTALL:-1}" != "0" ]; then
  echo "== install (pip --no-deps --no-build-isolation ${INSTALL[*]}; budget ${BUDGET} s)" >&2
  timeout $((BUDGET / 3 > 60 ? BUDGET / 3 : 60)) "$PY" -m pip install --disable-pip-version-check -q --no-deps \
    --no-build-isolation "${INSTALL[@]}" >&2 || { echo "install failed" >&2; exit 1; }
fi
exec "$PY" -m hal_cuda.gpu_check "${DRIVER_ARGS[@]}"
