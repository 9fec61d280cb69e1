"""hal-cuda's Triton interpreter as an option of a backend instance, in ONE process (no subprocess):
``hal.runtime("cuda", options={"interpret": True})`` runs the kernels on CPU tensors with
HAL_CUDA_INTERPRET unset, next to the listed ``cuda`` backend (unavailable here, with its reason),
and the same kernels still compile for sm_90 right after an interpreted launch; nothing writes
TRITON_INTERPRET into the environment."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("hal_cuda", reason="hal-cuda is installed by ci/test.sh")
triton = pytest.importorskip("triton")

import hal  # noqa: E402
import triton.language as tl  # noqa: E402
from hal.backends.cpu import KERNELS, float64_evaluation  # noqa: E402

pytestmark = pytest.mark.skipif(bool(triton.knobs.runtime.interpret),
                                reason="TRITON_INTERPRET is set in this process: triton.jit interprets every kernel "
                                       "it defines, so the compiled path cannot be observed")

LABEL = "cuda (Triton interpreter, no GPU)"


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("HAL_CUDA_INTERPRET", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def _interpreted():
    rt = hal.runtime("cuda", options={"interpret": True})
    assert rt.label == LABEL and rt.device_type == "cpu"
    return rt


def _lang_state():
    """Identity of what Triton's interpreter patches (and what hal-cuda's scope patches)."""
    import triton.language.core as core
    from triton.runtime.jit import JITFunction
    names = ("load", "store", "dot", "where", "maximum", "range", "static_range", "reduce", "associative_scan",
             "sum", "max", "cumsum", "program_id", "arange", "multiple_of", "static_assert")
    state = {("tl", n): getattr(tl, n) for n in names}
    state.update({("core", n): getattr(core, n) for n in names if hasattr(core, n)})
    state.update({("tensor", n): core.tensor.__dict__.get(n) for n in ("sum", "max", "cdiv", "to", "__index__",
                                                                      "__bool__", "T")})
    state[("dtype", "to_ir")] = core.dtype.__dict__.get("to_ir")
    state[("JITFunction", "__call__")] = JITFunction.__dict__["__call__"]
    return state


def test_interpreted_runtime_next_to_the_listed_cuda_backend(no_env):
    from hal.registry import get_registry
    from hal_cuda.plugin import OPS
    rt = _interpreted()
    plan = {e.op: e.path for e in rt.plan()}
    assert all(plan[op] == "native" for op in OPS), plan
    listed = get_registry().record("cuda")
    assert listed.backend.device_type == ("cpu" if listed.backend.interpret else "cuda")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the unavailable listed backend cannot be observed")
    assert not listed.backend.interpret                 # HAL_CUDA_INTERPRET unset: the listed instance is the real one
    with pytest.raises(hal.BackendUnavailable) as err:
        hal.runtime("cuda")
    assert err.value.status == "unavailable"
    assert "CPU-only build" in err.value.reason or "no CUDA device" in err.value.reason, err.value.reason
    with pytest.raises(ValueError, match="takes the option 'interpret'"):
        hal.runtime("cuda", options={"emulate": True})
    assert "TRITON_INTERPRET" not in os.environ


def test_the_environment_only_gives_the_default(no_env):
    from hal_cuda.plugin import CudaBackend
    assert not CudaBackend().interpret and CudaBackend().device_type == "cuda"
    no_env.setenv("HAL_CUDA_INTERPRET", "1")
    b = CudaBackend()
    assert b.interpret and b.device_type == "cpu" and "HAL_CUDA_INTERPRET=1" in b.probe().reason
    real = b.with_options(interpret=False)
    assert not real.interpret and real.device_type == "cuda"
    assert b.with_options().interpret                   # None: the default again
    b.kernels()
    assert "TRITON_INTERPRET" not in os.environ
    no_env.delenv("HAL_CUDA_INTERPRET")
    opt = CudaBackend().with_options(interpret=True)
    assert opt.interpret and "the interpret option" in opt.probe().reason


def test_interpreted_ops_give_the_references_numbers(no_env):
    rt = _interpreted()
    g = torch.Generator().manual_seed(0)
    # fp8_quantize: bitwise, both scale formats, a partial group; a NaN group and an inf: NaN where
    # the reference has NaN (the contract does not fix a NaN's sign bit), bitwise everywhere else
    x = torch.randn(5, 300, generator=g) * 30
    x[1, 3], x[2, 200] = float("nan"), float("inf")
    for fmt in ("fp32", "ue8m0"):
        q, s = rt.fp8_quantize(x, scale_format=fmt)
        rq, rs = KERNELS["fp8_quantize"](x, scale_format=fmt)
        for got, want, bits in ((q, rq, torch.uint8), (s, rs, torch.int32)):
            nan = torch.isnan(want.float())
            assert torch.equal(torch.isnan(got.float()), nan), fmt
            assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan]), fmt
        assert torch.isnan(q[1, :128].float()).all() and not torch.isnan(q[1, 128:].float()).any()
    # moe_route: the same experts, weights within fp32 rounding (grouped, with a correction bias)
    logits = torch.randn(7, 32, generator=g)
    bias = torch.randn(32, generator=g) * 0.1
    for kw in (dict(top_k=4), dict(top_k=4, n_group=4, topk_group=2, correction_bias=bias, scoring="sigmoid"),
               dict(top_k=2, scoring="softmax")):
        w, ids = rt.moe_route(logits, **kw)
        rw, rids = KERNELS["moe_route"](logits, **kw)
        assert torch.equal(ids.long(), rids.long()), kw
        torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-6)
    # sparse_attention: the tensor-core form (16 heads per key head) and the reduce form, fp32 and bf16
    for Hq, Hk, dtype, tol in [(16, 1, torch.float32, 1e-5), (4, 2, torch.float32, 1e-5),
                               (16, 1, torch.bfloat16, 2 ** -8)]:
        B, S, L, K, D = 1, 3, 29, 12, 32
        q = torch.randn(B, S, Hq, D, generator=g).to(dtype)
        k = torch.randn(B, L, Hk, D, generator=g).to(dtype)
        v = torch.randn(B, L, Hk, D, generator=g).to(dtype)
        idx = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B * S)]).view(B, S, K).int()
        idx[0, 1, ::3] = -1
        out, lse = rt.sparse_attention(q, k, v, idx, scale=D ** -0.5, return_lse=True)
        with float64_evaluation():
            ro, rl = KERNELS["sparse_attention"](q, k, v, idx, scale=D ** -0.5, return_lse=True)
        assert out.dtype == dtype
        assert ((out.double() - ro.double()).abs() / (ro.double().abs() + 1)).max().item() <= tol, (Hq, Hk, dtype)
        assert (lse.double() - rl.double()).abs().max().item() <= 1e-5, (Hq, Hk, dtype)
    assert "TRITON_INTERPRET" not in os.environ


def test_kernels_compile_for_sm90_right_after_an_interpreted_launch(no_env, tmp_path):
    """The interpreted launches patch triton.language (the interpreter does, also from device-helper
    calls that it never undoes) and route Triton's standard library through interpreted twins;
    afterwards everything is as it was, and the same kernel objects compile for GPUTarget("cuda",
    90, 32) with ptxas accepting the result."""
    from triton.runtime.jit import JITFunction

    from hal_cuda import aot
    from hal_cuda._triton import Kernel
    from hal_cuda.op_fp8_quantize import _quantize_kernel
    from hal_cuda.op_moe_route import _route_kernel
    no_env.setenv("TRITON_CACHE_DIR", str(tmp_path))    # a fresh cache: the compiler really runs
    no_env.setenv("TRITON_DEFAULT_FP_FUSION", "1")      # Triton 3.9's default, stated (as ci/aot_check.py does)
    before = _lang_state()
    rt = _interpreted()
    x = torch.randn(3, 256)
    q, s = rt.fp8_quantize(x, scale_format="ue8m0")
    assert torch.equal(q.view(torch.uint8), KERNELS["fp8_quantize"](x, scale_format="ue8m0")[0].view(torch.uint8))
    rt.moe_route(torch.randn(4, 16), top_k=2, n_group=4, topk_group=2, correction_bias=torch.zeros(16))
    assert _lang_state() == before
    assert not triton.knobs.runtime.interpret and "TRITON_INTERPRET" not in os.environ
    for kern in (_quantize_kernel, _route_kernel):
        assert isinstance(kern, Kernel) and isinstance(kern, JITFunction)
    configs = {c.kernel: c for c in aot.configurations({"_quantize_kernel", "_route_kernel"})}
    for name in ("_quantize_kernel", "_route_kernel"):
        row = aot.compile_one(configs[name], "sm_90a")                  # triton.compile(GPUTarget("cuda", 90, 32))
        assert row["error"] is None and row["registers"], row
        assert not aot.judge(row), aot.judge(row)
    # and the interpreter still works after the compilation
    q2, _ = rt.fp8_quantize(x, scale_format="ue8m0")
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert "TRITON_INTERPRET" not in os.environ


def test_a_direct_launch_follows_the_instance_mode_else_the_device():
    from hal_cuda._triton import interpreting, mode
    cpu, gpu = torch.empty(1), torch.device("cuda")
    assert interpreting(cpu) and not interpreting(gpu) and not interpreting("cuda:1")
    with mode(True):
        assert interpreting(gpu)
        with mode(False):
            assert not interpreting(cpu)
        assert interpreting(gpu)
    assert interpreting(cpu) and not interpreting(gpu)


def test_every_kernel_and_device_helper_is_defined_for_both_modes():
    """A plain ``triton.jit`` function in hal-cuda would be a JITFunction only (an interpreted
    launch could not call it) or an InterpretedFunction only (TRITON_INTERPRET at import: no GPU
    compile): every one is a :class:`hal_cuda._triton.Kernel`."""
    import importlib
    import pkgutil

    import hal_cuda
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITCallable

    from hal_cuda._triton import Kernel
    found = {}
    for info in pkgutil.iter_modules(hal_cuda.__path__):
        if not (info.name.startswith("op_") or info.name == "_triton"):
            continue
        mod = importlib.import_module(f"hal_cuda.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, (JITCallable, InterpretedFunction)) and obj.fn.__module__ == mod.__name__:
                found[f"{info.name}.{name}"] = type(obj).__name__
    assert len(found) >= 17, found
    assert all(kind == Kernel.__name__ for kind in found.values()), found
