"""hal-cuda without a GPU: the probe's reasons, the cuBLAS path's logic, and every Triton kernel
certified by the conformance suite under the Triton interpreter (HAL_CUDA_INTERPRET=1).

The interpreter is an option of a backend instance, so kernel checks run in this process
(``hal.runtime("cuda", options={"interpret": True})``, or a kernel launched on CPU tensors);
the CLI checks (conformance, ``hal run``, the GPU check's dry run) run in subprocesses with
HAL_CUDA_INTERPRET=1, the environment default CI uses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("hal_cuda", reason="hal-cuda is installed by ci/test.sh")
triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from hal_cuda._triton import e4m3_bits, jit  # noqa: E402

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
    from hal_cuda.plugin import OPS
    out = _run([sys.executable, "-m", "hal.cli", "conformance", "--backend", "cuda", "--level", "quick", "--json",
                "--ops", ",".join(OPS), "--world-size", "2", "--report-dir", str(tmp_path)])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout)
    b = report["backends"][0]
    assert b["label"] == "cuda (Triton interpreter, no GPU)"
    assert b["counts"]["PASS"] == report["summary"]["total"] and report["summary"]["total"] >= 90
    # the expert-parallel ops also on 2 gloo ranks (the interpreter's tensors are CPU tensors)
    assert sum(r["case"].startswith("world2/") and r["status"] == "PASS" for r in b["results"]) == 6
    assert {p["path"] for p in b["plan"] if p["op"] in OPS} == {"native"}


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
    assert doc["dry_run"] and doc["complete"] and doc["stopped"] is None
    assert doc["stages_done"] == ["conformance quick", "benchmarks"]          # no full level in a dry run
    quick = doc["conformance"]["quick"]
    assert quick["summary"]["passed"] and quick["counts"] == {"PASS": quick["total"]} and quick["total"] >= 10
    assert len(quick["results"]) == quick["total"]
    assert doc["bench"]["results"] and not doc["bench"]["errors"]
    assert os.path.exists(quick["report_files"]["html"])
    assert not (tmp_path / ".gpu-check.json.tmp").exists()
    assert out.stdout.strip().splitlines()[-1].startswith(("moe_", "fp8_"))      # the table is printed last


def _gpu_check(tmp_path, budget, ops="fp8_quantize_weight,fp8_gemm"):
    env = {k: v for k, v in os.environ.items() if k not in ("HAL_CUDA_INTERPRET", "TRITON_INTERPRET")}
    env.update(HAL_GPU_CHECK_DRY="1", HAL_GPU_CHECK_INSTALL="0", HAL_GPU_CHECK_OPS=ops, OUT=str(tmp_path),
               HAL_GPU_CHECK_BUDGET_S=str(budget), TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    return subprocess.Popen(["bash", "ci/gpu_check.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_gpu_check_stops_at_its_budget_with_a_valid_json(tmp_path):
    """A budget too small for the run: the check stops itself near the deadline (exit 2) and the
    JSON says where, holding every case that finished."""
    import time
    t0 = time.time()
    proc = _gpu_check(tmp_path, budget=6)
    stdout, stderr = proc.communicate(timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode == 2, stdout[-2000:] + stderr[-2000:]
    doc = json.loads((tmp_path / "gpu-check.json").read_text())
    assert not doc["complete"] and doc["stopped"].startswith("budget: deadline reached")
    assert doc["budget_s"] == 6 and "benchmarks" not in doc["stages_done"]
    quick = doc["conformance"].get("quick")
    if quick:                                     # stopped inside the level: what finished is kept
        assert quick["status"] == "stopped" and len(quick["results"]) < quick["total"]
    assert elapsed < 6 + 30                       # one interpreted case at most runs past the deadline


def test_gpu_check_killed_midway_leaves_one_valid_json(tmp_path):
    """SIGKILL while conformance cases are landing: the file on disk is a complete JSON document
    (never a half-written one) with the cases that finished before the kill."""
    import signal
    import time
    proc = _gpu_check(tmp_path, budget=300)
    path = tmp_path / "gpu-check.json"
    deadline = time.time() + 90
    landed = 0
    try:
        while time.time() < deadline and landed < 2:
            time.sleep(0.2)
            if path.exists():
                doc = json.loads(path.read_text())          # valid at every moment it is read
                landed = len((doc["conformance"].get("quick") or {}).get("results", []))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert landed >= 2, "no case landed within 90 s"
    doc = json.loads(path.read_text())
    assert not doc["complete"] and doc["stopped"] is None          # killed: nobody got to write a verdict
    results = doc["conformance"]["quick"]["results"]
    assert len(results) >= 2 and all(r["status"] == "PASS" for r in results)


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


def test_capability_table_declares_fp8_only_from_sm89():
    from hal_cuda.plugin import FP8_OPS, capability_table, fp8_unavailable_reason
    assert fp8_unavailable_reason((8, 9)) is None and fp8_unavailable_reason((9, 0)) is None
    assert fp8_unavailable_reason(None) is None                              # the interpreter
    for cc in ((9, 0), (8, 9), (10, 0)):
        caps = capability_table(cc)
        assert {c.path for c in caps.values()} == {"native"}
        # per-call rules from sm_89 on: only gated_delta_rule's register limit (Dk > 256)
        assert {op for op, c in caps.items() if c.supports is not None} == {"gated_delta_rule"}
    bf16, fp8 = torch.zeros(2, 2, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.float8_e4m3fn)
    for cc in ((8, 0), (8, 6), (8, 7)):
        caps = capability_table(cc)
        why = f"compute capability {cc[0]}.{cc[1]} < 8.9"
        for op in FP8_OPS:
            assert why in caps[op].note and why in caps[op].supports(fp8, x=None)
        # FP8 weights are declined, bf16 weights run natively
        for op in ("moe_experts", "moe_forward"):
            assert caps[op].supports(None, w_gate_up_scale=torch.ones(1), w_down_scale=torch.ones(1)).startswith(why)
            assert caps[op].supports(None, w_gate_up_scale=None, w_down_scale=None) is None
        assert why in caps["lightning_indexer"].supports(fp8, fp8, None, top_k=1)
        assert caps["lightning_indexer"].supports(bf16, bf16, None, top_k=1) is None
        assert caps["sparse_attention"].supports is None and caps["moe_route"].supports is None


@pytest.mark.parametrize("cc,available,fp8_note", [((9, 0), True, False), ((8, 9), True, False), ((8, 0), True, True),
                                                   ((7, 5), False, None)])
def test_probe_with_a_faked_gpu(monkeypatch, cc, available, fp8_note):
    from hal_cuda.plugin import CudaBackend
    monkeypatch.delenv("HAL_CUDA_INTERPRET", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    backend = CudaBackend()
    av = backend.probe()
    assert av.available is available, av.reason
    if not available:
        assert "below 8.0" in av.reason
        return
    assert ("FP8 ops unavailable" in av.reason) is fp8_note, av.reason
    caps = backend.capabilities()
    assert (caps["fp8_gemm"].supports is not None) is fp8_note


@jit
def _e4m3_kernel(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(q_ptr + o, e4m3_bits(tl.load(x_ptr + o, mask=m)), mask=m)


def test_e4m3_rounding_matches_torch_everywhere():
    """The device helper inside a kernel of this module, launched on CPU tensors: interpreted in
    this process (no TRITON_INTERPRET)."""
    x = torch.cat([torch.linspace(-448, 448, 100001), torch.linspace(-0.03, 0.03, 50001),
                   torch.tensor([float("nan"), 0.0, -0.0, 2 ** -9, 2 ** -10, 3 * 2 ** -10, 1e-30, 464.0 - 1e-3])]
                  ).clamp(-448, 448)
    q = torch.empty(x.shape, dtype=torch.uint8)
    _e4m3_kernel[(triton.cdiv(x.numel(), 1024),)](x, q, x.numel(), BLOCK=1024)
    assert int((q != x.to(torch.float8_e4m3fn).view(torch.uint8)).sum()) == 0
    assert "TRITON_INTERPRET" not in os.environ


def _interpreted_runtime(**kw):
    """hal-cuda under the Triton interpreter, in this process (the backend's interpret option)."""
    import hal
    return hal.runtime("cuda", options={"interpret": True}, **kw)


def _attention_reference(q, k, v, idx, scale):
    # float64, one query and head at a time, written from the contract's formula
    B, S, Hq, _ = q.shape
    G = Hq // k.shape[2]
    out = torch.zeros(B, S, Hq, v.shape[3], dtype=torch.float64)
    lse = torch.full((B, S, Hq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            sel = idx[b, t][idx[b, t] >= 0].long()
            for h in range(Hq):
                if sel.numel() == 0:
                    continue
                s = (k[b, sel, h // G].double() @ q[b, t, h].double()) * scale
                out[b, t, h] = torch.softmax(s, 0) @ v[b, sel, h // G].double()
                lse[b, t, h] = torch.logsumexp(s, 0)
    return out, lse


def test_sparse_attention_head_blocks_and_cache_views_match_float64():
    """Both kernel paths (tensor-core dot from 16 heads per key head, in two head blocks; the
    CUDA-core reduce below, with G = 3 padded to 4) and a v that is a strided view of k (read in
    place) against a float64 evaluation of the contract's formula."""
    from hal_cuda.op_sparse_attention import _unit_last
    rt = _interpreted_runtime(fallback="reference")     # ops hal-cuda lacks may fall back; this one may not
    assert {e.op: e.path for e in rt.plan()}["sparse_attention"] == "native"
    g = torch.Generator().manual_seed(0)
    worst = {}
    for name, Hq, Hk, Dqk, Dv, dtype, view in [("dot_2blocks", 32, 1, 48, 32, torch.float32, False),
                                               ("dot_bf16_view", 16, 1, 80, 64, torch.bfloat16, True),
                                               ("reduce_G3", 6, 2, 24, 16, torch.float32, False),
                                               ("reduce_G1_view", 4, 4, 40, 32, torch.float32, True)]:
        B, S, L, K = 2, 3, 37, 20
        q = torch.randn(B, S, Hq, Dqk, generator=g).to(dtype)
        k = torch.randn(B, L, Hk, Dqk, generator=g).to(dtype)
        v = k[..., :Dv] if view else torch.randn(B, L, Hk, Dv, generator=g).to(dtype)
        assert (_unit_last(v) is v) and (v.is_contiguous() is not view)
        idx = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B * S)]).view(B, S, K).int()
        idx[0, 1, ::3] = -1
        idx[1, 2] = -1                                                        # a query with no valid slot
        out, lse = rt.sparse_attention(q, k, v, idx, scale=Dqk ** -0.5, return_lse=True)
        ro, rl = _attention_reference(q, k, v, idx, Dqk ** -0.5)
        tol = 1e-5 if dtype == torch.float32 else 2 ** -8
        err_o = ((out.double() - ro).abs() / (ro.abs() + 1)).max().item()
        finite = torch.isfinite(rl)
        err_l = (lse.double()[finite] - rl[finite]).abs().max().item()
        assert torch.equal(torch.isfinite(lse), finite) and (out[1, 2] == 0).all()
        assert err_o <= tol and err_l <= 1e-5, (name, err_o, err_l)
        worst[name] = err_o
    assert sorted(worst) == sorted(["dot_2blocks", "dot_bf16_view", "reduce_G3", "reduce_G1_view"])


# aten ops that read a device value on the host (or size their output by the data)
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::bincount", "aten::masked_select", "aten::_unique2",
            "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave", "aten::is_nonzero"}


def test_moe_forward_has_no_host_sync_and_dispatch_only_its_row_count():
    """Every aten op moe_forward runs is recorded (kernels under the interpreter): none of those
    that read a device value on the host appears; moe_dispatch has exactly one (its row count N).
    The recorder itself is shown to catch bincount and boolean-mask indexing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SyncRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.hits = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            bool_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                t is not None and t.dtype == torch.bool for t in args[1])
            if name in SYNC_OPS or bool_index:
                self.hits.append(name)
            return func(*args, **(kwargs or {}))

    rt = _interpreted_runtime(fallback="reference", validate=False)
    assert all(e.path == "native" for e in rt.plan() if e.op in ("moe_forward", "moe_dispatch"))
    g = torch.Generator().manual_seed(0)
    T, E, k, H, I = 8, 8, 2, 32, 32
    x = torch.randn(T, H, generator=g).bfloat16()
    logits = torch.randn(T, E, generator=g)
    wgu = (torch.randn(E, 2 * I, H, generator=g) * 0.1).bfloat16()
    wd = (torch.randn(E, H, I, generator=g) * 0.1).bfloat16()
    with SyncRecorder() as fwd:
        rt.moe_forward(x, logits, wgu, wd, top_k=k)
    ids = torch.tensor([[0, -1], [3, 0]] * (T // 2), dtype=torch.int32)
    with SyncRecorder() as disp:
        plan = rt.moe_dispatch(x, ids, E, align=4)
    with SyncRecorder() as control:
        torch.bincount(torch.tensor([1, 2]))
        torch.ones(3)[torch.tensor([True, False, True])]
    assert fwd.hits == [] and disp.hits == ["aten::_local_scalar_dense"]
    assert control.hits == ["aten::bincount", "aten::index"]
    # copy c = 2 * token + slot; expert 0 holds copies 0, 3, 4, 7, ... (8 rows), expert 3 copies 2, 6, 10, 14
    # (4 rows, already aligned), the -1 copies (1, 5, 9, 13) get no row
    assert plan.hidden.shape[0] == 12
    assert plan.source.tolist() == [0, 3, 4, 7, 8, 11, 12, 15, 2, 6, 10, 14]


def test_benchmark_floors_follow_the_device():
    from hal_cuda.bench import device_peaks
    h200, h100 = device_peaks("NVIDIA H200"), device_peaks("NVIDIA H100 80GB HBM3")
    assert (h200["device"], h200["hbm"], h200["fp8"]) == ("H200", 4.8e12, 1979e12)
    assert (h100["device"], h100["hbm"], h100["bf16"]) == ("H100", 3.35e12, 989e12)
    other = device_peaks("NVIDIA A100-SXM4-80GB")
    assert other["hbm"] == 3.35e12 and "no table for 'NVIDIA A100-SXM4-80GB'" in other["device"]


def test_gpu_reference_falls_back_to_the_cpu_evaluation_where_it_cannot_run():
    """The full level's reference is evaluated on the GPU; where that fails (here: no GPU) the
    case gets the CPU evaluation, identical to the runner's own, and the fallback is counted."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the fallback path cannot be forced")
    from hal.conformance import runner
    from hal.conformance.cases import catalog
    from hal_cuda import gpu_check
    case = catalog("quick", ["fp8_quantize"])[0]
    args, kwargs = case.materialize(0)
    gpu_check.CPU_REFERENCE = runner.reference_outputs
    before = dict(gpu_check.REFERENCE_DEVICE)
    truth, ref = gpu_check.gpu_reference_outputs(case, args, kwargs)
    want_truth, want_ref = runner.reference_outputs(case, args, kwargs)
    assert runner.identical(truth, want_truth) and runner.identical(ref, want_ref)
    assert gpu_check.REFERENCE_DEVICE["cpu (GPU evaluation failed)"] == before["cpu (GPU evaluation failed)"] + 1
    assert gpu_check.REFERENCE_DEVICE["cuda"] == before["cuda"]
