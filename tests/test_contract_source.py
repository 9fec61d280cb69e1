"""The contract is the single source of truth: every generated surface follows the specs, a new op
defined in one place appears everywhere, kernels are checked against the specs at load, the
registry keeps names unique and probes bounded, and the project's contract text is its own."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hal
from hal.backend import Availability, Backend, OpCapability
from hal.contract import CONTRACT, TensorMeta, add_op, op_spec
from hal.contract import _checks as c
from hal.contract._spec import FloatBudget
from hal.registry import Registry, get_registry, kernel_signature_problem

ROOT = Path(__file__).resolve().parents[1]


def _sample(op):
    return CONTRACT[op].sample(torch.Generator().manual_seed(3))


def _flat(out):
    if isinstance(out, hal.DispatchPlan):
        return list(out.tensors())
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("op", [op for op, spec in CONTRACT.items() if spec.family != "test"])
def test_meta_matches_what_the_reference_returns(op):
    """Each spec's ``meta`` (which generates the fakes and the output checks) agrees with the
    reference on the spec's own sample: an independent check of every meta function."""
    args, kwargs = _sample(op)
    got = _flat(getattr(hal.runtime("cpu"), op)(*args, **kwargs))
    want = CONTRACT[op].expected_outputs(*args, **kwargs)
    assert len(got) == len(want)
    for t, (name, shape, dtype) in zip(got, want):
        assert t.dtype == dtype, name
        assert len(t.shape) == len(shape) and all(w is None or w == g for w, g in zip(shape, t.shape)), name


def test_docs_contract_md_is_generated_and_current():
    from hal.contract.doc import render
    committed = (ROOT / "docs" / "contract.md").read_text()
    assert committed == render(), "docs/contract.md is stale: run `python -m hal.contract.doc --write`"
    for op, spec in CONTRACT.items():
        assert f"### `{op}`" in committed or spec.family == "test"


