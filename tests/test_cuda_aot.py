"""The AOT compile check (ci/aot_check.py): every hal-cuda kernel, in every configuration its
launcher picks at the models' shapes, compiled for sm_90a and sm_89 without a GPU, with the
pass rules (compile errors, shared memory, spills, tensor cores) tested on hand-made rows.

The full check compiles ~60 kernels: about 1.5-2 minutes of CPU on CI's 2 cores (measured
numbers in docs/perf.md)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("hal_cuda", reason="hal-cuda is installed by ci/test.sh")
pytest.importorskip("triton")

from hal_cuda import aot  # noqa: E402
from hal_cuda import launch as L  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_DIR = os.path.join(ROOT, "backends", "cuda", "hal_cuda")


def _row(**over):
    row = {"kernel": "_fp8_gemm_kernel", "arch": "sm_90a", "config": "c", "shapes": ["s"],
           "tensor_cores_expected": True, "error": None, "registers": 128, "spill_stores": 0, "spill_loads": 0, "smem": 96 * 1024, "wgmma": True,
           "mma": False}
    row.update(over)
    return row


def test_judge_passes_a_clean_row_and_names_each_failure():
    assert aot.judge(_row()) == []
    assert aot.judge(_row(error="CompilationError: fp8e4nv not supported")) == [
        "compile error: CompilationError: fp8e4nv not supported"]
    assert aot.judge(_row(smem=227 * 1024)) == []
    assert aot.judge(_row(smem=227 * 1024 + 1)) == [f"shared memory {227 * 1024 + 1} B > {227 * 1024} B"]
    assert aot.judge(_row(spill_stores=8, spill_loads=4)) == ["spills on sm_90a: 8 B stores, 4 B loads"]
    assert aot.judge(_row(spill_loads=4)) != []
    assert aot.judge(_row(spill_stores=8, arch="sm_89", wgmma=False, mma=True)) == []       # only sm_90a is strict
    assert aot.judge(_row(spill_stores=8, kernel="_weight_kernel", tensor_cores_expected=False)) == []
    assert aot.judge(_row(wgmma=False)) == ["meant for tensor cores, but its PTX has no wgmma / mma"]
    assert aot.judge(_row(wgmma=False, mma=True)) == []
    assert aot.judge(_row(wgmma=False, tensor_cores_expected=False)) == []
    assert aot.judge(_row(registers=None)) == ["ptxas -v reported no register count"]
    for kernel in ("_grouped_gemm_kernel", "_sparse_attn_kernel", "_scores_kernel"):
        assert aot.judge(_row(kernel=kernel, spill_stores=4)), kernel


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function '_scores_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _scores_kernel\n"
           "    16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 16 bytes cumulative stack size, 4096 bytes smem\n")
    assert aot.parse_ptxas_log(log) == {"registers": 168, "spill_stores": 12, "spill_loads": 20, "static_smem": 4096}
    assert aot.parse_ptxas_log("garbage") == {"registers": None, "spill_stores": None, "spill_loads": None,
                                              "static_smem": 0}


def test_configurations_cover_every_kernel_and_the_launchers_picks():
    defined = set()
    for name in os.listdir(KERNEL_DIR):
        if name.startswith("op_") and name.endswith(".py"):
            with open(os.path.join(KERNEL_DIR, name)) as f:
                defined |= set(re.findall(r"@(?:triton\.)?jit\s*\ndef (_\w+_kernel)\(", f.read()))
    configs = aot.configurations()
    assert defined and defined == {c.kernel for c in configs}
    keys = [c.key() for c in configs]
    assert len(keys) == len(set(keys))                                   # deduplicated
    attn = {(c.constexprs["BLOCK_G"], c.constexprs["DOT"], c.constexprs["BLOCK_DV"]) for c in configs
            if c.kernel == "_sparse_attn_kernel"}
    for G, Dqk, Dv in [(128, 576, 512), (64, 576, 512), (16, 576, 512), (8, 576, 512), (1, 128, 128), (4, 128, 128)]:
        cfg = L.attention_config(G, Dqk, Dv, half=True, interpret=False)
        assert (cfg.BLOCK_G, cfg.DOT, cfg.BLOCK_DV) in attn, (G, Dqk, Dv)
    gemm = {(c.constexprs["BLOCK_M"], c.constexprs["HAS_BIAS"]) for c in configs if c.kernel == "_fp8_gemm_kernel"}
    assert {(L.fp8_gemm_config(M, interpret=False).BLOCK_M, b) for M in (1, 64, 65, 4096) for b in (0, 1)} <= gemm
    # no GPU configuration dots at "ieee" (FMA only, no tensor cores); the reduce path has no dot at all
    assert all(c.constexprs.get("PRECISION") != "ieee" for c in configs if c.constexprs.get("DOT", True))


def test_aot_check_compiles_everything_for_sm90a_and_sm89(tmp_path):
    out_json = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("HAL_CUDA_INTERPRET", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "ci/aot_check.py", "--json", str(out_json)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    doc = json.loads(out_json.read_text())
    rows = doc["rows"]
    assert len(rows) == 2 * len(aot.configurations()) and not doc["failures"]
    assert {r["arch"] for r in rows} == {"sm_90a", "sm_89"} and all(r["error"] is None for r in rows)
    by = {(r["kernel"], r["arch"]) for r in rows if r["wgmma"]}
    # Hopper's warpgroup MMA where the tiles allow it (M >= 64): the GEMMs and the indexer
    assert {("_fp8_gemm_kernel", "sm_90a"), ("_grouped_gemm_kernel", "sm_90a"), ("_scores_kernel", "sm_90a")} <= by
    assert not any(r["wgmma"] for r in rows if r["arch"] == "sm_89")
    assert "| kernel | arch |" in res.stdout
