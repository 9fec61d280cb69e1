"""hal-cuda without a GPU: the probe's reasons, the cuBLAS path's logic, and every Triton kernel
certified by the conformance suite under the Triton interpreter (HAL_CUDA_INTERPRET=1).

Interpreter runs happen in subprocesses: the interpreter switch must be set before triton is
imported, which a shared pytest process cannot promise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("hal_cuda", reason="hal-cuda is installed by ci/test.sh")
pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, interpret=True, timeout=600, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("HAL_CUDA_INTERPRET", "TRITON_INTERPRET")}
    if interpret:
        e["HAL_CUDA_INTERPRET"] = "1"
    e.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")      # torch_npu without CANN must not break `import torch`
    e.update(env)
    return subprocess.run(args, capture_output=True, text=True, env=e, timeout=timeout, cwd=ROOT)


def test_probe_says_why_cuda_is_unavailable_here():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the unavailable path cannot be observed")
    out = _run([sys.executable, "-m", "hal.cli", "backends", "--json"], interpret=False)
    rec = {r["name"]: r for r in json.loads(out.stdout)}["cuda"]
    assert rec["status"] == "unavailable"
    assert "CPU-only build" in rec["reason"] or "no CUDA device" in rec["reason"]
    res = _run([sys.executable, "-m", "hal.cli", "conformance", "--backend", "cuda"], interpret=False)
    assert res.returncode == 3 and "unavailable" in res.stderr and "Traceback" not in res.stderr


def test_every_triton_kernel_passes_conformance_under_the_interpreter(tmp_path):
    out = _run([sys.executable, "-m", "hal.cli", "conformance", "--backend", "cuda", "--level", "quick", "--json",
                "--report-dir", str(tmp_path)])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout)
    b = report["backends"][0]
    assert b["label"] == "cuda (Triton interpreter, no GPU)"
    assert b["counts"]["PASS"] == report["summary"]["total"] and report["summary"]["total"] >= 90
    assert {p["path"] for p in b["plan"]} == {"native"}


def test_hal_run_on_the_interpreter_matches_the_reference():
    cmd = [sys.executable, "-m", "hal.cli", "run", "--model", "tiny-glm45", "--max-new-tokens", "2", "--json"]
    ref = json.loads(_run(cmd + ["--backend", "cpu"], interpret=False).stdout)
    out = _run(cmd + ["--backend", "cuda"])
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["label"] == "cuda (Triton interpreter, no GPU)" and got["tokens"] == ref["tokens"]


def test_gpu_check_dry_run_writes_one_json(tmp_path):
    out = _run(["bash", "ci/gpu_check.sh"], interpret=False, HAL_GPU_CHECK_DRY="1",
               HAL_GPU_CHECK_OPS="fp8_quantize,fp8_gemm", OUT=str(tmp_path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu-check.json").read_text())
    assert doc["dry_run"] and doc["conformance"]["summary"]["passed"]
    assert doc["bench"]["results"] and not doc["bench"]["errors"]
    assert (tmp_path / "conformance" / "conformance.html").exists()
    assert out.stdout.strip().splitlines()[-1].startswith(("moe_", "fp8_"))      # the table is printed last


def test_cublas_plan_takes_only_what_cublas_supports():
    from hal_cuda.op_fp8_gemm import plan_cublas
    ok = dict(device_type="cuda", capability=(9, 0), torch_version="2.11.0+cu129", cublaslt_version=12090,
              M=4096, N=7168, K=2048)
    assert plan_cublas(**ok)[0]
    for change, fragment in [({"device_type": "cpu"}, "interpreter"), ({"capability": (8, 9)}, "SM90"),
                             ({"capability": (10, 0)}, "SM90"), ({"torch_version": "2.8.0"}, "no 1x128"),
                             ({"cublaslt_version": 12080}, "12.9"), ({"K": 2000}, "K=2000"), ({"N": 7170}, "N=7170"),
                             ({"M": 0}, "M = 0")]:
        use, reason = plan_cublas(**{**ok, **change})
        assert not use and fragment in reason, (change, reason)


def test_cublas_scale_layouts():
    from hal_cuda.op_fp8_gemm import cublas_scales
    a_scale, b_scale = torch.rand(64, 16), torch.rand(56, 16)
    sa, sb = cublas_scales(a_scale, b_scale)
    assert sa.shape == (64, 16) and sa.stride() == (1, 64) and torch.equal(sa, a_scale)      # column-major
    assert sb.shape == (16, 56) and torch.equal(sb, b_scale.t())


def test_capability_table_depends_on_compute_capability():
    from hal_cuda.plugin import capability_table
    hopper = capability_table((9, 0))
    ampere = capability_table((8, 0))
    assert {c.path for c in hopper.values()} == {"native"}
    assert ampere["fp8_gemm"].path == "emulated" and "8.0 < 8.9" in ampere["fp8_gemm"].note
    assert ampere["sparse_attention"].path == "native"


def test_e4m3_rounding_matches_torch_everywhere():
    code = r"""
import torch, triton, triton.language as tl
from hal_cuda._triton import e4m3_bits
@triton.jit
def k(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(q_ptr + o, e4m3_bits(tl.load(x_ptr + o, mask=m)), mask=m)
x = torch.cat([torch.linspace(-448, 448, 100001), torch.linspace(-0.03, 0.03, 50001),
               torch.tensor([float("nan"), 0.0, -0.0, 2 ** -9, 2 ** -10, 3 * 2 ** -10, 1e-30, 464.0 - 1e-3])]).clamp(-448, 448)
q = torch.empty(x.shape, dtype=torch.uint8)
k[(triton.cdiv(x.numel(), 1024),)](x, q, x.numel(), BLOCK=1024)
print(int((q != x.to(torch.float8_e4m3fn).view(torch.uint8)).sum()))
"""
    out = _run([sys.executable, "-c", code], TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0"
