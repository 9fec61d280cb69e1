#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU (meant for a lent H100).
#   1. installs the core and hal-cuda from this working tree (no registry needed:
#      pip install --no-deps --no-build-isolation; torch, triton, numpy, pluggy, click,
#      onnx, onnxruntime, setuptools must already be there),
#   2. certifies the cuda backend: hal conformance --backend cuda --level full,
#   3. runs every hal-cuda benchmark with its baseline in the same process (hal bench --json),
#   4. writes ONE JSON file ($OUT/gpu-check.json when OUT is set, else ./gpu-check/gpu-check.json)
#      and prints the benchmark table last.
# HAL_GPU_CHECK_DRY=1 proves the same path on a CPU: the Triton kernels under the interpreter
# (HAL_CUDA_INTERPRET=1), the quick level and tiny benchmark shapes, an editable install;
# HAL_GPU_CHECK_OPS=a,b limits the ops (CI uses it to stay fast).
# Exit code: 0 when conformance passed and every benchmark ran; 1 otherwise (the JSON is written
# either way).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-./gpu-check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
DRY=${HAL_GPU_CHECK_DRY:-0}
OPS=${HAL_GPU_CHECK_OPS:-}
LEVEL=full
BENCH_ARGS=()
INSTALL=(. ./backends/cuda)
if [ "$DRY" = "1" ]; then
  export HAL_CUDA_INTERPRET=1
  LEVEL=quick
  BENCH_ARGS+=(--dry)
  INSTALL=(-e . -e ./backends/cuda)
fi
CONF_ARGS=(--backend cuda --level "$LEVEL" --report-dir "$OUT_DIR/conformance" --format json,junit,md,html --json)
if [ -n "$OPS" ]; then
  CONF_ARGS+=(--ops "$OPS")
  IFS=',' read -ra op_list <<< "$OPS"
  for op in "${op_list[@]}"; do BENCH_ARGS+=(--op "$op"); done
fi

echo "== install (pip --no-deps --no-build-isolation ${INSTALL[*]})" >&2
"$PY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation "${INSTALL[@]}" >&2 || exit 1
echo "== backends" >&2
hal backends >&2
echo "== conformance (level $LEVEL)" >&2
hal conformance "${CONF_ARGS[@]}" > "$OUT_DIR/conformance.stdout.json"
conf_rc=$?
echo "== benchmarks" >&2
hal bench --backend cuda "${BENCH_ARGS[@]}" --json > "$OUT_DIR/bench.stdout.json"
bench_rc=$?
"$PY" - "$OUT_DIR" "$conf_rc" "$bench_rc" "$DRY" <<'PYEOF'
import json, os, sys, datetime, subprocess
out, conf_rc, bench_rc, dry = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as exc:
        return {"error": f"{name}: {exc}"}
conf, bench = load("conformance.stdout.json"), load("bench.stdout.json")
failures = [dict(op=r["op"], case=r["case"], status=r["status"], reason=r["reason"])
            for b in conf.get("backends", []) for r in b["results"] if r["status"] not in ("PASS", "UNSUPPORTED")]
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "dry_run": dry,
       "git_commit": commit, "device": bench.get("device"), "label": bench.get("label"), "versions": bench.get("versions"),
       "conformance": {"exit_code": conf_rc, "summary": conf.get("summary"), "not_passed": failures,
                       "reports": conf.get("report_files"), "error": conf.get("error")},
       "bench": {"exit_code": bench_rc, "results": bench.get("results", []), "errors": bench.get("errors", []),
                 "error": bench.get("error")}}
tmp = os.path.join(out, ".gpu-check.json.tmp")
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
os.replace(tmp, os.path.join(out, "gpu-check.json"))
from hal.bench import BenchResult, format_table
print(f"conformance: exit {conf_rc}, {doc['conformance']['summary']}")
print(f"wrote {os.path.join(out, 'gpu-check.json')}")
print(format_table([BenchResult(**r) for r in doc["bench"]["results"]]))
PYEOF
[ "$conf_rc" = 0 ] && [ "$bench_rc" = 0 ]
