"""Hypothesis sweeps of every contract op: hostile arguments get the documented outputs or a
ContractError naming an argument of the op, never anything else.

Each example starts from the op's own valid sample (``CONTRACT[op].sample``) and spoils one or
two of its arguments: huge, negative or zero ints; NaN / Inf numbers and data; wrong dtypes and
ranks; empty dims; another device ("meta") for one tensor or for all of them; non-contiguous
layouts; a DispatchPlan with one field spoiled; None or a list where a tensor belongs. The oracle
calls the op through ``hal.ops`` (validation, then the CPU reference) and accepts exactly:

- outputs whose count, shapes and dtypes are ``CONTRACT[op].expected_outputs(...)``, on the
  device of the op's first tensor argument, or
- a :class:`hal.ContractError` whose ``op`` is the op and whose ``arg`` is one of its parameters
  (``plan.source`` counts as ``plan``).

Seeded (``derandomize=True``) and bounded: the file runs in about a minute on 2 cores.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hal
from hal.conformance.metrics import check_output_layout

# HAL_FUZZ_EXAMPLES=N HAL_FUZZ_RANDOM=1 widens the sweep for a hunt by hand (CI runs the seeded default)
EXAMPLES = int(os.environ.get("HAL_FUZZ_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=not os.environ.get("HAL_FUZZ_RANDOM"), deadline=None,
                    database=None, suppress_health_check=list(HealthCheck))

HOSTILE_INTS = (2 ** 40, 2 ** 31 - 1, 2 ** 63 - 1, -1, -(2 ** 31), 0, 1, 3, True)
HOSTILE_FLOATS = (float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e38, 2 ** 40)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int32,
          torch.int64, torch.int8, torch.bool, torch.uint8)
TENSOR_SPOILERS = ("nan", "inf", "huge", "negative", "dtype", "rank_up", "rank_down", "empty_dim", "grow_dim",
                   "meta", "noncontiguous", "none", "list")


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a twice-as-long buffer)."""
    if t.dim() == 0 or t.numel() == 0:
        return t
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _spoil_tensor(t: torch.Tensor, how: str, data):
    if how in ("nan", "inf", "huge", "negative"):
        if t.numel() == 0 or t.device.type == "meta":         # no data to spoil
            return t
        t = t.clone()
        pos = data.draw(st.integers(0, t.numel() - 1), label="position")
        flat = t.view(-1)
        if t.is_floating_point() and t.dtype != torch.float8_e4m3fn:
            flat[pos] = {"nan": float("nan"), "inf": float("inf"), "huge": 3e38 if t.dtype == torch.float32 else 6e4,
                         "negative": -abs(float(flat[pos])) - 1}[how]
        elif t.dtype == torch.float8_e4m3fn:
            bits = flat.view(torch.uint8)
            bits[pos] = {"nan": 0x7F, "inf": 0x7E, "huge": 0x7E, "negative": 0xFE}[how]     # NaN / +-448
        elif not t.dtype == torch.bool:
            info = torch.iinfo(t.dtype)
            value = {"nan": -2, "inf": 2 ** 31 - 1, "huge": 2 ** 63 - 1, "negative": -5}[how]
            flat[pos] = max(info.min, min(info.max, value))
        return t
    if how == "dtype":
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        return t.to(dtype) if t.dtype != torch.float8_e4m3fn or dtype.is_floating_point else t.float().to(dtype)
    if how == "rank_up":
        return t.unsqueeze(data.draw(st.integers(0, t.dim()), label="axis"))
    if how == "rank_down":
        return t.flatten() if t.dim() > 1 else t[0] if t.dim() == 1 and t.numel() else t
    if how == "empty_dim":
        if t.dim() == 0:
            return t
        return t.narrow(data.draw(st.integers(0, t.dim() - 1), label="axis"), 0, 0)
    if how == "grow_dim":
        if t.dim() == 0:
            return t
        axis = data.draw(st.integers(0, t.dim() - 1), label="axis")
        return torch.cat([t, t.narrow(axis, 0, min(1, t.shape[axis]))], axis) if t.shape[axis] else t
    if how == "meta":
        return t.to("meta")
    if how == "noncontiguous":
        return _noncontiguous(t)
    if how == "none":
        return None
    return t.tolist() if t.device.type != "meta" else [1.0]                               # "list"


