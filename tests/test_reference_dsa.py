"""The CPU reference for DeepSeek Sparse Attention: hand-computed cases, brute force, invariants."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hal import ops
from hal.backends.cpu import KERNELS, float64_evaluation


def _idx(q_vals, k_vals, **kw):
    """A one-head, one-dim indexer: score[t, s] = relu(q_t * k_s) (weights 1)."""
    S, L = len(q_vals), len(k_vals)
    q = torch.tensor(q_vals, dtype=torch.float32).view(1, S, 1, 1)
    k = torch.tensor(k_vals, dtype=torch.float32).view(1, L, 1)
    return ops.lightning_indexer(q, k, torch.ones(1, S, 1), **kw)[0].tolist()


def test_indexer_causal_default_offset():
    # scores [2, 3, 1]; q_offset = L - S = 1: t0 sees keys {0, 1} -> [1, 0, -1]; t1 sees all -> [1, 0, 2]
    assert _idx([1.0, 1.0], [2.0, 3.0, 1.0], top_k=3) == [[1, 0, -1], [1, 0, 2]]
    assert _idx([1.0, 1.0], [2.0, 3.0, 1.0], top_k=3, causal=False) == [[1, 0, 2], [1, 0, 2]]
    assert _idx([1.0, 1.0], [2.0, 3.0, 1.0], top_k=1) == [[1], [1]]
    assert _idx([1.0, 1.0], [2.0, 3.0, 1.0], top_k=5) == [[1, 0, -1, -1, -1], [1, 0, 2, -1, -1]]


def test_indexer_lengths_offsets_and_ties():
    one = torch.tensor([1])
    # k_lengths = 2 -> default q_offset = 2 - 2 = 0: t0 sees {0}, t1 sees {0, 1}
    assert _idx([1.0, 1.0], [2.0, 3.0, 1.0], top_k=3, k_lengths=torch.tensor([2])) == [[0, -1, -1], [1, 0, -1]]
    assert _idx([1.0, 1.0], [2.0, 3.0, 1.0], top_k=3, q_offset=one * 0) == [[0, -1, -1], [1, 0, -1]]
    # ties [2, 2, 1] -> lower index first; relu: a negative q makes every score 0, still visible
    assert _idx([1.0], [2.0, 2.0, 1.0], top_k=3) == [[0, 1, 2]]
    assert _idx([-1.0], [2.0, 2.0, 1.0], top_k=2) == [[0, 1]]
    # NaN score ranks below every number but stays visible
    assert _idx([1.0], [float("nan"), -5.0, 1.0], top_k=3) == [[2, 1, 0]]


def test_indexer_weighted_heads_and_fp8_scales():
    # two heads: score_s = 0.5 relu(q0 k_s) + 2 relu(q1 k_s), q = [1, -1], k = [3, -1, 1]
    # -> s0: 1.5 + 0 = 1.5; s1: 0 + 2 = 2; s2: 0.5 + 0 = 0.5 -> order [1, 0, 2]
    q = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1)
    k = torch.tensor([3.0, -1.0, 1.0]).view(1, 3, 1)
    w = torch.tensor([0.5, 2.0]).view(1, 1, 2)
    assert ops.lightning_indexer(q, k, w, top_k=3)[0].tolist() == [[1, 0, 2]]
    # fp8: the same values as (fp8 value * scale): q8 = q / 0.5, k8 = k / [1, 0.25, 2]
    q8 = (q / 0.5).to(torch.float8_e4m3fn)
    k_scale = torch.tensor([[1.0, 0.25, 2.0]])
    k8 = (k / k_scale[..., None]).to(torch.float8_e4m3fn)
    out = ops.lightning_indexer(q8, k8, w, top_k=3, q_scale=torch.full((1, 1, 2), 0.5), k_scale=k_scale)
    assert out[0].tolist() == [[1, 0, 2]]


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), S=st.integers(0, 5), L=st.integers(1, 8), Hi=st.integers(1, 3), top_k=st.integers(1, 10),
       causal=st.booleans(), lengths=st.booleans(), seed=st.integers(0, 2**16))
def test_indexer_against_brute_force(B, S, L, Hi, top_k, causal, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    D = 4
    q, k = torch.randn(B, S, Hi, D, generator=g), torch.randn(B, L, D, generator=g)
    w = torch.rand(B, S, Hi, generator=g)
    k_len = torch.randint(0, L + 1, (B,), generator=g) if lengths else None
    out = ops.lightning_indexer(q, k, w, top_k=top_k, causal=causal, k_lengths=k_len)
    assert out.shape == (B, S, top_k) and out.dtype == torch.int32
    for b in range(B):
        n = L if k_len is None else int(k_len[b])
        for t in range(S):
            vis = [s for s in range(L) if s < n and (not causal or s <= n - S + t)]
            score = {s: sum(float(w[b, t, h]) * max(0.0, float(q[b, t, h].double() @ k[b, s].double()))
                            for h in range(Hi)) for s in vis}
            want = sorted(vis, key=lambda s: (-score[s], s))[:top_k]
            got = out[b, t].tolist()
            assert got[len(want):] == [-1] * (top_k - len(want))
            for a, e in zip(got, want):
                assert a == e or abs(score[a] - score[e]) < 1e-5


# ---- sparse_attention --------------------------------------------------------------------------

def test_sparse_attention_hand_computed():
    # scores = q . k = [0, ln 3] -> softmax [1/4, 3/4]; v = [4, 8] -> out = 1 + 6 = 7; lse = ln 4
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([0.0, math.log(3)]).view(1, 2, 1, 1)
    v = torch.tensor([4.0, 8.0]).view(1, 2, 1, 1)
    out, lse = ops.sparse_attention(q, k, v, torch.tensor([[[1, 0, -1]]], dtype=torch.int32), scale=1.0,
                                    return_lse=True)
    torch.testing.assert_close(out.flatten(), torch.tensor([7.0]))
    torch.testing.assert_close(lse.flatten(), torch.tensor([math.log(4)]))
    # no valid slot: out = 0, lse = -inf
    out, lse = ops.sparse_attention(q, k, v, torch.full((1, 1, 2), -1, dtype=torch.int32), scale=1.0,
                                    return_lse=True)
    assert out.item() == 0 and lse.item() == float("-inf")


def _dense_causal(q, k, v, scale):
    """Dense causal attention in float64 with the queries at the last S positions of L keys."""
    B, S, Hq, _ = q.shape
    L, Hk = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(Hq // Hk, 2)
    vv = v.double().repeat_interleave(Hq // Hk, 2)
    s = torch.einsum("bthd,bshd->bhts", q.double(), kk) * scale
    mask = torch.arange(L)[None, :] <= (L - S) + torch.arange(S)[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), vv), torch.logsumexp(s, -1).transpose(1, 2)


@pytest.mark.parametrize("layout,Hq,Hk,Dqk,Dv", [
    ("MHA", 4, 4, 16, 16), ("GQA", 4, 2, 16, 8), ("MQA", 4, 1, 32, 32), ("MLA", 2, 1, 576, 512)])
def test_all_causal_keys_equal_dense_causal_attention(layout, Hq, Hk, Dqk, Dv):
    g = torch.Generator().manual_seed(7)
    B, S, L = 2, 5, 9
    q = torch.randn(B, S, Hq, Dqk, generator=g)
    k = torch.randn(B, L, Hk, Dqk, generator=g)
    v = k[..., :Dv] if layout == "MLA" else torch.randn(B, L, Hk, Dv, generator=g)
    idx = ops.lightning_indexer(torch.randn(B, S, 2, 8, generator=g), torch.randn(B, L, 8, generator=g),
                                torch.rand(B, S, 2, generator=g), top_k=L + 3)
    scale = Dqk ** -0.5
    with float64_evaluation():
        out, lse = KERNELS["sparse_attention"](q, k, v, idx, scale=scale, return_lse=True)
    want_out, want_lse = _dense_causal(q, k, v, scale)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)
    # and against torch's own SDPA in fp32 (a fully independent implementation), MHA/GQA only
    if layout in ("MHA", "GQA"):
        mask = torch.arange(L)[None, :] <= (L - S) + torch.arange(S)[:, None]
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(Hq // Hk, 2).transpose(1, 2),
            v.repeat_interleave(Hq // Hk, 2).transpose(1, 2), attn_mask=mask, scale=scale).transpose(1, 2)
        torch.testing.assert_close(ops.sparse_attention(q, k, v, idx, scale=scale), sdpa, rtol=1e-5, atol=1e-5)


def test_sparse_attention_bf16_output_and_determinism():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 3, 4, 16, generator=g).bfloat16(), torch.randn(1, 6, 2, 16, generator=g).bfloat16(),
               torch.randn(1, 6, 2, 16, generator=g).bfloat16())
    idx = torch.tensor([[[0, 5, -1], [2, -1, -1], [4, 3, 1]]], dtype=torch.int32)
    a, lse = ops.sparse_attention(q, k, v, idx, scale=0.25, return_lse=True)
    assert a.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (1, 3, 4)
    assert torch.equal(a, ops.sparse_attention(q, k, v, idx, scale=0.25))


def test_dsa_empty_inputs():
    q, k, w = torch.randn(1, 0, 2, 8), torch.randn(1, 4, 8), torch.rand(1, 0, 2)
    assert ops.lightning_indexer(q, k, w, top_k=3).shape == (1, 0, 3)
    out, lse = ops.sparse_attention(torch.randn(1, 0, 2, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8),
                                    torch.zeros(1, 0, 3, dtype=torch.int32), scale=1.0, return_lse=True)
    assert out.shape == (1, 0, 2, 8) and lse.shape == (1, 0, 2)
    assert ops.lightning_indexer(torch.randn(0, 2, 1, 4), torch.randn(0, 3, 4), torch.rand(0, 2, 1),
                                 top_k=2).shape == (0, 2, 2)
