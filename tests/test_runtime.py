"""The runtime: binding once, plans, fallback policy, per-call capability checks, profiling."""
from __future__ import annotations

import inspect

import pytest
import torch

import hal
from hal.backends.cpu import KERNELS
from hal.registry import get_registry


def _quantize_only_backend(name="quantonly", supports=None, path="native"):
    calls = []

    def fp8_quantize(x, *, group_size, scale_format):
        calls.append(x.shape)
        return KERNELS["fp8_quantize"](x, group_size=group_size, scale_format=scale_format)

    caps = {"fp8_quantize": hal.OpCapability(path, ("bfloat16",), "test kernel", supports=supports)}
    return hal.Backend(name, capabilities=caps, kernels={"fp8_quantize": fp8_quantize}), calls


@pytest.fixture
def register(fresh_registry):
    names = []

    def add(backend):
        get_registry().register_backend(backend)
        names.append(backend.name)
        return backend

    yield add
    for n in names:
        get_registry().unregister(n)


def test_cpu_plan_is_all_native():
    rt = hal.runtime("cpu")
    plan = rt.plan()
    assert [e.op for e in plan] == list(hal.CONTRACT)
    assert {(e.backend, e.path) for e in plan} == {("cpu", "native")}
    assert "moe_route" in rt.plan_table()


def test_bound_ops_carry_the_contract_signature_and_doc():
    rt = hal.runtime("cpu")
    for name, spec in hal.CONTRACT.items():
        fn = getattr(rt, name)
        assert inspect.signature(fn) == spec.signature
        assert fn.__doc__ == spec.doc and fn.__doc__
        assert inspect.signature(getattr(hal.ops, name)) == spec.signature


def test_bound_op_validates():
    rt = hal.runtime("cpu")
    with pytest.raises(hal.ContractError, match="moe_route: top_k"):
        rt.moe_route(torch.randn(3, 4), top_k=5)
    rt_fast = hal.runtime("cpu", validate=False)
    # without validation the bad call reaches the kernel unchecked: the caller owns the guarantees
    w, ids = rt_fast.moe_route(torch.randn(3, 4), top_k=5)
    assert ids.shape == (3, 4)


def test_missing_ops_fall_back_to_reference_and_are_recorded(register):
    backend, calls = _quantize_only_backend()
    register(backend)
    with pytest.warns(RuntimeWarning, match="does not implement moe_route"):
        rt = hal.runtime("quantonly")
    paths = {e.op: e.path for e in rt.plan()}
    assert paths["fp8_quantize"] == "native"
    assert {p for op, p in paths.items() if op != "fp8_quantize"} == {"fallback"}
    w, ids = rt.moe_route(torch.tensor([[0.0, 3.0, 1.0]]), top_k=1)
    assert ids.tolist() == [[1]] and w.tolist() == [[1.0]]
    rt.fp8_quantize(torch.ones(2, 4))
    assert calls == [torch.Size([2, 4])]


def test_fallback_error_refuses_at_bind_time(register):
    register(_quantize_only_backend()[0])
    with pytest.raises(hal.UnsupportedCase, match="does not implement"):
        hal.runtime("quantonly", fallback="error")
    with pytest.raises(ValueError, match="fallback"):
        hal.runtime("cpu", fallback="silently")


def test_supports_refusal_falls_back_per_call_and_is_counted(register):
    def only_bf16(x, *, group_size, scale_format):
        return None if x.dtype == torch.bfloat16 else f"dtype {x.dtype} not supported"

    full = {op: KERNELS[op] for op in hal.CONTRACT}
    backend, calls = _quantize_only_backend("picky", supports=only_bf16)
    backend._kernels = {**full, "fp8_quantize": backend.kernels()["fp8_quantize"]}
    backend._caps = {**{op: hal.OpCapability() for op in full}, **backend.capabilities()}
    register(backend)
    rt = hal.runtime("picky")
    rt.fp8_quantize(torch.ones(2, 4, dtype=torch.bfloat16))
    with pytest.warns(RuntimeWarning, match="fell back"):
        q, s = rt.fp8_quantize(torch.ones(2, 4))
    assert s.tolist() == [[1 / 448], [1 / 448]] or torch.allclose(s, torch.full((2, 1), 1 / 448))
    assert len(calls) == 1
    entry = {e.op: e for e in rt.plan()}["fp8_quantize"]
    assert entry.fallback_calls == 1 and "not supported" in entry.fallback_reason
    strict = hal.runtime("picky", fallback="error")
    with pytest.raises(hal.UnsupportedCase, match="not supported"):
        strict.fp8_quantize(torch.ones(2, 4))


def test_profile_counts_calls_and_time():
    rt = hal.runtime("cpu", profile=True)
    x = torch.randn(4, 256)
    for _ in range(3):
        rt.fp8_quantize(x)
    e = {e.op: e for e in rt.plan()}["fp8_quantize"]
    assert e.calls == 3 and e.total_s > 0
    assert "calls" in rt.plan_table()
    rt.reset_stats()
    assert {e.op: e for e in rt.plan()}["fp8_quantize"].calls == 0


def test_emulated_path_is_reported(register):
    full = {op: KERNELS[op] for op in hal.CONTRACT}
    caps = {op: hal.OpCapability() for op in full}
    caps["fp8_gemm"] = hal.OpCapability("emulated", ("bfloat16",), "FP8 via bf16 dequantization")
    register(hal.Backend("emu", capabilities=caps, kernels=full))
    entry = {e.op: e for e in hal.runtime("emu").plan()}["fp8_gemm"]
    assert (entry.path, entry.reason) == ("emulated", "FP8 via bf16 dequantization")
    with pytest.raises(ValueError, match="path"):
        hal.OpCapability("magic")


def test_ops_dispatch_on_device_type(register):
    seen = []

    def meta_quantize(x, *, group_size, scale_format):
        seen.append(x.device.type)
        return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device="meta"),
                torch.empty(*x.shape[:-1], 1, device="meta"))

    full = {op: KERNELS[op] for op in hal.CONTRACT}
    caps = {op: hal.OpCapability() for op in full}
    register(hal.Backend("metadev", device_type="meta", capabilities=caps, kernels={**full, "fp8_quantize": meta_quantize}))
    hal.ops._reset()
    q, s = hal.ops.fp8_quantize(torch.ones(2, 4, device="meta"))
    assert seen == ["meta"] and q.device.type == "meta"
    q, s = hal.ops.fp8_quantize(torch.ones(2, 4))          # cpu tensors -> the reference
    assert seen == ["meta"] and s.shape == (2, 1)
    assert hal.ops.runtime_for("cpu").backend_name == "cpu"
    assert hal.ops.runtime_for("meta").backend_name == "metadev"
    hal.ops._reset()


def test_ops_validate_non_tensor_first_argument():
    with pytest.raises(hal.ContractError, match="fp8_quantize: x: expected a torch.Tensor"):
        hal.ops.fp8_quantize([1.0, 2.0])


def test_reference_fallback_moves_plans_and_tuples():
    from hal.binding import _device_of, to_device
    plan = KERNELS["moe_dispatch"](torch.randn(2, 4), torch.tensor([[0], [1]]), 2)
    moved = to_device((plan, torch.ones(1)), "meta")
    assert moved[0].hidden.device.type == "meta" and moved[1].device.type == "meta"
    assert _device_of((moved[0],), {}).type == "meta"