def _spoil(value, data):
    """A hostile replacement for one argument value."""
    if isinstance(value, hal.DispatchPlan):
        fields = [f.name for f in dataclasses.fields(value)]
        name = data.draw(st.sampled_from(fields), label="plan field")
        return dataclasses.replace(value, **{name: _spoil(getattr(value, name), data)})
    if isinstance(value, torch.Tensor):
        return _spoil_tensor(value, data.draw(st.sampled_from(TENSOR_SPOILERS), label="spoiler"), data)
    if isinstance(value, bool):
        return data.draw(st.sampled_from((None, 1, "yes", not value)), label="bool")
    if isinstance(value, int):
        return data.draw(st.sampled_from(HOSTILE_INTS + (float(value),)), label="int")
    if isinstance(value, float):
        return data.draw(st.sampled_from(HOSTILE_FLOATS + (None,)), label="float")
    if isinstance(value, str):
        return data.draw(st.sampled_from(("bogus", "", None, value.upper())), label="str")
    if isinstance(value, torch.dtype):
        return data.draw(st.sampled_from((torch.int8, torch.float64, torch.float8_e4m3fn, "bfloat16")), label="dtype")
    if value is None:                         # an optional tensor: a random one, of a fitting size or not
        shape = data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=3), label="shape")
        return data.draw(st.sampled_from((torch.randn(tuple(shape)), torch.ones(tuple(shape), dtype=torch.int32), 1.0)),
                         label="optional")
    return value


def _all_on_meta(args: dict) -> dict:
    return {k: v.to("meta") if isinstance(v, (torch.Tensor, hal.DispatchPlan)) else v for k, v in args.items()}


def _device_of(arguments: dict):
    for v in arguments.values():
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, hal.DispatchPlan):
            return v.hidden.device
    return None


def _flatten(out) -> list:
    if isinstance(out, hal.DispatchPlan):
        return list(out.tensors())
    return list(out) if isinstance(out, tuple) else [out]


def check_op(op: str, arguments: dict) -> str:
    """Call ``op`` with ``arguments`` (name -> value) and apply the oracle; returns what happened."""
    spec = hal.CONTRACT[op]
    bound = spec.signature.bind_partial()
    bound.arguments.update(arguments)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                        # "meta" has no backend: reference, warned
            out = getattr(hal.ops, op)(*bound.args, **bound.kwargs)
    except hal.ContractError as err:
        assert err.op == op, f"{op}: a ContractError of another op: {err}"
        assert err.arg.split(".")[0] in spec.signature.parameters, f"{op}: names no argument of the op: {err}"
        assert str(err).startswith(f"{op}: {err.arg}: expected "), str(err)
        return "ContractError"
    expected = spec.expected_outputs(*bound.args, **bound.kwargs)
    got = _flatten(out)
    bad = check_output_layout(expected, got)
    assert bad is None, f"{op}: {bad.name}: {bad.message}"
    device = _device_of(arguments)
    assert all(t.device == device for t in got), f"{op}: outputs on {[t.device for t in got]}, inputs on {device}"
    return "outputs"


def _sample(op: str, seed: int) -> dict:
    spec = hal.CONTRACT[op]
    args, kwargs = spec.sample(torch.Generator().manual_seed(seed))
    bound = spec.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@pytest.mark.parametrize("op", list(hal.CONTRACT))
def test_samples_are_valid_and_meet_the_oracle(op):
    # the starting points themselves: documented outputs, no error
    assert check_op(op, _sample(op, 0)) == "outputs"


@pytest.mark.parametrize("op", list(hal.CONTRACT))
def test_hostile_arguments_get_outputs_or_a_contract_error(op):
    seen = []

    @SETTINGS
    @given(data=st.data())
    def sweep(data):
        arguments = _sample(op, data.draw(st.integers(0, 3), label="seed"))
        if data.draw(st.integers(0, 9), label="all on meta") == 0:
            arguments = _all_on_meta(arguments)
        for _ in range(data.draw(st.integers(1, 2), label="spoiled")):
            name = data.draw(st.sampled_from(sorted(arguments)), label="argument")
            arguments[name] = _spoil(arguments[name], data)
        seen.append(check_op(op, arguments))

    sweep()
    # the sweep reached both sides of the oracle (a sweep where everything errors proves little)
    assert seen.count("ContractError") >= EXAMPLES // 4 and "outputs" in seen, (op, seen.count("outputs"))


@pytest.mark.parametrize("op", list(hal.CONTRACT))
def test_all_meta_calls_get_outputs_or_a_contract_error(op):
    arguments = _all_on_meta(_sample(op, 0))
    assert check_op(op, arguments) == ("ContractError" if op in ("moe_dispatch", "ep_dispatch") else "outputs")


def test_the_oracle_rejects_what_it_must():
    # a wrong shape, a foreign error and a ContractError naming no argument all fail the oracle
    args = _sample("fp8_gemm", 0)
    real = hal.ops.fp8_gemm
    try:
        hal.ops.fp8_gemm = lambda *a, **k: real(*a, **k).t()
        with pytest.raises(AssertionError, match="expected shape"):
            check_op("fp8_gemm", args)
        hal.ops.fp8_gemm = lambda *a, **k: torch.empty(2 ** 62)
        with pytest.raises(RuntimeError):
            check_op("fp8_gemm", args)
        hal.ops.fp8_gemm = lambda *a, **k: (_ for _ in ()).throw(hal.ContractError("fp8_gemm", "alpha", "x", "y"))
        with pytest.raises(AssertionError, match="names no argument"):
            check_op("fp8_gemm", args)
    finally:
        hal.ops.fp8_gemm = real
