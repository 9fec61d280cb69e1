"""Proofs for the DeepSeek Sparse Attention reference ops through ``hal.ops``.

Hand-computed cases (arithmetic in the comments), explicit float64 loops over batches, queries,
heads and keys that share no code with the reference, and the invariant the contract names: sparse
attention over all causal keys equals dense causal attention (torch's SDPA in float64).
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
LN3 = math.log(3)
I32 = torch.int32


def _indexer_1d(q_vals, k_vals, *, weight=1.0, **kw):
    """One batch, one head, D = 1: score[t, s] = weight * relu(q_t * k_s)."""
    S, L = len(q_vals), len(k_vals)
    q = torch.tensor(q_vals, dtype=torch.float32).view(1, S, 1, 1)
    k = torch.tensor(k_vals, dtype=torch.float32).view(1, L, 1)
    out = ops.lightning_indexer(q, k, torch.full((1, S, 1), weight), **kw)
    assert out.dtype == I32 and out.shape == (1, S, kw["top_k"])
    return out[0].tolist()


# ---- lightning_indexer: hand-computed -----------------------------------------------------------

def test_indexer_visibility_by_hand():
    q, k = [1.0, 1.0], [1.0, 4.0, 2.0, 3.0]                       # scores [1, 4, 2, 3] for both queries
    # default q_offset = L - S = 2: t0 sees s <= 2 -> {0, 1, 2} by score [1, 2, 0]; t1 sees all [1, 3, 2, 0]
    assert _indexer_1d(q, k, top_k=4) == [[1, 2, 0, -1], [1, 3, 2, 0]]
    assert _indexer_1d(q, k, top_k=2) == [[1, 2], [1, 3]]
    assert _indexer_1d(q, k, top_k=6) == [[1, 2, 0, -1, -1, -1], [1, 3, 2, 0, -1, -1]]   # top_k > L
    # k_lengths = 3: keys {0, 1, 2}; default q_offset = 3 - 2 = 1: t0 sees {0, 1}, t1 sees {0, 1, 2}
    assert _indexer_1d(q, k, top_k=4, k_lengths=torch.tensor([3])) == [[1, 0, -1, -1], [1, 2, 0, -1]]
    # explicit q_offset = 0: t0 sees {0}, t1 sees {0, 1}
    assert _indexer_1d(q, k, top_k=4, k_lengths=torch.tensor([3]), q_offset=torch.tensor([0])) == \
        [[0, -1, -1, -1], [1, 0, -1, -1]]
    # q_offset = -5: no key is causally visible; k_lengths = 0: no key at all
    assert _indexer_1d(q, k, top_k=2, q_offset=torch.tensor([-5])) == [[-1, -1], [-1, -1]]
    assert _indexer_1d(q, k, top_k=2, causal=False, k_lengths=torch.tensor([0])) == [[-1, -1], [-1, -1]]
    # not causal: both queries see the first k_lengths keys
    assert _indexer_1d(q, k, top_k=4, causal=False, k_lengths=torch.tensor([3])) == [[1, 2, 0, -1]] * 2


def test_indexer_per_batch_lengths_by_hand():
    # B = 2, S = 1, L = 3, scores [3, 1, 2] in both batches; k_lengths [3, 2] -> q_offset [2, 1]:
    # batch 0 sees {0, 1, 2} -> [0, 2, 1]; batch 1 sees {0, 1} -> [0, 1, -1]
    q = torch.ones(2, 1, 1, 1)
    k = torch.tensor([3.0, 1.0, 2.0]).view(1, 3, 1).repeat(2, 1, 1)
    out = ops.lightning_indexer(q, k, torch.ones(2, 1, 1), top_k=3, k_lengths=torch.tensor([3, 2], dtype=I32))
    assert out.tolist() == [[[0, 2, 1]], [[0, 1, -1]]]


def test_indexer_ties_relu_nan_and_infinities():
    assert _indexer_1d([1.0], [2.0, 2.0, 2.0], top_k=3) == [[0, 1, 2]]          # ties -> lower index first
    assert _indexer_1d([-1.0], [2.0, 3.0, 1.0], top_k=3) == [[0, 1, 2]]         # relu: all 0, still visible
    # NaN ranks last but stays visible: scores [NaN, relu(-5) = 0, 1] -> [2, 1, 0]
    assert _indexer_1d([1.0], [NAN, -5.0, 1.0], top_k=3) == [[2, 1, 0]]
    # weight -1: scores -relu([NaN, 1, inf]) = [NaN, -1, -inf] -> -1 first, then -inf, the NaN last
    # although its index is lower
    assert _indexer_1d([1.0], [NAN, 1.0, INF], weight=-1.0, top_k=3) == [[1, 2, 0]]
    # a NaN key that is not visible is not selected: L = 3, S = 1 -> all visible; with k_lengths = 2
    # the NaN at key 2 is outside
    assert _indexer_1d([1.0], [1.0, 2.0, NAN], top_k=3, k_lengths=torch.tensor([2])) == [[1, 0, -1]]


def test_indexer_weighted_heads_and_fp8_scales_by_hand():
    # D = 2, keys k0 = [1, 0], k1 = [0, 1], k2 = [1, 1]; heads q0 = [2, -1], q1 = [-1, 3]; weights [1/2, 1/4]
    # head 0 dots [2, -1, 1] -> relu [2, 0, 1]; head 1 dots [-1, 3, 2] -> relu [0, 3, 2]
    # score = 1/2 [2, 0, 1] + 1/4 [0, 3, 2] = [1, 3/4, 1] -> [0, 2, 1] (0 and 2 tie: lower first)
    q = torch.tensor([[2.0, -1.0], [-1.0, 3.0]]).view(1, 1, 2, 2)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).view(1, 3, 2)
    w = torch.tensor([0.5, 0.25]).view(1, 1, 2)
    assert ops.lightning_indexer(q, k, w, top_k=3, causal=False).tolist() == [[[0, 2, 1]]]
    for dtype in (torch.bfloat16, torch.float16):
        assert ops.lightning_indexer(q.to(dtype), k.to(dtype), w, top_k=3, causal=False).tolist() == [[[0, 2, 1]]]
    # fp8: dequantized value = fp8 value * scale. q_scale per head [1/2, 2] -> q8 = [[4, -2], [-1/2, 3/2]];
    # k_scale per key [1/4, 1, 1/2] -> k8 = [[4, 0], [0, 1], [2, 2]]; all exact in e4m3, same scores
    q_scale = torch.tensor([0.5, 2.0]).view(1, 1, 2)
    k_scale = torch.tensor([[0.25, 1.0, 0.5]])
    q8 = (q / q_scale[..., None]).to(torch.float8_e4m3fn)
    k8 = (k / k_scale[..., None]).to(torch.float8_e4m3fn)
    assert q8.float().flatten().tolist() == [4.0, -2.0, -0.5, 1.5] and k8.float().flatten().tolist() == [4, 0, 0, 1, 2, 2]
    out = ops.lightning_indexer(q8, k8, w, top_k=3, causal=False, q_scale=q_scale, k_scale=k_scale)
    assert out.tolist() == [[[0, 2, 1]]]
    # the scales matter: q_scale 1, k_scale [1, 1, 4] -> q = [[4, -2], [-1/2, 3/2]], k = [[4, 0], [0, 1], [8, 8]]
    # head 0 dots [16, -2, 16] -> relu [16, 0, 16]; head 1 dots [-2, 3/2, 8] -> relu [0, 3/2, 8]
    # score = 1/2 [16, 0, 16] + 1/4 [0, 3/2, 8] = [8, 3/8, 10] -> [2, 0, 1]
    out = ops.lightning_indexer(q8, k8, w, top_k=3, causal=False, q_scale=torch.ones(1, 1, 2),
                                k_scale=torch.tensor([[1.0, 1.0, 4.0]]))
    assert out.tolist() == [[[2, 0, 1]]]


# ---- lightning_indexer: float64 loops ----------------------------------------------------------

def _indexer_loops(q, k, w, top_k, causal, q_offset, k_lengths):
    """Scores and expected selections by explicit loops in float64 python/numpy."""
    B, S, Hi, D = q.shape
    L = k.shape[1]
    qn, kn, wn = q.double().numpy(), k.double().numpy(), w.double().numpy()
    scores, want = {}, {}
    for b in range(B):
        n = L if k_lengths is None else int(k_lengths[b])
        off = n - S if q_offset is None else int(q_offset[b])
        for t in range(S):
            vis = [s for s in range(n) if not causal or s <= off + t]
            sc = {s: sum(wn[b, t, h] * max(0.0, float(np.dot(qn[b, t, h], kn[b, s]))) for h in range(Hi)) for s in vis}
            scores[b, t] = sc
            want[b, t] = sorted(vis, key=lambda s: (-sc[s], s))[:top_k]
    return scores, want


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), S=st.integers(0, 5), L=st.integers(0, 9), Hi=st.integers(1, 3), D=st.integers(1, 8),
       top_k=st.integers(1, 12), causal=st.booleans(), lengths=st.booleans(), offsets=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_indexer_matches_float64_loops(B, S, L, Hi, D, top_k, causal, lengths, offsets, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hi, D, generator=g).to(dtype)
    k = torch.randn(B, L, D, generator=g).to(dtype)
    w = torch.randn(B, S, Hi, generator=g)                       # negative weights too
    k_len = torch.randint(0, L + 1, (B,), generator=g) if lengths else None
    q_off = torch.randint(-2, L + 1, (B,), generator=g, dtype=torch.int64).to(I32) if offsets else None
    kw = dict(top_k=top_k, causal=causal, q_offset=q_off, k_lengths=k_len)
    scores, want = _indexer_loops(q, k, w, top_k, causal, q_off, k_len)
    got = ops.lightning_indexer(q, k, w, **kw)
    with float64_evaluation():
        got64 = KERNELS["lightning_indexer"](q, k, w, **kw)
    assert got.shape == got64.shape == (B, S, top_k) and got.dtype == got64.dtype == I32
    for (b, t), sel in want.items():
        for out, tol in ((got, 1e-5), (got64, 1e-12)):
            row = out[b, t].tolist()
            assert row[len(sel):] == [-1] * (top_k - len(sel))                  # the -1 tail, exactly
            assert len(set(row[:len(sel)])) == len(sel)
            for a, e in zip(row, sel):                                          # near-ties may swap
                assert a == e or abs(scores[b, t][a] - scores[b, t][e]) <= tol * (1 + abs(scores[b, t][e]))


# ---- sparse_attention: hand-computed ------------------------------------------------------------

def test_sparse_attention_one_and_two_keys_by_hand():
    # one key: softmax over one slot is 1 -> out = v exactly; lse = scale * q.k = 0.5 * (3 - 2) = 0.5
    q = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    k = torch.tensor([[9.0, 9.0], [3.0, -1.0]]).view(1, 2, 1, 2)
    v = torch.tensor([[0.0, 0.0], [7.0, -3.0]]).view(1, 2, 1, 2)
    out, lse = ops.sparse_attention(q, k, v, torch.tensor([[[-1, 1]]], dtype=I32), scale=0.5, return_lse=True)
    assert out.flatten().tolist() == [7.0, -3.0] and lse.item() == 0.5
    # two keys: q = [1, 0], k0 = [0, 0], k1 = [ln3, 0], scale 1 -> scores [0, ln3] -> p = [1/4, 3/4]
    # v0 = [4, 0], v1 = [8, 4] -> out = [1 + 6, 0 + 3] = [7, 3]; lse = ln(1 + 3) = ln 4.
    # The slot order and a -1 between them change nothing.
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    k = torch.tensor([[0.0, 0.0], [LN3, 0.0]]).view(1, 2, 1, 2)
    v = torch.tensor([[4.0, 0.0], [8.0, 4.0]]).view(1, 2, 1, 2)
    for idx in ([0, 1], [1, -1, 0], [-1, 0, -1, 1]):
        out, lse = ops.sparse_attention(q, k, v, torch.tensor([[idx]], dtype=I32), scale=1.0, return_lse=True)
        torch.testing.assert_close(out.flatten(), torch.tensor([7.0, 3.0]))
        torch.testing.assert_close(lse.flatten(), torch.tensor([math.log(4)]))


def test_sparse_attention_gqa_head_mapping_by_hand():
    # Hq = 4, Hk = 2: query heads 0, 1 read key/value head 0; heads 2, 3 read head 1.
    # One selected key: out[h] = v[key, h // 2] exactly; lse[h] = scale * q[h] . k[key, h // 2]
    q = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 4, 1)
    k = torch.tensor([[10.0, 20.0], [0.5, -1.0]]).view(1, 2, 2, 1)
    v = torch.tensor([[0.0, 0.0], [5.0, 6.0]]).view(1, 2, 2, 1)
    out, lse = ops.sparse_attention(q, k, v, torch.tensor([[[1]]], dtype=I32), scale=2.0, return_lse=True)
    assert out.flatten().tolist() == [5.0, 5.0, 6.0, 6.0]
    # 2 * [1 * 0.5, 2 * 0.5, 3 * -1, 4 * -1] = [1, 2, -6, -8]
    assert lse.flatten().tolist() == [1.0, 2.0, -6.0, -8.0]


def test_sparse_attention_unused_slots_and_empty_queries():
    q = torch.ones(1, 2, 1, 1)
    k = torch.tensor([NAN, 1.0, INF]).view(1, 3, 1, 1)
    v = torch.tensor([NAN, 2.0, -INF]).view(1, 3, 1, 1)
    # query 0 selects only key 1: the NaN/Inf keys and values it does not select never reach it
    # query 1 selects nothing: out = 0, lse = -inf
    idx = torch.tensor([[[1, -1], [-1, -1]]], dtype=I32)
    out, lse = ops.sparse_attention(q, k, v, idx, scale=1.0, return_lse=True)
    assert out.flatten().tolist() == [2.0, 0.0] and lse.flatten().tolist() == [1.0, -INF]
    # a selected NaN key poisons only its own query
    out, lse = ops.sparse_attention(q, k, v, torch.tensor([[[0, 1], [1, -1]]], dtype=I32), scale=1.0, return_lse=True)
    assert math.isnan(out[0, 0].item()) and math.isnan(lse[0, 0].item()) and out[0, 1].item() == 2.0
    # L = 0: every slot must be -1; every query gets zeros and -inf
    out, lse = ops.sparse_attention(torch.randn(2, 3, 4, 8), torch.randn(2, 0, 2, 8), torch.randn(2, 0, 2, 5),
                                    torch.full((2, 3, 4), -1, dtype=I32), scale=1.0, return_lse=True)
    assert out.shape == (2, 3, 4, 5) and torch.equal(out, torch.zeros(2, 3, 4, 5))
    assert lse.shape == (2, 3, 4) and torch.all(lse == -INF)


# ---- sparse_attention: float64 loops -----------------------------------------------------------

def _attention_loops(q, k, v, indices, scale):
    """out, lse by explicit loops over (b, t, h) and the valid slots, in float64 numpy."""
    B, S, Hq, _ = q.shape
    Hk, Dv = k.shape[2], v.shape[3]
    qn, kn, vn = q.double().numpy(), k.double().numpy(), v.double().numpy()
    out = np.zeros((B, S, Hq, Dv))
    lse = np.full((B, S, Hq), -np.inf)
    for b in range(B):
        for t in range(S):
            keys = [int(j) for j in indices[b, t] if j >= 0]
            for h in range(Hq):
                if not keys:
                    continue
                kh = h // (Hq // Hk)
                sc = np.array([scale * float(np.dot(qn[b, t, h], kn[b, j, kh])) for j in keys])
                m = sc.max()
                e = np.exp(sc - m)
                lse[b, t, h] = m + math.log(e.sum())
                out[b, t, h] = sum(e[i] * vn[b, j, kh] for i, j in enumerate(keys)) / e.sum()
    return out, lse


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), S=st.integers(0, 4), L=st.integers(1, 8), heads=st.sampled_from([(1, 1), (4, 4), (4, 2), (4, 1)]),
       Dqk=st.sampled_from([1, 8, 24]), Dv=st.sampled_from([1, 8]), top_k=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_sparse_attention_matches_float64_loops(B, S, L, heads, Dqk, Dv, top_k, dtype, seed):
    Hq, Hk = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq, Dqk, generator=g).to(dtype)
    k = torch.randn(B, L, Hk, Dqk, generator=g).to(dtype)
    v = torch.randn(B, L, Hk, Dv, generator=g).to(dtype)
    # distinct keys per query, some slots -1
    idx = torch.stack([torch.stack([torch.randperm(max(L, top_k), generator=g)[:top_k] for _ in range(S)])
                       if S else torch.zeros(0, top_k, dtype=torch.int64) for _ in range(B)])
    idx = torch.where((idx >= L) | (torch.rand(idx.shape, generator=g) < 0.2), -1, idx).to(I32)
    scale = Dqk ** -0.5
    want_out, want_lse = _attention_loops(q, k, v, idx, scale)
    with float64_evaluation():
        out64, lse64 = KERNELS["sparse_attention"](q, k, v, idx, scale=scale, return_lse=True)
    assert out64.dtype == lse64.dtype == torch.float64
    np.testing.assert_allclose(out64.numpy(), want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse64.numpy(), want_lse, rtol=1e-12, atol=1e-12)
    out, lse = ops.sparse_attention(q, k, v, idx, scale=scale, return_lse=True)
    assert out.dtype == dtype and out.shape == (B, S, Hq, Dv) and lse.dtype == torch.float32 and lse.shape == (B, S, Hq)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    np.testing.assert_allclose(out.double().numpy(), want_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse.double().numpy(), want_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(ops.sparse_attention(q, k, v, idx, scale=scale), out)      # return_lse=False: same out


# ---- the invariant: all causal keys == dense causal attention ----------------------------------

@pytest.mark.parametrize("layout,Hq,Hk,Dqk,Dv", [
    ("MHA", 4, 4, 16, 16), ("GQA", 8, 2, 16, 8), ("MQA", 4, 1, 32, 32), ("MLA", 4, 1, 576, 512)])
@pytest.mark.parametrize("S,L", [(6, 6), (3, 7)])
def test_all_causal_keys_equal_dense_causal_sdpa(layout, Hq, Hk, Dqk, Dv, S, L):
    g = torch.Generator().manual_seed(Hq * 100 + Dqk + S)
    B = 2
    q = torch.randn(B, S, Hq, Dqk, generator=g)
    k = torch.randn(B, L, Hk, Dqk, generator=g)
    v = k[..., :Dv] if layout == "MLA" else torch.randn(B, L, Hk, Dv, generator=g)   # MLA: v is a view of k
    # causal indices from the indexer with top_k >= L (random scores: the slot order is arbitrary)
    idx = ops.lightning_indexer(torch.randn(B, S, 2, 8, generator=g), torch.randn(B, L, 8, generator=g),
                                torch.rand(B, S, 2, generator=g), top_k=L + 2)
    assert ((idx >= 0).sum(-1) == (L - S) + 1 + torch.arange(S)).all()        # query t sees L - S + t + 1 keys
    scale = Dqk ** -0.5
    # dense causal attention, torch's SDPA in float64; queries are the last S of the L positions
    mask = torch.arange(L)[None, :] <= (L - S) + torch.arange(S)[:, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    qt, kt, vt = q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2)
    if S == L:
        dense = sdpa(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=Hk != Hq)
    else:
        dense = sdpa(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=Hk != Hq)
    dense = dense.transpose(1, 2)
    logits = torch.einsum("bthd,bshd->bths", q.double(), k.double().repeat_interleave(Hq // Hk, 2)) * scale
    dense_lse = torch.logsumexp(logits.masked_fill(~mask[None, :, None, :], -INF), -1)
    with float64_evaluation():
        out64, lse64 = KERNELS["sparse_attention"](q, k, v, idx, scale=scale, return_lse=True)
    torch.testing.assert_close(out64, dense, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(lse64, dense_lse, rtol=1e-11, atol=1e-11)
    out, lse = ops.sparse_attention(q, k, v, idx, scale=scale, return_lse=True)
    torch.testing.assert_close(out.double(), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), dense_lse, rtol=1e-5, atol=1e-5)


def test_indexer_lengths_then_sparse_attention_equal_padded_dense_attention():
    # per-batch k_lengths: indices from the indexer (top_k >= L) = dense attention with a key padding
    # mask and the causal rule at offset k_lengths[b] - S
    g = torch.Generator().manual_seed(21)
    B, S, L, H, D = 2, 3, 8, 2, 16
    lengths = torch.tensor([8, 5])
    q, k, v = (torch.randn(B, S, H, D, generator=g), torch.randn(B, L, H, D, generator=g),
               torch.randn(B, L, H, D, generator=g))
    idx = ops.lightning_indexer(torch.randn(B, S, 1, 4, generator=g), torch.randn(B, L, 4, generator=g),
                                torch.rand(B, S, 1, generator=g), top_k=L, k_lengths=lengths)
    with float64_evaluation():
        out = KERNELS["sparse_attention"](q, k, v, idx, scale=0.25)
    for b in range(B):
        n = int(lengths[b])
        mask = torch.arange(n)[None, :] <= (n - S) + torch.arange(S)[:, None]
        dense = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1].double().transpose(1, 2), k[b:b + 1, :n].double().transpose(1, 2),
            v[b:b + 1, :n].double().transpose(1, 2), attn_mask=mask, scale=0.25).transpose(1, 2)
        torch.testing.assert_close(out[b:b + 1], dense, rtol=1e-11, atol=1e-11)


# ---- NaN, empty inputs, determinism ------------------------------------------------------------

def test_nan_query_poisons_only_itself():
    g = torch.Generator().manual_seed(22)
    q, k = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, 5, 1, 8, generator=g)
    q[0, 1, 0, 3] = NAN
    idx = torch.tensor([[[0, 1, 2], [1, 3, -1], [4, 0, -1]]], dtype=I32)
    out, lse = ops.sparse_attention(q, k, k, idx, scale=0.3, return_lse=True)
    assert torch.isnan(out[0, 1, 0]).all() and math.isnan(lse[0, 1, 0].item())
    nan_free = torch.ones(3, 2, dtype=torch.bool)
    nan_free[1, 0] = False
    assert torch.isfinite(out[0][nan_free]).all() and torch.isfinite(lse[0][nan_free]).all()


def test_dsa_empty_inputs():
    w = torch.rand(2, 0, 3)
    assert ops.lightning_indexer(torch.randn(2, 0, 3, 8), torch.randn(2, 5, 8), w, top_k=4).shape == (2, 0, 4)  # S = 0
    assert ops.lightning_indexer(torch.randn(0, 2, 3, 8), torch.randn(0, 5, 8), torch.rand(0, 2, 3),
                                 top_k=4).shape == (0, 2, 4)                                                    # B = 0
    assert ops.lightning_indexer(torch.randn(1, 2, 3, 8), torch.randn(1, 0, 8), torch.rand(1, 2, 3),
                                 top_k=4).tolist() == [[[-1] * 4] * 2]                                           # L = 0
    for B, S, L, K in ((1, 0, 4, 3), (0, 2, 4, 3), (1, 2, 4, 0)):
        out, lse = ops.sparse_attention(torch.randn(B, S, 4, 8), torch.randn(B, L, 2, 8), torch.randn(B, L, 2, 6),
                                        torch.full((B, S, K), -1, dtype=I32), scale=1.0, return_lse=True)
        assert out.shape == (B, S, 4, 6) and lse.shape == (B, S, 4)
        assert torch.equal(out, torch.zeros(B, S, 4, 6)) and torch.all(lse == -INF)


def test_dsa_deterministic_and_inputs_untouched():
    g = torch.Generator().manual_seed(23)
    q, k = torch.randn(2, 4, 4, 16, generator=g).bfloat16(), torch.randn(2, 9, 16, generator=g).bfloat16()
    w = torch.rand(2, 4, 4, generator=g)
    kv = torch.randn(2, 9, 1, 16, generator=g).bfloat16()
    before = [t.clone() for t in (q, k, w, kv)]
    runs = []
    for _ in range(3):
        idx = ops.lightning_indexer(q, k, w, top_k=5)
        runs.append((idx, *ops.sparse_attention(q, kv, kv, idx, scale=0.25, return_lse=True)))
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], r))
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, w, kv)))
