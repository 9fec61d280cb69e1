"""The CPU reference for the MoE family: hand-computed cases, float64 cross-checks, invariants."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hal
from hal.backends.cpu import float64_evaluation, KERNELS

ops = hal.ops


# ---- moe_route ---------------------------------------------------------------------------------

def test_route_sigmoid_ties_renormalize_scale():
    # s = sigmoid([0, ln3, -ln3, ln3]) = [1/2, 3/4, 1/4, 3/4]; top-2 = experts 1 and 3 (tie -> lower
    # index first); w = [3/4, 3/4] -> renormalized [1/2, 1/2] -> x2.5 = [1.25, 1.25]
    logits = torch.tensor([[0.0, math.log(3), -math.log(3), math.log(3)]])
    w, ids = ops.moe_route(logits, top_k=2, scaling_factor=2.5)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(w, torch.tensor([[1.25, 1.25]]))


def test_route_bias_selects_but_does_not_weight():
    # c = s + bias = [0.5, 0.75, 0.85, 0.75] -> ids [2, 1]; w = s[ids] = [1/4, 3/4] (renormalized: same)
    logits = torch.tensor([[0.0, math.log(3), -math.log(3), math.log(3)]])
    w, ids = ops.moe_route(logits, top_k=2, correction_bias=torch.tensor([0.0, 0.0, 0.6, 0.0]))
    assert ids.tolist() == [[2, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.75]]))
    w, _ = ops.moe_route(logits, top_k=2, correction_bias=torch.tensor([0.0, 0.0, 0.6, 0.0]), renormalize=False)
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.75]]))


def test_route_softmax():
    # exp = [1, 2, 3, 2], sum 8 -> s = [1/8, 2/8, 3/8, 2/8]; top-2 = [2, 1] (tie 1 vs 3 -> 1)
    logits = torch.tensor([[0.0, math.log(2), math.log(3), math.log(2)]])
    w, ids = ops.moe_route(logits, top_k=2, scoring="softmax", renormalize=False)
    assert ids.tolist() == [[2, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.375, 0.25]]))
    w, _ = ops.moe_route(logits, top_k=2, scoring="softmax")            # 3/8 / (5/8), 2/8 / (5/8)
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.4]]))


def test_route_group_limited():
    # logits 0 -> s = 0.5 everywhere; c = 0.5 + bias. Groups of 2 (n_group=4):
    # g0 = 0.95 + 0.5 = 1.45, g1 = 0.8 + 0.8 = 1.6, g2 = 0.5 + 0.5 = 1.0, g3 = 0.7 + 0.76 = 1.46
    # keep 2 groups -> g1, g3 -> experts {2, 3, 6, 7}: top-3 = [2, 3, 7] (expert 0, the best single
    # score, is excluded by its group). Without groups: [0, 2, 3].
    bias = torch.tensor([0.45, 0.0, 0.3, 0.3, 0.0, 0.0, 0.2, 0.26])
    logits = torch.zeros(1, 8)
    _, ids = ops.moe_route(logits, top_k=3, correction_bias=bias, n_group=4, topk_group=2)
    assert ids.tolist() == [[2, 3, 7]]
    _, ids = ops.moe_route(logits, top_k=3, correction_bias=bias)
    assert ids.tolist() == [[0, 2, 3]]
    # group tie: g0 = g3 = 1.45 -> the lower group (g0) is kept: experts {0, 1, 2, 3} -> [0, 2, 3]
    bias[7] = 0.25
    w, ids = ops.moe_route(logits, top_k=3, correction_bias=bias, n_group=4, topk_group=2)
    assert ids.tolist() == [[0, 2, 3]]
    torch.testing.assert_close(w, torch.full((1, 3), 1 / 3))


def test_route_nan_ranks_last_and_weights_carry_it():
    logits = torch.tensor([[float("nan"), 1.0, 2.0]])
    _, ids = ops.moe_route(logits, top_k=2)
    assert ids.tolist() == [[2, 1]]
    w, ids = ops.moe_route(logits, top_k=3)
    assert ids.tolist() == [[2, 1, 0]] and torch.isnan(w).all()       # renormalized by a NaN sum


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 6), groups=st.sampled_from([1, 2, 4]), per_group=st.integers(2, 4),
       scoring=st.sampled_from(["sigmoid", "softmax"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_route_against_python_loops(T, groups, per_group, scoring, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    E = groups * per_group
    topk_group = max(1, groups // 2)
    k = min(3, topk_group * per_group)
    logits = torch.randn(T, E, generator=g).to(dtype)
    bias = torch.rand(E, generator=g) * 0.1
    w, ids = ops.moe_route(logits, top_k=k, scoring=scoring, correction_bias=bias, n_group=groups,
                           topk_group=topk_group, scaling_factor=1.5)
    assert w.shape == (T, k) and ids.shape == (T, k)
    for t in range(T):
        x = [float(v) for v in logits[t].float()]
        if scoring == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in x]
        else:
            z = sum(math.exp(v) for v in x)
            s = [math.exp(v) / z for v in x]
        c = [s[e] + float(bias[e]) for e in range(E)]
        gscore = [sum(sorted(c[i * per_group:(i + 1) * per_group], reverse=True)[:2]) for i in range(groups)]
        kept = sorted(range(groups), key=lambda i: (-gscore[i], i))[:topk_group]
        cand = [e for e in range(E) if e // per_group in kept]
        want = sorted(cand, key=lambda e: (-c[e], e))[:k]
        got = ids[t].tolist()
        # the reference computes in fp32: allow swaps only between near-ties
        for a, b in zip(got, want):
            assert a == b or abs(c[a] - c[b]) < 1e-6
        tot = sum(s[e] for e in got)
        for j, e in enumerate(got):
            assert abs(float(w[t, j]) - 1.5 * s[e] / tot) < 1e-5


def test_route_softmax_weights_sum_to_scaling_factor():
    w, _ = ops.moe_route(torch.randn(32, 16), top_k=4, scoring="softmax", scaling_factor=2.0)
    torch.testing.assert_close(w.sum(-1), torch.full((32,), 2.0))


# ---- moe_dispatch ------------------------------------------------------------------------------

IDS = torch.tensor([[1, 0], [1, -1], [0, 2]], dtype=torch.int32)
# copies j = t*k + slot: 0:(t0,e1) 1:(t0,e0) 2:(t1,e1) 3:(t1,none) 4:(t2,e0) 5:(t2,e2)


@pytest.mark.parametrize("align,offsets,source", [
    (1, [0, 2, 4, 5], [1, 4, 0, 2, 5]),
    (2, [0, 2, 4, 6], [1, 4, 0, 2, 5, -1]),
    (4, [0, 4, 8, 12], [1, 4, -1, -1, 0, 2, -1, -1, 5, -1, -1, -1]),
])
def test_dispatch_hand_computed(align, offsets, source):
    hidden = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    plan = ops.moe_dispatch(hidden, IDS, 3, align=align)
    assert plan.tokens_per_expert.tolist() == [2, 2, 1] and plan.tokens_per_expert.dtype == torch.int32
    assert plan.offsets.tolist() == offsets and plan.offsets.dtype == torch.int32
    assert plan.source.tolist() == source and plan.source.dtype == torch.int64
    want = torch.stack([hidden[s // 2] if s >= 0 else torch.zeros(2) for s in source])
    assert torch.equal(plan.hidden, want)
    assert (plan.num_tokens, plan.top_k, plan.align) == (3, 2, align)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 9), k=st.integers(1, 4), E=st.integers(1, 6), align=st.sampled_from([1, 2, 3, 8]),
       drop=st.booleans(), seed=st.integers(0, 2**16))
def test_dispatch_invariants(T, k, E, align, drop, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, k), generator=g)
    if drop:
        ids[torch.rand(T, k, generator=g) < 0.3] = -1
    hidden = torch.randn(T, 5, generator=g).to(torch.bfloat16)
    plan = ops.moe_dispatch(hidden, ids, E, align=align)
    counts = [int((ids == e).sum()) for e in range(E)]
    assert plan.tokens_per_expert.tolist() == counts
    off = plan.offsets.tolist()
    assert off[0] == 0 and off[-1] == plan.hidden.shape[0] == plan.source.shape[0]
    for e in range(E):
        seg = plan.source[off[e]:off[e + 1]].tolist()
        assert (off[e + 1] - off[e]) % align == 0 and off[e + 1] - off[e] - counts[e] < align
        real, pad = seg[:counts[e]], seg[counts[e]:]
        assert real == sorted(j for j in range(T * k) if int(ids.view(-1)[j]) == e)   # by token, then slot
        assert all(p == -1 for p in pad)
        for r, j in zip(range(off[e], off[e + 1]), seg):
            assert torch.equal(plan.hidden[r], hidden[j // k] if j >= 0 else torch.zeros(5, dtype=torch.bfloat16))


# ---- moe_experts / moe_combine / moe_forward ---------------------------------------------------

def test_experts_hand_computed():
    # x = [1, 2]; w_gate_up = [[1,0],[0,1],[1,1],[0,0]] -> h = [1, 2, 3, 0], g = [1, 2], u = [3, 0]
    # a = silu(g) * u = [3 silu(1), 0] = [3 / (1 + e^-1), 0]; w_down = [[1,0],[2,1]] -> y = [a0, 2 a0]
    plan = ops.moe_dispatch(torch.tensor([[1.0, 2.0]]), torch.tensor([[0]]), 1)
    w_gu = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    w_d = torch.tensor([[[1.0, 0.0], [2.0, 1.0]]])
    y = ops.moe_experts(plan, w_gu, w_d)
    a0 = 3 / (1 + math.exp(-1))
    torch.testing.assert_close(y, torch.tensor([[a0, 2 * a0]]))


def test_experts_padding_rows_are_zero_and_empty_experts_skip():
    hidden = torch.randn(3, 8)
    plan = ops.moe_dispatch(hidden, IDS, 4, align=4)                 # expert 3 gets no token
    y = ops.moe_experts(plan, torch.randn(4, 6, 8), torch.randn(4, 8, 3))
    assert y.shape == (12, 8) and plan.offsets.tolist() == [0, 4, 8, 12, 12]
    assert torch.all(y[plan.source < 0] == 0) and torch.all(y[plan.source >= 0].abs().sum(-1) > 0)


def test_combine_hand_computed():
    # rows (align=1) hold copies [1, 4, 0, 2, 5]; expert_out[r] = r + 1
    # out[t0] = 0.5 * row(j0 = 2 -> 3) + 0.25 * row(j1 = 0 -> 1) = 1.75
    # out[t1] = 2 * row(j2 = 3 -> 4) = 8 (slot 1 has no expert: its weight 9 is ignored)
    # out[t2] = 1 * row(j4 = 1 -> 2) + 3 * row(j5 = 4 -> 5) = 17
    plan = ops.moe_dispatch(torch.randn(3, 2), IDS, 3)
    expert_out = torch.arange(1.0, 6.0)[:, None].repeat(1, 2)
    weights = torch.tensor([[0.5, 0.25], [2.0, 9.0], [1.0, 3.0]])
    out = ops.moe_combine(expert_out, plan, weights)
    torch.testing.assert_close(out, torch.tensor([[1.75, 1.75], [8.0, 8.0], [17.0, 17.0]]))
    all_dropped = ops.moe_dispatch(torch.randn(2, 2), torch.full((2, 1), -1), 3)
    assert torch.equal(ops.moe_combine(torch.zeros(0, 2), all_dropped, torch.ones(2, 1)), torch.zeros(2, 2))


def _ffn64(x, w_gu, w_d):
    h = [sum(float(w_gu[i, j]) * float(x[j]) for j in range(len(x))) for i in range(w_gu.shape[0])]
    half = len(h) // 2
    a = [h[i] / (1 + math.exp(-h[i])) * h[half + i] for i in range(half)]
    return [sum(float(w_d[o, i]) * a[i] for i in range(half)) for o in range(w_d.shape[0])]


@pytest.mark.parametrize("align", [1, 4])
def test_experts_and_combine_against_float64_loops(align):
    g = torch.Generator().manual_seed(3)
    T, H, I, E, k = 5, 6, 4, 4, 2
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    w_gu, w_d = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    w, ids = ops.moe_route(logits, top_k=k)
    plan = ops.moe_dispatch(x, ids, E, align=align)
    with float64_evaluation():
        out = KERNELS["moe_combine"](KERNELS["moe_experts"](plan, w_gu, w_d), plan, w)
    assert out.dtype == torch.float64
    for t in range(T):
        want = [0.0] * H
        for j in range(k):
            y = _ffn64(x[t], w_gu[int(ids[t, j])], w_d[int(ids[t, j])])
            want = [a + float(w[t, j]) * b for a, b in zip(want, y)]
        assert torch.allclose(out[t], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # fp32 working precision stays close to the float64 evaluation
    out32 = ops.moe_combine(ops.moe_experts(plan, w_gu, w_d), plan, w)
    torch.testing.assert_close(out32.double(), out, rtol=1e-5, atol=1e-5)


def test_forward_equals_composition_bf16_and_fp8():
    g = torch.Generator().manual_seed(4)
    T, H, I, E = 7, 256, 160, 8
    x = torch.randn(T, H, generator=g).bfloat16()
    logits = torch.randn(T, E, generator=g)
    bias = torch.rand(E, generator=g) * 0.1
    w_gu, w_d = torch.randn(E, 2 * I, H, generator=g) * 0.05, torch.randn(E, H, I, generator=g) * 0.05
    route = dict(top_k=3, correction_bias=bias, n_group=4, topk_group=2, scaling_factor=2.5)
    for weights in ("bf16", "fp8"):
        if weights == "bf16":
            gu, d, extra = w_gu.bfloat16(), w_d.bfloat16(), {}
        else:
            qs = [ops.fp8_quantize_weight(w) for w in w_gu]
            qd = [ops.fp8_quantize_weight(w) for w in w_d]
            gu, d = torch.stack([q for q, _ in qs]), torch.stack([q for q, _ in qd])
            extra = {"w_gate_up_scale": torch.stack([s for _, s in qs]), "w_down_scale": torch.stack([s for _, s in qd])}
        y = ops.moe_forward(x, logits, gu, d, **route, **extra)
        w, ids = ops.moe_route(logits, **route)
        plan = ops.moe_dispatch(x, ids, E)
        want = ops.moe_combine(ops.moe_experts(plan, gu, d, **extra), plan, w)
        assert y.dtype == torch.bfloat16 and torch.equal(y, want)


def test_fp8_experts_match_dequantized_weights():
    g = torch.Generator().manual_seed(5)
    E, I, H = 2, 128, 256
    x = torch.randn(6, H, generator=g)
    w_gu, w_d = torch.randn(E, 2 * I, H, generator=g) * 0.05, torch.randn(E, H, I, generator=g) * 0.05
    qs = [ops.fp8_quantize_weight(w) for w in w_gu]
    qd = [ops.fp8_quantize_weight(w) for w in w_d]
    deq_gu = torch.stack([q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1) for q, s in qs])
    deq_d = torch.stack([q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1) for q, s in qd])
    plan = ops.moe_dispatch(x, torch.tensor([[0], [1], [0], [1], [1], [0]]), E)
    y8 = ops.moe_experts(plan, torch.stack([q for q, _ in qs]), torch.stack([q for q, _ in qd]),
                         w_gate_up_scale=torch.stack([s for _, s in qs]), w_down_scale=torch.stack([s for _, s in qd]))
    y = ops.moe_experts(plan, deq_gu, deq_d)
    diff = 1 - 2 * (y8.double() * y.double()).sum() / (y8.double() ** 2 + y.double() ** 2).sum()
    assert diff < 1e-3        # only the activation quantization separates them


def test_moe_determinism():
    g = torch.Generator().manual_seed(6)
    args = (torch.randn(9, 32, generator=g), torch.randn(9, 8, generator=g), torch.randn(8, 16, 32, generator=g),
            torch.randn(8, 32, 8, generator=g))
    a, b = ops.moe_forward(*args, top_k=2), ops.moe_forward(*args, top_k=2)
    assert torch.equal(a, b)


def test_moe_empty_inputs():
    w, ids = ops.moe_route(torch.zeros(0, 8), top_k=2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    plan = ops.moe_dispatch(torch.zeros(0, 4), ids, 8, align=4)
    assert plan.hidden.shape == (0, 4) and plan.offsets.tolist() == [0] * 9
    y = ops.moe_experts(plan, torch.randn(8, 6, 4), torch.randn(8, 4, 3))
    assert y.shape == (0, 4)
    assert ops.moe_combine(y, plan, w).shape == (0, 4)
    assert ops.moe_forward(torch.zeros(0, 4), torch.zeros(0, 8), torch.randn(8, 6, 4), torch.randn(8, 4, 3),
                           top_k=2).shape == (0, 4)
