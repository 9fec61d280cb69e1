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


@pytest.fixture(params=["compiled", "TensorGuards", "python"])
def guards(request, monkeypatch):
    if request.param == "compiled":
        if validation_cache._compiled() is None:
            from hal import compiled_check
            pytest.skip(f"HAL's compiled check is not active: {compiled_check.status()['reason']}")
        return request.param
    monkeypatch.setattr(validation_cache, "_compiled_guard", None)
    monkeypatch.setattr(validation_cache, "_compiled_looked_up", True)
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


def test_the_guard_kind_is_reported(guards):
    kind = validation_cache.guard_kind()
    assert kind.startswith({"compiled": "HAL's compiled check", "TensorGuards": "TensorGuards",
                            "python": "Python tuples"}[guards])
    assert type(validation_cache.tensor_guard((meta(2, 3),))).__name__ == \
        {"compiled": "CompiledGuard", "TensorGuards": "TensorGuards", "python": "PythonTensorGuard"}[guards]


class _CountingDict(dict):
    """The bound op's signature memory, counting lookups (the slow path of a remembered call)."""

    lookups = 0

    def get(self, key, default=None):
        type(self).lookups += 1
        return super().get(key, default)


def test_the_last_signature_is_matched_without_a_lookup(guards, monkeypatch):
    route, calls = _counting_op("moe_route")
    monkeypatch.setattr(_CountingDict, "lookups", 0)
    route.__globals__["_seen"] = _CountingDict()
    x, bias, scale = meta(4, 8), meta(8), 2.5
    route(x, top_k=2, correction_bias=bias, scaling_factor=scale)        # validated, remembered, last
    after_first = _CountingDict.lookups
    for _ in range(3):                                                    # same objects: no dict lookup
        route(meta(4, 8), top_k=2, correction_bias=meta(8), scaling_factor=scale)
    assert (len(calls), _CountingDict.lookups) == (1, after_first)
    route(x, top_k=2, correction_bias=bias, scaling_factor=float("2.5"))  # equal, another object: a lookup
    assert (len(calls), _CountingDict.lookups) == (1, after_first + 1)
    route(x, top_k=2, scaling_factor=scale)                               # bias absent: new signature
    assert len(calls) == 2
    with pytest.raises(hal.ContractError, match="correction_bias"):       # last's values, other tensors
        route(x, top_k=2, correction_bias=meta(7), scaling_factor=float("2.5"))


def test_which_optional_tensor_is_present_is_part_of_the_last_signature(guards):
    """seq_lens then state_indices: the same tensor metadata in the same position of the guard,
    but a different call, so it is validated again."""
    gdr, calls = _counting_op("gated_delta_rule")
    B, T, H, D = 2, 3, 2, 4
    q, k, v = meta(B, T, H, D), meta(B, T, H, D), meta(B, T, H, D)
    g, beta, state = meta(B, T, H), meta(B, T, H), meta(B, H, D, D)
    ints = meta(B, dtype=torch.int32)
    gdr(q, k, v, g, beta, scale=0.5, initial_state=state, seq_lens=ints)
    gdr(q, k, v, g, beta, scale=0.5, initial_state=state, seq_lens=ints)
    assert len(calls) == 1
    gdr(q, k, v, g, beta, scale=0.5, initial_state=state, state_indices=ints)
    assert len(calls) == 2
    with pytest.raises(hal.ContractError, match="state_indices"):        # indices without a state pool
        gdr(q, k, v, g, beta, scale=0.5, state_indices=ints, seq_lens=ints)


def test_only_immutable_values_are_compared_by_identity():
    assert validation_cache.all_immutable(1, 2.0, True, "silu", None, torch.bfloat16, CONTRACT.__class__)
    assert not validation_cache.all_immutable(1, [2])
    assert not validation_cache.all_immutable(bytearray(b"x"))


def test_threads_never_see_half_of_another_threads_last_signature(guards):
    """One thread keeps a valid call remembered as the last signature while another makes a call
    with the same tensors and an invalid value: the invalid one is refused every time."""
    import threading
    route, _ = _counting_op("moe_route")
    x, bias = meta(4, 8), meta(8)
    stop, refused, slipped = threading.Event(), [], []

    def valid():
        while not stop.is_set():
            route(x, top_k=2, correction_bias=bias)

    worker = threading.Thread(target=valid)
    worker.start()
    try:
        for _ in range(2000):
            try:
                route(x, top_k=9, correction_bias=bias)          # more experts than the 8 there are
                slipped.append(1)
            except hal.ContractError:
                refused.append(1)
    finally:
        stop.set()
        worker.join()
    assert (len(refused), len(slipped)) == (2000, 0)