def test_nothing_in_the_repository_points_outside_it():
    outside = "/".join(("shared", "SPEC"))        # spelled apart so that this file does not match itself
    out = subprocess.run(["git", "grep", "-n", "-I", outside, "--", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout == "", out.stdout


# --- an op defined in this test alone ---------------------------------------------------------

def _scaled_add_meta(a):
    return (TensorMeta(tuple(a.x.shape), a.x.dtype),)


@op_spec(family="test", summary="x + alpha * y (an op that exists only in this test)",
         outputs={"out": FloatBudget()}, meta=_scaled_add_meta,
         sample=lambda g: ((torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)), dict(alpha=0.5)))
def scaled_add_for_test(x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0):
    """out = x + alpha * y; x, y [..] of one float dtype and shape."""
    op = "scaled_add_for_test"
    c.tensor(op, "x", x, dtypes=c.FLOAT_DTYPES)
    c.tensor(op, "y", y, dtypes=(x.dtype,))
    c.shape(op, "y", y, tuple(x.shape), "as x")
    c.number(op, "alpha", alpha)


def _scaled_add_reference(x, y, *, alpha):
    from hal.backends.cpu._precision import acc, rounded
    return rounded(x.to(acc()) + alpha * y.to(acc()), x.dtype)


@pytest.fixture(scope="module")
def new_op():
    from hal.backends.cpu import register_kernel
    from hal.conformance.cases import Case, register_cases
    if "scaled_add_for_test" not in CONTRACT:
        add_op(scaled_add_for_test)
        register_kernel("scaled_add_for_test", _scaled_add_reference)
        register_cases("scaled_add_for_test", lambda level: [
            Case("scaled_add_for_test", "small", lambda g: ((torch.randn(4, 6, generator=g),
                                                             torch.randn(4, 6, generator=g)), dict(alpha=2.0))),
            Case("scaled_add_for_test", "bf16", lambda g: ((torch.randn(2, 3, generator=g).bfloat16(),
                                                            torch.randn(2, 3, generator=g).bfloat16()), dict(alpha=-1.0)))])
    return scaled_add_for_test


def test_a_new_op_gets_every_generated_surface(new_op):
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    want = x + 0.25 * y
    # hal.ops and a fresh runtime's bound op, with the spec's signature, docstring and validation
    torch.testing.assert_close(hal.ops.scaled_add_for_test(x, y, alpha=0.25), want)
    rt = hal.runtime("cpu")
    torch.testing.assert_close(rt.scaled_add_for_test(x, y, alpha=0.25), want)
    assert "alpha * y" in rt.scaled_add_for_test.__doc__
    with pytest.raises(hal.ContractError, match="scaled_add_for_test: y"):
        rt.scaled_add_for_test(x, torch.randn(2, 4))
    assert any(e.op == "scaled_add_for_test" for e in rt.plan())
    # torch.ops.hal with a fake: opcheck and a fullgraph compile
    torch.testing.assert_close(torch.ops.hal.scaled_add_for_test(x, y, 0.25), want)
    torch.library.opcheck(torch.ops.hal.scaled_add_for_test.default, (x, y, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: torch.ops.hal.scaled_add_for_test(a, b, 0.25) * 2, fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), want * 2)
    # the overhead benchmark's inputs; the contract document stays HAL's own
    from hal.contract.doc import render
    from hal.overhead import tiny_args
    args, kwargs = tiny_args("scaled_add_for_test")
    assert args[0].shape == (3, 5) and kwargs == {"alpha": 0.5}
    assert "scaled_add_for_test" not in render()          # HAL's own text lists HAL's families only


def test_a_new_op_is_certified_and_a_wrong_kernel_fails(new_op):
    from hal.conformance.runner import certify
    run = certify("cpu", ops=["scaled_add_for_test"])
    assert [r.status for r in run.results] == ["PASS", "PASS"]
    wrong = Backend("wrong-scaled-add", kernels={"scaled_add_for_test": lambda x, y, *, alpha: x - alpha * y},
                    capabilities={"scaled_add_for_test": OpCapability()})
    get_registry().register_backend(wrong)
    try:
        run = certify("wrong-scaled-add", ops=["scaled_add_for_test"])
        assert [r.status for r in run.results] == ["FAIL", "FAIL"]
    finally:
        get_registry().unregister("wrong-scaled-add")


# --- kernels checked against the specs when a backend loads ------------------------------------

def test_signature_check_names_the_op_and_parameter():
    spec = CONTRACT["fp8_quantize"]

    def renamed(x, *, group=128, scale_format="fp32"):
        return None

    def reordered(y, *, group_size, scale_format):
        return None

    def fine(x, *, group_size, scale_format):
        return None

    def extra_required(x, *, group_size, scale_format, stream):
        return None

    assert "group_size" in kernel_signature_problem(spec, renamed)
    assert "'y'" in kernel_signature_problem(spec, reordered)
    assert kernel_signature_problem(spec, fine) is None
    assert kernel_signature_problem(spec, lambda *a, **k: None) is None
    assert "stream" in kernel_signature_problem(spec, extra_required)
    for op, kernel in get_registry().reference().backend.kernels().items():
        assert kernel_signature_problem(CONTRACT[op], kernel) is None, op


def test_a_plugin_with_a_renamed_parameter_is_incompatible():
    def fp8_quantize(x, *, group=128, scale_format="fp32"):
        raise AssertionError("never called")

    reg = Registry(discover_entry_points=False)
    rec = reg.register_backend(Backend("renamed", kernels={"fp8_quantize": fp8_quantize}))
    rec = reg.record("renamed")
    assert rec.status == "incompatible"
    assert "fp8_quantize" in rec.reason and "group_size" in rec.reason
    with pytest.raises(hal.BackendUnavailable, match="incompatible"):
        hal.runtime("renamed", registry=reg)


# --- names and probes ---------------------------------------------------------------------------

def test_taken_names_are_refused():
    reg = Registry(discover_entry_points=False)
    reg.register_backend(Backend("dup", kernels={}))
    with pytest.raises(ValueError, match="already taken"):
        reg.register_backend(Backend("dup", kernels={}))
    with pytest.raises(ValueError, match="reserved"):
        get_registry().register_backend(Backend("cpu", kernels={}))
    assert get_registry().record("cpu").distribution == "hal"


def test_a_slow_probe_times_out():
    class Slow(Backend):
        name = "slow"

        def probe(self):
            time.sleep(5)
            return Availability(True, "finally")

    reg = Registry(discover_entry_points=False, probe_timeout_s_=0.3)
    reg.register_backend(Slow())
    t0 = time.perf_counter()
    rec = reg.record("slow")
    assert time.perf_counter() - t0 < 2.0
    assert rec.status == "unavailable" and "probe timed out after 0.3 s" in rec.reason


# --- checked mode: output shapes and dtypes -----------------------------------------------------

def test_checked_runtime_rejects_a_kernel_with_the_wrong_output_layout():
    from hal.backends.cpu import KERNELS
    from hal.errors import KernelOutputError

    def transposed(q, k, v, indices, *, scale, return_lse):
        out = KERNELS["sparse_attention"](q, k, v, indices, scale=scale, return_lse=return_lse)
        return (out[0].transpose(1, 2).contiguous(), out[1]) if return_lse else out.transpose(1, 2).contiguous()

    backend = Backend("transposing", kernels={"sparse_attention": transposed},
                      capabilities={"sparse_attention": OpCapability()})
    get_registry().register_backend(backend)
    try:
        args, kwargs = _sample("sparse_attention")
        loose = hal.runtime("transposing", checked=False)
        assert loose.sparse_attention(*args, **kwargs)[0].shape == (1, 2, 2, 16)   # B=1, Hq=2, S=2: same shape
        q = torch.randn(1, 3, 2, 16)                                              # S=3 != Hq=2
        idx = torch.tensor([[[0, 1], [2, -1], [3, 4]]], dtype=torch.int32)
        strict = hal.runtime("transposing", checked=True)
        with pytest.raises(KernelOutputError, match=r"sparse_attention: backend 'transposing' returned out: "
                                                    r"expected shape \(1, 3, 2, 16\), got \(1, 2, 3, 16\)"):
            strict.sparse_attention(q, args[1], args[2], idx, scale=0.25)
    finally:
        get_registry().unregister("transposing")


def test_validation_is_cached_only_where_no_data_check_applies():
    rt = hal.runtime("cpu")
    ids = torch.tensor([[0, 1], [1, 5]], dtype=torch.int32)
    with pytest.raises(hal.ContractError, match="expert_ids"):
        rt.moe_dispatch(torch.randn(2, 4), ids, 4)
    ok = torch.tensor([[0, 1], [1, 3]], dtype=torch.int32)
    rt.moe_dispatch(torch.randn(2, 4), ok, 4)
    with pytest.raises(hal.ContractError, match="expert_ids"):      # same shapes: CPU data checks still run
        rt.moe_dispatch(torch.randn(2, 4), ids, 4)
    with pytest.raises(hal.ContractError, match="top_k"):           # a value change is a new key
        rt.moe_route(torch.randn(2, 4), top_k=2)
        rt.moe_route(torch.randn(2, 4), top_k=5)


def test_prepare_weights_returns_equal_tensors():
    rt = hal.runtime("cpu")
    w = torch.randn(2, 8, 4)
    out = rt.prepare_weights("moe_experts", w_gate_up=w, w_down=torch.randn(2, 4, 4))
    assert out["w_gate_up"] is w


def test_version_and_help_answer_without_importing_torch():
    import shutil
    exe = shutil.which("hal")
    assert exe, "the hal console script is not installed"
    for flag in ("--version", "--help"):
        out = subprocess.run([sys.executable, "-X", "importtime", exe, flag], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
        assert "torch" not in imported, f"hal {flag} imported torch"
    assert f"hal {hal.__version__} (contract {hal.CONTRACT_VERSION})" in subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=60).stdout


def test_the_checkout_root_resolves_hal_subpackages_without_an_install(tmp_path):
    """Python started in a clone's root imports the source folder hal/, not the installed package:
    hal.models, hal.conformance and hal.backends.cpu must resolve there from the folders beside it."""
    import shutil
    for name in ("hal", "models", "conformance", "backends/cpu"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    code = ("import hal, hal.models, hal.conformance, hal.backends.cpu; "
            "print(hal.models.__file__); print(hal.backends.cpu.__file__); print(hal.conformance.__file__)")
    # -S with site-packages on PYTHONPATH: the installed packages, but not the .pth hooks of this
    # checkout's own editable install (which would map hal.* to the checkout, not to the copy)
    import os
    import site
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in out.stdout.split():
        assert line.startswith(str(tmp_path)), out.stdout
