"""Proofs for the MoE reference ops through ``hal.ops`` (validation + reference kernel).

Hand-computed cases (the arithmetic is in the comments), explicit python/numpy loops in float64
that share no code with the reference, and the invariants the contract names.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hal import ops
from hal.backends.cpu import KERNELS, float64_evaluation

NAN, INF = float("nan"), float("inf")
LN2, LN3 = math.log(2), math.log(3)


def _silu(v: float) -> float:
    return v / (1 + math.exp(-v))


# ---- moe_route: hand-computed -------------------------------------------------------------------

def test_route_sigmoid_bias_groups_renormalize_scaling_by_hand():
    # logits [0, ln3, -ln3, ln3, 0, -ln3] -> s = sigmoid = [1/2, 3/4, 1/4, 3/4, 1/2, 1/4]
    # bias [0, 0, .3, 0, .1, .2]         -> c = s + bias = [.5, .75, .55, .75, .6, .45]
    # 3 groups of 2: top-2 sums g0 = .5+.75 = 1.25, g1 = .55+.75 = 1.30, g2 = .6+.45 = 1.05
    # keep 2 groups -> g1, g0 -> experts {0, 1, 2, 3}; top-3 by c: 1 (.75), 3 (.75: tie, the lower
    # index first), 2 (.55). w = s[ids] = [3/4, 3/4, 1/4], sum 7/4 -> [3/7, 3/7, 1/7] -> x2 = [6/7, 6/7, 2/7]
    logits = torch.tensor([[0.0, LN3, -LN3, LN3, 0.0, -LN3]])
    bias = torch.tensor([0.0, 0.0, 0.3, 0.0, 0.1, 0.2])
    route = dict(top_k=3, correction_bias=bias, n_group=3, topk_group=2, scaling_factor=2.0)
    w, ids = ops.moe_route(logits, **route)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.tolist() == [[1, 3, 2]]
    torch.testing.assert_close(w, torch.tensor([[6 / 7, 6 / 7, 2 / 7]]))
    # not renormalized: w = 2 * [3/4, 3/4, 1/4]
    w, _ = ops.moe_route(logits, **route, renormalize=False)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.5, 0.5]]))
    # no groups: top-3 by c over all six = 1 (.75), 3 (.75), 4 (.6); w = [3/4, 3/4, 1/2] / 2 = [3/8, 3/8, 1/4]
    w, ids = ops.moe_route(logits, top_k=3, correction_bias=bias)
    assert ids.tolist() == [[1, 3, 4]]
    torch.testing.assert_close(w, torch.tensor([[0.375, 0.375, 0.25]]))


def test_route_group_score_is_the_sum_of_the_top_two():
    # logits 0 -> s = 1/2; c = 1/2 + bias = [.9, .25, .25 | .6, .6, 0] (2 groups of 3, keep 1):
    # top-2 sums: g0 = .9+.25 = 1.15, g1 = .6+.6 = 1.2 -> g1 (a max rule or a sum of all three would pick g0)
    # top-2 in g1: 3, 4 (tie -> lower first); w = [1/2, 1/2] renormalized -> [1/2, 1/2]
    bias = torch.tensor([0.4, -0.25, -0.25, 0.1, 0.1, -0.5])
    w, ids = ops.moe_route(torch.zeros(1, 6), top_k=2, correction_bias=bias, n_group=2, topk_group=1)
    assert ids.tolist() == [[3, 4]]
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))
    # one expert per group: the group score is that expert's c (top-1); g = c = sigmoid([1, 3, 2, 0])
    # keep 2 groups -> experts 1, 2; top_k = 2 -> [1, 2]
    _, ids = ops.moe_route(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), top_k=2, n_group=4, topk_group=2)
    assert ids.tolist() == [[1, 2]]
    # group tie: c = [.625, .625 | .75, .5] -> g0 = 1.25, g1 = 1.25 (exact) -> the lower group (g0) is
    # kept, although expert 2 has the best single score
    _, ids = ops.moe_route(torch.zeros(1, 4), top_k=2, correction_bias=torch.tensor([0.125, 0.125, 0.25, 0.0]),
                           n_group=2, topk_group=1)
    assert ids.tolist() == [[0, 1]]


def test_route_softmax_with_bias_by_hand():
    # logits [0, ln2, ln3, ln2] -> exp [1, 2, 3, 2] / 8 -> s = [1/8, 1/4, 3/8, 1/4]
    # bias [.3, 0, 0, .01] -> c = [.425, .25, .375, .26] -> ids [0, 2]; w = s[ids] = [1/8, 3/8]
    # renormalized: [1/4, 3/4]; not renormalized, x3: [3/8, 9/8]
    logits = torch.tensor([[0.0, LN2, LN3, LN2]])
    bias = torch.tensor([0.3, 0.0, 0.0, 0.01])
    w, ids = ops.moe_route(logits, top_k=2, scoring="softmax", correction_bias=bias)
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.75]]))
    w, _ = ops.moe_route(logits, top_k=2, scoring="softmax", correction_bias=bias, renormalize=False,
                         scaling_factor=3.0)
    torch.testing.assert_close(w, torch.tensor([[0.375, 1.125]]))
    # ties without bias: s[1] == s[3] -> top-3 = [2, 1, 3]
    _, ids = ops.moe_route(logits, top_k=3, scoring="softmax")
    assert ids.tolist() == [[2, 1, 3]]


def test_route_low_precision_logits_are_scored_in_fp32():
    logits = torch.tensor([[0.5, -1.25, 2.0, 0.75]])
    for dtype in (torch.bfloat16, torch.float16):       # these values are exact in both
        w, ids = ops.moe_route(logits.to(dtype), top_k=2, renormalize=False)
        assert ids.tolist() == [[2, 3]] and w.dtype == torch.float32
        assert torch.equal(w, torch.sigmoid(logits)[:, [2, 3]])


def test_route_non_finite_logits_and_bias():
    # NaN ranks below every number, -inf included: c = [NaN, -inf, 1/2] -> [2, 1, 0]; the NaN's
    # weight is NaN, and with renormalize the NaN sum makes the whole row NaN
    logits = torch.tensor([[NAN, 0.0, 0.0]])
    bias = torch.tensor([0.0, -INF, 0.0])
    w, ids = ops.moe_route(logits, top_k=3, correction_bias=bias, renormalize=False)
    assert ids.tolist() == [[2, 1, 0]]
    assert w[0, :2].tolist() == [0.5, 0.5] and math.isnan(w[0, 2].item())
    w, _ = ops.moe_route(logits, top_k=3, correction_bias=bias)
    assert torch.isnan(w).all()
    w, ids = ops.moe_route(logits, top_k=2, correction_bias=bias)      # the NaN not selected: clean weights
    assert ids.tolist() == [[2, 1]] and w.tolist() == [[0.5, 0.5]]
    # a NaN in a kept group is still preferred to any expert of a dropped group:
    # c = [.5, .5, .5 | NaN, s(5), s(5)], no bias so a group scores its max: g0 = .5, g1 = s(5) (the
    # NaN counts as -inf there)
    # -> keep g1; top-3 = [4, 5, 3], never expert 0
    _, ids = ops.moe_route(torch.tensor([[0.0, 0.0, 0.0, NAN, 5.0, 5.0]]), top_k=3, n_group=2, topk_group=1)
    assert ids.tolist() == [[4, 5, 3]]
    # softmax of a row with a NaN is all NaN: every c ties as NaN -> [0, 1], weights NaN
    w, ids = ops.moe_route(torch.tensor([[1.0, NAN, 2.0]]), top_k=2, scoring="softmax")
    assert ids.tolist() == [[0, 1]] and torch.isnan(w).all()
    # infinities are numbers: sigmoid(+inf) = 1, sigmoid(-inf) = 0; softmax(-inf) = 0
    w, ids = ops.moe_route(torch.tensor([[-INF, INF, 0.0]]), top_k=2, renormalize=False)
    assert ids.tolist() == [[1, 2]] and w.tolist() == [[1.0, 0.5]]
    w, ids = ops.moe_route(torch.tensor([[-INF, 0.0, LN3]]), top_k=3, scoring="softmax", renormalize=False)
    assert ids.tolist() == [[2, 1, 0]] and w[0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    # renormalizing weights that are all 0 gives 0, not NaN (the + 1e-20)
    w, _ = ops.moe_route(torch.tensor([[-INF, -INF]]), top_k=2)
    assert w.tolist() == [[0.0, 0.0]]


# ---- moe_route: float64 loops and invariants -----------------------------------------------------

def _route_loops(logits: torch.Tensor, bias, scoring, n_group, topk_group, top_k, renormalize, scaling):
    """moe_route for one token at a time in python floats (float64)."""
    T, E = logits.shape
    per = E // n_group
    all_w, all_ids, all_c = [], [], []
    for t in range(T):
        x = [float(v) for v in logits[t].double()]
        if scoring == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in x]
        else:
            z = sum(math.exp(v - max(x)) for v in x)
            s = [math.exp(v - max(x)) / z for v in x]
        c = [s[e] + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        best = 1 if bias is None else 2           # a group's max without a bias, its top-2 sum with one
        gscore = [sum(sorted(c[i * per:(i + 1) * per], reverse=True)[:best]) for i in range(n_group)]
        kept = sorted(range(n_group), key=lambda i: (-gscore[i], i))[:topk_group]
        ids = sorted((e for e in range(E) if e // per in kept), key=lambda e: (-c[e], e))[:top_k]
        w = [s[e] for e in ids]
        tot = sum(w)
        w = [scaling * (v / (tot + 1e-20) if renormalize else v) for v in w]
        all_w.append(w), all_ids.append(ids), all_c.append(c)
    return all_w, all_ids, all_c


@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 5), n_group=st.sampled_from([1, 2, 4]), per=st.integers(1, 4),
       scoring=st.sampled_from(["sigmoid", "softmax"]), bias=st.booleans(), renormalize=st.booleans(),
       scaling=st.sampled_from([1.0, 2.5]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       data=st.data())
def test_route_matches_float64_loops(T, n_group, per, scoring, bias, renormalize, scaling, dtype, data):
    E = n_group * per
    topk_group = data.draw(st.integers(1, n_group))
    top_k = data.draw(st.integers(1, topk_group * per))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    bias_t = torch.rand(E, generator=g) * 0.2 if bias else None
    kw = dict(top_k=top_k, scoring=scoring, correction_bias=bias_t, n_group=n_group, topk_group=topk_group,
              renormalize=renormalize, scaling_factor=scaling)
    want_w, want_ids, c = _route_loops(logits, bias_t, scoring, n_group, topk_group, top_k, renormalize, scaling)
    with float64_evaluation():
        w64, ids64 = KERNELS["moe_route"](logits, **kw)
    w, ids = ops.moe_route(logits, **kw)
    assert w64.dtype == torch.float64 and w.shape == ids.shape == (T, top_k)
    for t in range(T):
        for got, want in zip(ids64[t].tolist(), want_ids[t]):        # only float64 near-ties may swap
            assert got == want or abs(c[t][got] - c[t][want]) < 1e-12
        if ids64[t].tolist() == want_ids[t]:
            torch.testing.assert_close(w64[t], torch.tensor(want_w[t], dtype=torch.float64), rtol=1e-12, atol=1e-15)
        for got, want in zip(ids[t].tolist(), want_ids[t]):          # fp32 scoring: near-ties within 1e-6
            assert got == want or abs(c[t][got] - c[t][want]) < 1e-6
    if T and torch.equal(ids, ids64):
        torch.testing.assert_close(w.double(), w64, rtol=2e-6, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 8), E=st.sampled_from([6, 8, 16]), scoring=st.sampled_from(["sigmoid", "softmax"]),
       scaling=st.sampled_from([1.0, 2.5]), seed=st.integers(0, 2**16))
def test_route_invariants(T, E, scoring, scaling, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 3
    bias = torch.rand(E, generator=g) * 0.1
    w, ids = ops.moe_route(logits, top_k=3, scoring=scoring, correction_bias=bias, n_group=2, topk_group=1,
                           scaling_factor=scaling)
    # renormalized weights sum to 1 (x scaling_factor)
    torch.testing.assert_close(w.sum(-1), torch.full((T,), scaling), rtol=1e-6, atol=1e-6)
    s = torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, -1)
    c = s + bias
    for t in range(T):
        row = ids[t].tolist()
        assert len(set(row)) == 3                                     # distinct experts
        assert len({e // (E // 2) for e in row}) == 1                 # all in the one kept group
        assert all(c[t, a] >= c[t, b] for a, b in zip(row, row[1:]))  # ordered by descending c
    # softmax over all experts, not renormalized: the weights are the whole distribution (sum 1 x scaling)
    w, _ = ops.moe_route(logits, top_k=E, scoring="softmax", renormalize=False, scaling_factor=scaling)
    torch.testing.assert_close(w.sum(-1), torch.full((T,), scaling), rtol=1e-6, atol=1e-6)


# ---- moe_dispatch -------------------------------------------------------------------------------

# copies j = t*k + slot: 0:(t0,e2) 1:(t0,e0) 2,3:(t1, none) 4:(t2,e0) 5:(t2,e2) 6:(t3,e2) 7:(t3,e2)
# expert 0 <- copies [1, 4]; expert 1 <- none; expert 2 <- copies [0, 5, 6, 7] (by token, then slot)
IDS = [[2, 0], [-1, -1], [0, 2], [2, 2]]


@pytest.mark.parametrize("align,offsets,source", [
    (1, [0, 2, 2, 6], [1, 4, 0, 5, 6, 7]),
    # padded segments: 2 -> 3, 0 -> 0, 4 -> 6
    (3, [0, 3, 3, 9], [1, 4, -1, 0, 5, 6, 7, -1, -1]),
])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_dispatch_by_hand(align, offsets, source, id_dtype):
    hidden = torch.tensor([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0], [4.0, -4.0]]).bfloat16()
    plan = ops.moe_dispatch(hidden, torch.tensor(IDS, dtype=id_dtype), 3, align=align)
    assert plan.tokens_per_expert.tolist() == [2, 0, 4]
    assert plan.offsets.tolist() == offsets and plan.source.tolist() == source
    assert (plan.num_tokens, plan.top_k, plan.align, plan.num_experts) == (4, 2, align, 3)
    assert plan.hidden.dtype == torch.bfloat16
    rows = [[0.0, 0.0] if j < 0 else [float(j // 2 + 1), -float(j // 2 + 1)] for j in source]
    assert plan.hidden.float().tolist() == rows
    assert plan.tokens_per_expert.dtype == plan.offsets.dtype == torch.int32 and plan.source.dtype == torch.int64


def _dispatch_loops(ids: np.ndarray, E: int, align: int):
    """Expected (tokens_per_expert, offsets, source) by walking experts, tokens and slots in order."""
    T, k = ids.shape
    counts, offsets, source = [], [0], []
    for e in range(E):
        seg = [t * k + s for t in range(T) for s in range(k) if ids[t, s] == e]
        counts.append(len(seg))
        padded = -(-len(seg) // align) * align
        source += seg + [-1] * (padded - len(seg))
        offsets.append(offsets[-1] + padded)
    return counts, offsets, source


@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 8), k=st.integers(1, 4), E=st.integers(1, 6), align=st.sampled_from([1, 2, 4, 5]),
       p_drop=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**16))
def test_dispatch_matches_loops(T, k, E, align, p_drop, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, k), generator=g)
    ids[torch.rand(T, k, generator=g) < p_drop] = -1
    hidden = torch.randn(T, 3, generator=g)
    plan = ops.moe_dispatch(hidden, ids, E, align=align)
    counts, offsets, source = _dispatch_loops(ids.numpy(), E, align)
    assert plan.tokens_per_expert.tolist() == counts and plan.offsets.tolist() == offsets
    assert plan.source.tolist() == source
    want = torch.stack([hidden[j // k] if j >= 0 else torch.zeros(3) for j in source]) if source else torch.zeros(0, 3)
    assert torch.equal(plan.hidden, want)


# ---- moe_experts --------------------------------------------------------------------------------

def _experts_by_hand_setup():
    # H = 2, I = 1, two experts.
    # expert 0: gate row [1, 0], up row [0, 1] -> g = x0, u = x1; down [[1], [2]] -> y = a * [1, 2]
    # expert 1: gate row [0, 1], up row [1, 0] -> g = x1, u = x0; down [[-1], [0]] -> y = a * [-1, 0]
    w_gu = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    w_d = torch.tensor([[[1.0], [2.0]], [[-1.0], [0.0]]])
    x = torch.tensor([[LN3, 4.0], [2.0, LN3], [-LN3, 4.0]])
    ids = torch.tensor([[0, -1], [1, -1], [1, 0]])
    return x, ids, w_gu, w_d


def test_experts_and_combine_by_hand():
    x, ids, w_gu, w_d = _experts_by_hand_setup()
    # silu(ln3) = ln3 * sigmoid(ln3) = (3/4) ln3; silu(-ln3) = -(1/4) ln3; silu(4) = 4 / (1 + e^-4)
    # expert 0 rows (copies j0 = t0, j5 = t2): a = silu(x0) * x1
    #   t0: (3/4) ln3 * 4 = 3 ln3 -> y = [3 ln3, 6 ln3];  t2: -(1/4) ln3 * 4 = -ln3 -> y = [-ln3, -2 ln3]
    # expert 1 rows (copies j2 = t1, j4 = t2): a = silu(x1) * x0
    #   t1: (3/4) ln3 * 2 = 1.5 ln3 -> y = [-1.5 ln3, 0];  t2: silu(4) * (-ln3) -> y = [silu(4) ln3, 0]
    plan = ops.moe_dispatch(x, ids, 2, align=4)                    # offsets [0, 4, 8]: two padding rows each
    assert plan.offsets.tolist() == [0, 4, 8] and plan.source.tolist() == [0, 5, -1, -1, 2, 4, -1, -1]
    y = ops.moe_experts(plan, w_gu, w_d)
    silu4 = 4 / (1 + math.exp(-4))
    want = torch.tensor([[3 * LN3, 6 * LN3], [-LN3, -2 * LN3], [0, 0], [0, 0],
                         [-1.5 * LN3, 0], [silu4 * LN3, 0], [0, 0], [0, 0]])
    torch.testing.assert_close(y, want)
    assert torch.equal(y[plan.source < 0], torch.zeros(4, 2))      # padding rows are exactly zero
    # combine: weights on slots with no expert (7 and NaN) are ignored
    #   out[t0] = 0.5 * [3 ln3, 6 ln3]                              = [1.5 ln3, 3 ln3]
    #   out[t1] = 2 * [-1.5 ln3, 0]                                 = [-3 ln3, 0]
    #   out[t2] = 0.25 * [silu(4) ln3, 0] + 1 * [-ln3, -2 ln3]       = [(silu(4)/4 - 1) ln3, -2 ln3]
    weights = torch.tensor([[0.5, 7.0], [2.0, NAN], [0.25, 1.0]])
    out = ops.moe_combine(y, plan, weights)
    torch.testing.assert_close(out, torch.tensor([[1.5 * LN3, 3 * LN3], [-3 * LN3, 0.0],
                                                  [(silu4 / 4 - 1) * LN3, -2 * LN3]]))


def test_experts_round_h_and_the_activation_to_bf16_between_gemms():
    # x = [1] (bf16), H = I = 1: gate weight 1, up weight 1 + 2^-9, down 1 (fp32 weights).
    # h = [1, 1 + 2^-9] -> bf16 (step 2^-7 at 1): [1, 1] -> a = silu(1) * 1 = 0.7310586
    # -> bf16 (step 2^-8 in [0.5, 1)): 187.15 steps -> 187/256 = 0.73046875 -> y = 0.73046875.
    # Without the rounding of h: silu(1) * (1 + 2^-9) = 0.732486 -> bf16 188/256 = 0.734375.
    plan = ops.moe_dispatch(torch.ones(1, 1).bfloat16(), torch.tensor([[0]]), 1)
    w_gu = torch.tensor([[[1.0], [1.0 + 2.0 ** -9]]])
    w_d = torch.tensor([[[1.0]]])
    y = ops.moe_experts(plan, w_gu, w_d)
    assert y.dtype == torch.bfloat16 and y.item() == 187 / 256
    with float64_evaluation():                                     # float64 evaluation: nothing rounded
        y64 = KERNELS["moe_experts"](plan, w_gu, w_d)
    assert y64.dtype == torch.float64 and y64.item() == pytest.approx(_silu(1.0) * (1 + 2.0 ** -9), rel=1e-15)


def _identity_experts(E: int, H: int, gamma: float = 1.0):
    """Experts whose SwiGLU is y = (e + 1) * silu(gamma) * c * x where the last channel of x is 1:
    every gate row reads that channel with weight gamma (g = gamma), the up rows are c * identity
    with c = fp32(1 / silu(gamma)) (so a = silu(gamma) * c * x ~ x), and down = (e + 1) * identity."""
    c = torch.tensor(1 / _silu(gamma), dtype=torch.float32)
    w_gu = torch.zeros(E, 2 * H, H)
    w_gu[:, :H, H - 1] = gamma
    w_gu[:, H:, :] = c * torch.eye(H)
    w_d = torch.stack([(e + 1) * torch.eye(H) for e in range(E)])
    return w_gu, w_d, _silu(gamma) * float(c)


@pytest.mark.parametrize("align", [1, 4])
def test_combine_of_identity_experts_is_the_weighted_sum_of_x(align):
    g = torch.Generator().manual_seed(11)
    T, H, E, k = 6, 5, 4, 3
    x = torch.randn(T, H, generator=g)
    x[:, -1] = 1.0
    w_gu, w_d, gain = _identity_experts(E, H)
    w, ids = ops.moe_route(torch.randn(T, E, generator=g), top_k=k)
    ids[1, 2] = -1                                              # a dropped copy contributes nothing
    plan = ops.moe_dispatch(x, ids, E, align=align)
    # expected: out[t] = sum over real slots of w * (e + 1) * gain * x[t]
    factor = torch.zeros(T, dtype=torch.float64)
    for t in range(T):
        for s in range(k):
            if ids[t, s] >= 0:
                factor[t] += float(w[t, s]) * (int(ids[t, s]) + 1) * gain
    want = factor[:, None] * x.double()
    with float64_evaluation():
        out64 = KERNELS["moe_combine"](KERNELS["moe_experts"](plan, w_gu, w_d), plan, w)
    torch.testing.assert_close(out64, want, rtol=1e-13, atol=1e-13)
    out = ops.moe_combine(ops.moe_experts(plan, w_gu, w_d), plan, w)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    plan_bf16 = ops.moe_dispatch(x.bfloat16(), ids, E, align=align)
    out_bf16 = ops.moe_combine(ops.moe_experts(plan_bf16, w_gu, w_d), plan_bf16, w)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.double(), want, rtol=3e-2, atol=3e-2)


def _ffn_loops(x: np.ndarray, w_gu: np.ndarray, w_d: np.ndarray) -> np.ndarray:
    """One row's SwiGLU in float64 scalar loops."""
    two_i, H = w_gu.shape
    I = two_i // 2
    h = [sum(w_gu[i, j] * x[j] for j in range(H)) for i in range(two_i)]
    a = [_silu(h[i]) * h[I + i] for i in range(I)]
    return np.array([sum(w_d[o, i] * a[i] for i in range(I)) for o in range(H)])


