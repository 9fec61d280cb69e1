"""Bound ops validate a call signature once (hal.validation_cache): a remembered signature skips
the contract check, and every difference validation could see makes the call validated again.
Run once with torch's C++ TensorGuards and once with the Python comparison."""
from __future__ import annotations

import pytest
import torch

import hal
from hal import validation_cache
from hal.binding import make_bound_op
from hal.contract import CONTRACT


@pytest.fixture(params=["TensorGuards", "python"])
def guards(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(validation_cache, "_TensorGuards", None)
    elif validation_cache._TensorGuards is None:
        pytest.skip("torch._C._dynamo.guards.TensorGuards is not usable in this torch build")
    return request.param


def _counting_op(name: str):
    """The op bound to a null kernel, and a list that grows by one per contract check."""
    spec = CONTRACT[name]
    calls = []
    fn = make_bound_op(spec, lambda *a, **k: None, checked=False)

    def validate(*args, **kwargs):
        calls.append(1)
        return spec.validate(*args, **kwargs)

    fn.__globals__["_validate"] = validate
    return fn, calls


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_a_remembered_signature_skips_the_check_and_every_difference_is_checked_again(guards):
    route, calls = _counting_op("moe_route")
    x, bias = meta(4, 8), meta(8)
    route(x, top_k=2, correction_bias=bias, n_group=2, topk_group=1)
    route(meta(4, 8), top_k=2, correction_bias=meta(8), n_group=2, topk_group=1)     # new objects, same signature
    assert len(calls) == 1
    variants = [
        ((meta(5, 8),), dict(top_k=2, correction_bias=bias, n_group=2, topk_group=1)),            # shape
        ((meta(4, 8, dtype=torch.bfloat16),), dict(top_k=2, correction_bias=bias, n_group=2, topk_group=1)),
        ((meta(8, 4).t(),), dict(top_k=2, correction_bias=bias, n_group=2, topk_group=1)),        # strides
        ((x,), dict(top_k=2, n_group=2, topk_group=1)),                                           # bias absent
        ((x,), dict(top_k=3, correction_bias=bias, n_group=2, topk_group=1)),                     # a value
        ((x,), dict(top_k=2, correction_bias=bias, n_group=2, topk_group=1, scaling_factor=2)),  # 1.0 vs int 2
        ((meta(4, 8).requires_grad_(),), dict(top_k=2, correction_bias=bias, n_group=2, topk_group=1)),
    ]
    for i, (args, kwargs) in enumerate(variants):
        route(*args, **kwargs)
        assert len(calls) == 2 + i, f"variant {i} was not validated"
    for args, kwargs in variants:                                   # now each is remembered
        route(*args, **kwargs)
    assert len(calls) == 1 + len(variants)


def test_values_equal_across_types_are_different_signatures(guards):
    route, calls = _counting_op("moe_route")
    route(meta(4, 8), top_k=2, scaling_factor=1.0)
    with pytest.raises(hal.ContractError, match="scaling_factor"):   # True == 1.0, but a bool is refused
        route(meta(4, 8), top_k=2, scaling_factor=True)
    with pytest.raises(hal.ContractError, match="top_k"):            # 2 cached; True == 1 is a new key
        route(meta(4, 8), top_k=True)
    assert len(calls) == 3


def test_a_bad_call_after_a_good_one_with_the_same_values_is_refused(guards):
    route, calls = _counting_op("moe_route")
    bias = meta(8)
    route(meta(4, 8), top_k=2, correction_bias=bias)
    with pytest.raises(hal.ContractError, match="correction_bias"):
        route(meta(4, 8), top_k=2, correction_bias=meta(7))
    with pytest.raises(hal.ContractError, match="router_logits"):
        route(meta(4, 8, dtype=torch.int32), top_k=2, correction_bias=bias)
    with pytest.raises(hal.ContractError, match="router_logits"):
        route([[0.0] * 8] * 4, top_k=2, correction_bias=bias)
    with pytest.raises(hal.ContractError, match="correction_bias"):   # same shape, another device
        route(meta(4, 8), top_k=2, correction_bias=torch.empty(8))


def test_cpu_calls_are_never_remembered(guards):
    route, calls = _counting_op("moe_route")
    x = torch.randn(4, 8)
    route(x, top_k=2)
    route(x, top_k=2)
    assert len(calls) == 2


def test_one_tensor_passed_twice_is_remembered(guards):
    """MLA attention passes the latent cache as both k and v: the same object twice."""
    attn, calls = _counting_op("sparse_attention")
    q, kv = meta(1, 2, 4, 16), meta(1, 6, 1, 16)
    idx = meta(1, 2, 3, dtype=torch.int32)
    for _ in range(3):
        attn(q, kv, kv, idx, scale=0.25)
    assert len(calls) == 1
    attn(q, kv, meta(1, 6, 1, 16), idx, scale=0.25)        # distinct objects of the same signature
    assert len(calls) <= 2


def test_dispatch_plans_are_compared_field_by_field(guards):
    experts, calls = _counting_op("moe_experts")
    from hal.contract import DispatchPlan

    def plan(T=4, top_k=2, H=16):
        return DispatchPlan(meta(8, H), meta(4, dtype=torch.int32), meta(5, dtype=torch.int32),
                            meta(8, dtype=torch.int64), num_tokens=T, top_k=top_k)
    w13, w2 = meta(4, 16, 16), meta(4, 16, 8)
    experts(plan(), w13, w2)
    experts(plan(), w13, w2)
    assert len(calls) == 1
    experts(plan(T=8, top_k=1), w13, w2)                  # the plan's integers are part of the signature
    assert len(calls) == 2
    with pytest.raises(hal.ContractError, match="w_gate_up"):
        experts(plan(H=12), w13, w2)                      # hidden's width differs from the weights'
    with pytest.raises(hal.ContractError, match="plan"):
        experts("not a plan", w13, w2)


def test_the_cache_is_bounded(guards, monkeypatch):
    monkeypatch.setattr(validation_cache, "MAX_GUARDS_PER_KEY", 3)
    route, calls = _counting_op("moe_route")
    for t in range(1, 6):
        route(meta(t, 8), top_k=2)
    seen = route.__globals__["_seen"]
    assert [len(g) for g in seen.values()] == [3]
    route(meta(5, 8), top_k=2)                            # the newest is kept
    route(meta(1, 8), top_k=2)                            # the oldest was dropped
    assert len(calls) == 6


def test_the_guard_kind_is_reported():
    assert validation_cache.guard_kind() in ("TensorGuards (C++)", "Python tuples")
