"""hal-ascend's kernels through the emulator: the indexer's q_offset / k_lengths mapped onto
actual_seq_lengths, sparse attention's direct and packed mappings and its lse, expert weights laid
out once (no per-call copies), FP8 experts dequantized only where rows go, and the supports rules
at the documented limits. Expectations: the CPU reference (the contract's definition) on inputs
where it is exact, and hand-computed cases."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hal_ascend", reason="hal-ascend is installed by ci/test.sh")

from hal.backends.cpu import KERNELS  # noqa: E402
from hal_ascend import kernels as ops  # noqa: E402
from hal_ascend import npu  # noqa: E402
from hal_ascend.plugin import prepare_expert_weights  # noqa: E402


@pytest.fixture
def calls(monkeypatch):
    """Emulated ops; yields a list that records (op name, kwargs) of every torch_npu call."""
    monkeypatch.setenv("HAL_ASCEND_EMULATE", "1")
    npu.reset()
    seen = []
    real = npu.functions()

    class Recorder:
        def __getattr__(self, name):
            def call(*a, **kw):
                seen.append((name, a, kw))
                return getattr(real, name)(*a, **kw)
            return call
    monkeypatch.setattr(ops, "npu", lambda: Recorder())
    yield seen
    npu.reset()


def _names(seen):
    return [n for n, _, _ in seen]


# ---- lightning_indexer: q_offset / k_lengths natively ------------------------------------------

def test_causal_lengths_hand_computed():
    # S = 4; (k_len, q_offset): (10, 6) -> the last 4 positions: q_len 4, k 10; (10, 2) -> keys past
    # 2 + 4 are never visible: q_len 4, k 6; (5, 3) -> rows 0-1 causal, rows 2-3 see all 5: q_len 2, k 5;
    # (3, 7) -> every row sees all 3: q_len 1, k 3; (8, -6) -> no row sees a key: q_len 4, k 0
    q_len, k_eff = ops.causal_lengths(4, torch.tensor([10, 10, 5, 3, 8]), torch.tensor([6, 2, 3, 7, -6]))
    assert q_len.tolist() == [4, 4, 2, 1, 4] and k_eff.tolist() == [10, 6, 5, 3, 0]
    assert q_len.dtype == k_eff.dtype == torch.int32


def _indexer_inputs(g, B, S, L, Hi=4, D=32):
    q = torch.randint(-3, 4, (B, S, Hi, D), generator=g).bfloat16()    # exact scores: ties decided by index only
    k = torch.randint(-3, 4, (B, L, D), generator=g).bfloat16()
    w = torch.randint(1, 8, (B, S, Hi), generator=g).float() / 8       # exact in bf16
    return q, k, w


@pytest.mark.parametrize("S,q_offset,k_lengths,n_calls", [
    (5, [0, 0, 3], [5, 3, 8], 2),        # right-padded prefill: tail rows in batches 1 and 2 (second call)
    (5, [4, 0, 2], [9, 5, 7], 1),        # every batch's queries end at its last key: no tail rows
    (5, [2, 1, 0], [5, 4, 9], 2),        # keys beyond the queries in batch 2 (q_offset + S < k_len), tails in 0, 1
    (1, [3, 0, 9], [4, 1, 6], 1),        # decode, one with q_offset past its keys: S = 1 never needs a second call
    (4, [-2, 7, 1], [6, 3, 2], 2),       # a negative offset (first rows see nothing), all-tail, short keys
])
def test_indexer_with_q_offset_matches_the_reference(calls, S, q_offset, k_lengths, n_calls):
    g = torch.Generator().manual_seed(S)
    q, k, w = _indexer_inputs(g, 3, S, 9)
    kw = dict(top_k=6, causal=True, q_offset=torch.tensor(q_offset), k_lengths=torch.tensor(k_lengths), q_scale=None,
              k_scale=None)
    got = ops.lightning_indexer(q, k, w, **kw)
    assert torch.equal(got, KERNELS["lightning_indexer"](q, k, w, **kw))
    assert _names(calls) == ["npu_lightning_indexer"] * n_calls
    assert calls[0][2]["sparse_mode"] == 3 and calls[0][2]["actual_seq_lengths_query"] is not None


@pytest.mark.parametrize("causal,top_k", [(True, 5), (False, 5), (True, 2100)])
def test_indexer_default_offset_noncausal_and_a_rounded_up_sparse_count(calls, causal, top_k):
    g = torch.Generator().manual_seed(1)
    q, k, w = _indexer_inputs(g, 2, 3, 7)
    kw = dict(top_k=top_k, causal=causal, q_offset=None, k_lengths=torch.tensor([7, 4]), q_scale=None, k_scale=None)
    got = ops.lightning_indexer(q, k, w, **kw)
    assert got.shape == (2, 3, top_k) and torch.equal(got, KERNELS["lightning_indexer"](q, k, w, **kw))
    assert calls[0][2]["sparse_mode"] == (3 if causal else 0)
    assert calls[0][2]["sparse_count"] == (3072 if top_k == 2100 else top_k)
    assert calls[0][1][0].shape[-1] == 128                     # D = 32 zero-padded to the op's 128


def test_fp32_and_fp8_dsa_run_as_torch_ops_in_query_chunks(calls, monkeypatch):
    monkeypatch.setattr(ops, "FP32_DSA_CHUNK_BYTES", 1)          # one query per chunk
    g = torch.Generator().manual_seed(11)
    q, k, w = (t.float() for t in _indexer_inputs(g, 2, 4, 9))
    kw = dict(top_k=5, causal=True, q_offset=torch.tensor([0, 3]), k_lengths=torch.tensor([3, 9]), q_scale=None,
              k_scale=None)
    assert torch.equal(ops.lightning_indexer(q, k, w, **kw), KERNELS["lightning_indexer"](q, k, w, **kw))
    q8, qs = KERNELS["fp8_quantize"](q, group_size=32)
    k8, ks = KERNELS["fp8_quantize"](k, group_size=32)
    kw.update(q_scale=qs[..., 0].contiguous(), k_scale=ks[..., 0].contiguous())
    assert torch.equal(ops.lightning_indexer(q8, k8, w, **kw), KERNELS["lightning_indexer"](q8, k8, w, **kw))
    q, k, v, idx = (t.float() if t.is_floating_point() else t for t in _attn(g, 1, 3, 9, 4, 2, 16, 8, 4))
    out, lse = ops.sparse_attention(q, k, v, idx, scale=0.2, return_lse=True)
    ref_out, ref_lse = KERNELS["sparse_attention"](q, k, v, idx, scale=0.2, return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)
    assert calls == []                                          # no fused op for fp32 / fp8


# ---- sparse_attention ----------------------------------------------------------------------------

def _attn(g, B, S, L, Hq, Hk, Dqk, Dv, K, mla=False):
    q = torch.randn(B, S, Hq, Dqk, generator=g).bfloat16()
    k = torch.randn(B, L, Hk, Dqk, generator=g).bfloat16()
    v = k[..., :Dv] if mla else torch.randn(B, L, Hk, Dv, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B * S)]).view(B, S, K).to(torch.int32)
    idx[0, 0, 1::2] = -1                                       # -1 slots between valid ones: reordered valid-first
    if S > 1:
        idx[0, 1] = -1                                         # a query with no valid slot: out 0, lse -inf
    return q, k, v, idx


@pytest.mark.parametrize("shape", [(2, 3, 9, 4, 4, 32, 32, 5, False), (1, 3, 9, 8, 2, 128, 128, 4, False),
                                   (1, 2, 7, 4, 1, 32, 16, 3, False), (1, 3, 6, 4, 1, 576, 512, 4, True)])
def test_sparse_attention_direct_and_packed_match_the_reference(calls, shape):
    *dims, mla = shape
    q, k, v, idx = _attn(torch.Generator().manual_seed(2), *dims, mla=mla)
    out, lse = ops.sparse_attention(q, k, v, idx, scale=0.1, return_lse=True)
    ref_out, ref_lse = KERNELS["sparse_attention"](q, k, v, idx, scale=0.1, return_lse=True)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-3, rtol=1e-3)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert torch.all(out[0, 1] == 0) and torch.all(lse[0, 1] == float("-inf"))
    (name, args, kw), = calls
    assert name == "npu_sparse_flash_attention" and kw["attention_mode"] == 2 and kw["return_softmax_lse"] is True
    assert kw["sparse_block_size"] == 1 and args[1] is args[2]            # one KV tensor
    valid = args[3] >= 0
    assert bool((valid[..., 1:] <= valid[..., :-1]).all())


def test_sparse_attention_without_lse_asks_the_op_for_none(calls):
    q, k, v, idx = _attn(torch.Generator().manual_seed(3), 1, 2, 6, 2, 1, 576, 512, 3, mla=True)
    out = ops.sparse_attention(q, k, v, idx, scale=0.1, return_lse=False)
    assert isinstance(out, torch.Tensor) and calls[0][2]["return_softmax_lse"] is False


@pytest.mark.parametrize("dims,v_of_k,fragment", [
    ((1, 2, 6, 4, 1, 576, 512), False, "MLA shape"),           # independent v: K and V cannot be one tensor
    ((1, 2, 6, 6, 2, 32, 32), False, "query heads per KV head (got 3)"),
    ((1, 2, 6, 2, 2, 256, 384), False, "Dqk=256, Dv=384"),
])
def test_attention_declines_outside_the_documented_shapes(dims, v_of_k, fragment):
    q, k, v, idx = _attn(torch.Generator().manual_seed(4), *dims, 3, mla=v_of_k)
    assert fragment in ops.attention_supports(q, k, v, idx, scale=1.0, return_lse=True)


def test_indexer_declines_outside_the_documented_shapes():
    def why(Hi, D, dtype=torch.bfloat16, top_k=4):
        q, k = torch.zeros(1, 2, Hi, D, dtype=dtype), torch.zeros(1, 3, D, dtype=dtype)
        return ops.indexer_supports(q, k, torch.zeros(1, 2, Hi), top_k=top_k, causal=True, q_offset=None,
                                    k_lengths=None, q_scale=None, k_scale=None)
    assert why(4, 64) is None and why(64, 128) is None
    assert "D = 128" in why(4, 192) and "at most 64 query heads" in why(65, 128)
    assert "sparse_count" in why(4, 128, top_k=9000)
    assert why(80, 192, torch.float32) is None and why(80, 192, torch.float8_e4m3fn) is None   # torch ops


# ---- experts: weights laid out once, no per-call copies -------------------------------------------

def _plan(g, T, E, k, H, dtype, align=1):
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    return KERNELS["moe_dispatch"](torch.randn(T, H, generator=g).to(dtype), ids, E, align=align)


def test_prepare_weights_keeps_shape_dtype_values_and_changes_only_the_layout():
    g = torch.Generator().manual_seed(5)
    w = {"w_gate_up": torch.randn(4, 16, 8, generator=g).bfloat16(), "w_down": torch.randn(4, 8, 8, generator=g),
         "w_gate_up_scale": None}
    for op in ("moe_experts", "moe_forward"):
        p = prepare_expert_weights(op, w)
        for name in ("w_gate_up", "w_down"):
            assert p[name].shape == w[name].shape and p[name].dtype == w[name].dtype and torch.equal(p[name], w[name])
            assert p[name].transpose(1, 2).is_contiguous() and ops.gmm_weight(p[name]).is_contiguous()
        assert p["w_gate_up_scale"] is None
    assert prepare_expert_weights("fp8_linear", w)["w_down"] is w["w_down"]
    w8 = {"w_gate_up": torch.zeros(2, 128, 128, dtype=torch.float8_e4m3fn)}
    assert prepare_expert_weights("moe_experts", w8)["w_gate_up"] is w8["w_gate_up"]


@pytest.mark.parametrize("prepared", [True, False])
def test_moe_experts_hands_the_op_its_weights_without_a_copy(calls, prepared):
    g = torch.Generator().manual_seed(6)
    plan = _plan(g, 6, 4, 2, 8, torch.bfloat16, align=2)
    wg, wd = torch.randn(4, 16, 8, generator=g).bfloat16() * 0.3, torch.randn(4, 8, 8, generator=g).bfloat16() * 0.3
    if prepared:
        p = prepare_expert_weights("moe_experts", {"w_gate_up": wg, "w_down": wd})
        wg, wd = p["w_gate_up"], p["w_down"]
    out = ops.moe_experts(plan, wg, wd, activation="silu", w_gate_up_scale=None, w_down_scale=None)
    ref = KERNELS["moe_experts"](plan, wg, wd, activation="silu")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    gmm = [a for n, a, _ in calls if n == "npu_grouped_matmul"]
    assert [a[1][0].data_ptr() for a in gmm] == [wg.data_ptr(), wd.data_ptr()]     # the weights' own storage
    assert all(a[1][0].is_contiguous() == prepared for a in gmm)


def test_moe_experts_splits_more_than_1024_experts_into_grouped_calls(calls):
    g = torch.Generator().manual_seed(7)
    E = 1100
    plan = _plan(g, 8, E, 2, 4, torch.float32)
    wg, wd = torch.randn(E, 4, 4, generator=g), torch.randn(E, 4, 2, generator=g)
    out = ops.moe_experts(plan, wg, wd, activation="silu", w_gate_up_scale=None, w_down_scale=None)
    torch.testing.assert_close(out, KERNELS["moe_experts"](plan, wg, wd, activation="silu"), atol=1e-5, rtol=1e-5)
    assert all(a[1][0].shape[0] <= 1024 for n, a, _ in calls if n == "npu_grouped_matmul")


@pytest.mark.parametrize("budget", [ops.FP8_DEQUANT_BUDGET_BYTES, 1])
def test_fp8_experts_dequantize_only_the_experts_that_got_rows(calls, monkeypatch, budget):
    g = torch.Generator().manual_seed(8)
    E, T, H, I = 8, 3, 128, 64
    ids = torch.tensor([[1, 5], [5, 6], [1, 6]], dtype=torch.int32)           # experts 1, 5, 6 get rows
    plan = KERNELS["moe_dispatch"](torch.randn(T, H, generator=g).bfloat16(), ids, E, align=1)
    wg, sg = KERNELS["fp8_quantize_weight"](torch.randn(E * 2 * I, H, generator=g) * 0.1)
    wd, sd = KERNELS["fp8_quantize_weight"](torch.randn(E * H, I, generator=g) * 0.1)
    wg, sg, wd, sd = wg.view(E, 2 * I, H), sg.view(E, 1, 1), wd.view(E, H, I), sd.view(E, 1, 1)
    monkeypatch.setattr(ops, "FP8_DEQUANT_BUDGET_BYTES", budget)
    seen = []
    real = ops._dequant_weights
    monkeypatch.setattr(ops, "_dequant_weights", lambda w, s: seen.append(w.shape[0]) or real(w, s))
    out = ops.moe_experts(plan, wg, wd, activation="silu", w_gate_up_scale=sg, w_down_scale=sd)
    ref = KERNELS["moe_experts"](plan, wg, wd, activation="silu", w_gate_up_scale=sg, w_down_scale=sd)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert sum(seen) == 2 * 3 and max(seen) == (3 if budget > 1 else 1)       # 3 experts, never all 8


def test_experts_decline_dtypes_that_would_need_a_weight_copy():
    class Plan:
        hidden = torch.zeros(2, 8)
    w = torch.zeros(2, 4, 8, dtype=torch.bfloat16)
    assert "per-call weight copy" in ops.experts_supports(Plan, w, w, activation="silu", w_gate_up_scale=None,
                                                          w_down_scale=None)
    Plan.hidden = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert ops.experts_supports(Plan, w.float(), w.float(), activation="silu", w_gate_up_scale=None,
                                w_down_scale=None) is None


# ---- routing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scoring,bias,mode,renormalize", [("sigmoid", False, 0, True), ("sigmoid", True, 1, True),
                                                           ("softmax", True, 1, True), ("softmax", False, 0, True),
                                                           ("sigmoid", True, 1, False)])
def test_grouped_routing_maps_the_contract_group_rule(calls, scoring, bias, mode, renormalize):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 16, generator=g)
    b = torch.randn(16, generator=g) * 0.1 if bias else None
    kw = dict(top_k=3, scoring=scoring, correction_bias=b, n_group=4, topk_group=2, renormalize=renormalize,
              scaling_factor=2.0)
    w, ids = ops.moe_route(logits, **kw)
    rw, rids = KERNELS["moe_route"](logits, **kw)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw.float(), atol=1e-6, rtol=1e-6)
    assert calls[0][0] == "npu_moe_gating_top_k" and calls[0][2]["group_select_mode"] == mode
    assert calls[0][2]["norm_type"] == (1 if scoring == "sigmoid" else 0)
    assert calls[0][2]["out_flag"] is (not renormalize)            # unrenormalized weights come from norm_out


def test_runtime_prepare_weights_reaches_the_ascend_backend(monkeypatch):
    import hal
    from hal.registry import reset_registry
    monkeypatch.setenv("HAL_ASCEND_EMULATE", "1")
    npu.reset()
    reset_registry()
    try:
        rt = hal.runtime("ascend")
        wg, wd = torch.randn(4, 16, 8).bfloat16(), torch.randn(4, 8, 8).bfloat16()
        p = rt.prepare_weights("moe_forward", w_gate_up=wg, w_down=wd, w_gate_up_scale=None, w_down_scale=None)
        assert torch.equal(p["w_gate_up"], wg) and p["w_gate_up"].transpose(1, 2).is_contiguous()
        assert torch.equal(p["w_down"], wd) and p["w_down_scale"] is None
    finally:
        npu.reset()
        reset_registry()