@settings(max_examples=12, deadline=None)
@given(T=st.integers(0, 5), k=st.integers(1, 3), E=st.integers(1, 4), H=st.integers(1, 6), I=st.integers(1, 4),
       align=st.sampled_from([1, 3]), p_drop=st.sampled_from([0.0, 0.4]), seed=st.integers(0, 2**16))
def test_experts_and_combine_match_float64_loops(T, k, E, H, I, align, p_drop, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.randint(0, E, (T, k), generator=g)
    ids[torch.rand(T, k, generator=g) < p_drop] = -1
    weights = torch.rand(T, k, generator=g)
    w_gu, w_d = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    plan = ops.moe_dispatch(x, ids, E, align=align)
    with float64_evaluation():
        y64 = KERNELS["moe_experts"](plan, w_gu, w_d)
        out64 = KERNELS["moe_combine"](y64, plan, weights)
    xn, gun, dn = x.double().numpy(), w_gu.double().numpy(), w_d.double().numpy()
    want_out = np.zeros((T, H))
    for t in range(T):
        for s in range(k):
            e = int(ids[t, s])
            if e >= 0:
                want_out[t] += float(weights[t, s]) * _ffn_loops(xn[t], gun[e], dn[e])
    np.testing.assert_allclose(out64.numpy(), want_out, rtol=1e-12, atol=1e-12)
    # row by row: a real row holds its copy's FFN output, a padding row zeros
    for r, j in enumerate(plan.source.tolist()):
        want_row = np.zeros(H) if j < 0 else _ffn_loops(xn[j // k], gun[int(ids.view(-1)[j])], dn[int(ids.view(-1)[j])])
        np.testing.assert_allclose(y64[r].numpy(), want_row, rtol=1e-12, atol=1e-12)
    y = ops.moe_experts(plan, w_gu, w_d)
    out = ops.moe_combine(y, plan, weights)
    assert y.dtype == out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), want_out, rtol=1e-4, atol=1e-4)


def _fp8_expert_weights(g, E, I, H):
    qs = [ops.fp8_quantize_weight(w) for w in torch.randn(E, 2 * I, H, generator=g) * 0.05]
    qd = [ops.fp8_quantize_weight(w) for w in torch.randn(E, H, I, generator=g) * 0.05]
    return (torch.stack([q for q, _ in qs]), torch.stack([q for q, _ in qd]),
            torch.stack([s for _, s in qs]), torch.stack([s for _, s in qd]))


def test_fp8_experts_are_fp8_quantize_then_fp8_gemm():
    # the docstring's definition, spelled out with the public ops for each expert's rows
    g = torch.Generator().manual_seed(12)
    E, I, H, T = 3, 96, 160, 7
    w_gu, w_d, s_gu, s_d = _fp8_expert_weights(g, E, I, H)
    x = torch.randn(T, H, generator=g).bfloat16()
    plan = ops.moe_dispatch(x, torch.randint(0, E, (T, 2), generator=g), E, align=2)
    y = ops.moe_experts(plan, w_gu, w_d, w_gate_up_scale=s_gu, w_down_scale=s_d)
    want = torch.zeros_like(plan.hidden)
    for e in range(E):
        start, n = int(plan.offsets[e]), int(plan.tokens_per_expert[e])
        if n == 0:
            continue
        h = ops.fp8_gemm(*ops.fp8_quantize(plan.hidden[start:start + n]), w_gu[e], s_gu[e], out_dtype=torch.bfloat16)
        a = (torch.nn.functional.silu(h[:, :I].float()) * h[:, I:].float()).bfloat16()
        want[start:start + n] = ops.fp8_gemm(*ops.fp8_quantize(a), w_d[e], s_d[e], out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


# ---- moe_combine / moe_forward -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_combine_accumulates_in_fp32_and_returns_expert_out_dtype(dtype):
    # three slots with weight 1 on rows [1], [2^-8], [2^-8]: in fp32, 1 + 2^-8 + 2^-8 = 1 + 2^-7, which
    # bf16 and fp16 hold exactly. Accumulating in bf16 would give 1 (1 + 2^-8 is a tie, rounded to even).
    plan = ops.moe_dispatch(torch.zeros(1, 1, dtype=dtype), torch.tensor([[0, 1, 2]]), 3)
    out = ops.moe_combine(torch.tensor([[1.0], [2.0 ** -8], [2.0 ** -8]], dtype=dtype), plan, torch.ones(1, 3))
    assert out.dtype == dtype and out.shape == (1, 1) and out.item() == 1 + 2.0 ** -7


@settings(max_examples=10, deadline=None)
@given(T=st.integers(0, 6), scoring=st.sampled_from(["sigmoid", "softmax"]), fp8=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), grouped=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_is_the_composition(T, scoring, fp8, dtype, grouped, seed):
    g = torch.Generator().manual_seed(seed)
    E, H, I = 8, 130, 64
    x = torch.randn(T, H, generator=g).to(dtype)
    logits = torch.randn(T, E, generator=g)
    route = dict(top_k=3, scoring=scoring, correction_bias=torch.rand(E, generator=g) * 0.1, scaling_factor=1.5,
                 n_group=4 if grouped else 1, topk_group=2 if grouped else 1)
    if fp8:
        w_gu, w_d, s_gu, s_d = _fp8_expert_weights(g, E, I, H)
        scales = dict(w_gate_up_scale=s_gu, w_down_scale=s_d)
    else:
        w_gu, w_d, scales = torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1, {}
    y = ops.moe_forward(x, logits, w_gu, w_d, **route, **scales)
    w, ids = ops.moe_route(logits, **route)
    plan = ops.moe_dispatch(x, ids, E)
    want = ops.moe_combine(ops.moe_experts(plan, w_gu, w_d, **scales), plan, w)
    assert y.dtype == dtype and y.shape == (T, H) and torch.equal(y, want)


@settings(max_examples=8, deadline=None)
@given(T=st.integers(0, 4), scoring=st.sampled_from(["sigmoid", "softmax"]), renormalize=st.booleans(),
       seed=st.integers(0, 2**16))
def test_forward_matches_float64_loops(T, scoring, renormalize, seed):
    g = torch.Generator().manual_seed(seed)
    E, H, I, k = 6, 5, 3, 2
    x, logits = torch.randn(T, H, generator=g), torch.randn(T, E, generator=g)
    bias = torch.rand(E, generator=g) * 0.3
    w_gu, w_d = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    route = dict(top_k=k, scoring=scoring, correction_bias=bias, n_group=3, topk_group=2, renormalize=renormalize,
                 scaling_factor=1.7)
    want_w, want_ids, _ = _route_loops(logits, bias, scoring, 3, 2, k, renormalize, 1.7)
    xn, gun, dn = x.double().numpy(), w_gu.double().numpy(), w_d.double().numpy()
    want = np.zeros((T, H))
    for t in range(T):
        for w, e in zip(want_w[t], want_ids[t]):
            want[t] += w * _ffn_loops(xn[t], gun[e], dn[e])
    with float64_evaluation():
        y64 = KERNELS["moe_forward"](x, logits, w_gu, w_d, **route)
    assert y64.dtype == torch.float64 and y64.shape == (T, H)
    np.testing.assert_allclose(y64.numpy(), want, rtol=1e-11, atol=1e-11)


# ---- empty inputs, determinism -----------------------------------------------------------------

def test_moe_empty_inputs():
    E, H, I = 4, 6, 3
    w_gu, w_d = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    w, ids = ops.moe_route(torch.zeros(0, E), top_k=2, n_group=2, topk_group=1)
    assert w.shape == ids.shape == (0, 2) and w.dtype == torch.float32 and ids.dtype == torch.int32
    plan = ops.moe_dispatch(torch.zeros(0, H).bfloat16(), ids, E, align=8)
    assert plan.hidden.shape == (0, H) and plan.offsets.tolist() == [0] * (E + 1) and plan.source.shape == (0,)
    y = ops.moe_experts(plan, w_gu, w_d)
    assert y.shape == (0, H) and y.dtype == torch.bfloat16
    out = ops.moe_combine(y, plan, w)
    assert out.shape == (0, H) and out.dtype == torch.bfloat16
    assert ops.moe_forward(torch.zeros(0, H), torch.zeros(0, E), w_gu, w_d, top_k=2).shape == (0, H)
    # T > 0 but every copy dropped: N = 0 rows, and every token gets zeros
    plan = ops.moe_dispatch(torch.randn(3, H), torch.full((3, 2), -1), E, align=4)
    assert plan.hidden.shape == (0, H) and plan.tokens_per_expert.tolist() == [0] * E
    y = ops.moe_experts(plan, w_gu, w_d)
    assert torch.equal(ops.moe_combine(y, plan, torch.rand(3, 2)), torch.zeros(3, H))


def test_moe_deterministic_and_inputs_untouched():
    g = torch.Generator().manual_seed(13)
    x, logits = torch.randn(9, 32, generator=g).bfloat16(), torch.randn(9, 8, generator=g)
    w_gu, w_d = torch.randn(8, 16, 32, generator=g).bfloat16(), torch.randn(8, 32, 8, generator=g).bfloat16()
    bias = torch.rand(8, generator=g)
    before = [t.clone() for t in (x, logits, w_gu, w_d, bias)]
    runs = [ops.moe_forward(x, logits, w_gu, w_d, top_k=2, correction_bias=bias, n_group=2, topk_group=1)
            for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert all(torch.equal(a, b) for a, b in zip(before, (x, logits, w_gu, w_d, bias)))
