"""The conformance suite: the reference certifies clean, planted faults are caught exactly."""
from __future__ import annotations


import pytest
import torch

import hal
from hal.backends.cpu import KERNELS
from hal.conformance.cases import catalog
from hal.conformance.runner import certify, flatten_outputs
from hal.registry import get_registry


def test_catalog_covers_every_op_and_the_named_edges():
    cases = catalog("quick")
    assert {c.op for c in cases} == set(hal.CONTRACT)
    names = {c.id for c in cases}
    for must in ("moe_route/T0_sigmoid", "moe_route/T1_softmax", "moe_route/grouped_sigmoid", "moe_route/nan_inf_logits",
                 "moe_route/all_to_one_expert", "moe_dispatch/dropped_ids_and_empty_experts",
                 "moe_experts/fp8_partial_blocks", "lightning_indexer/fewer_visible_than_top_k", "lightning_indexer/L1",
                 "lightning_indexer/fp8", "sparse_attention/MLA_576_512", "sparse_attention/GQA", "sparse_attention/MQA",
                 "sparse_attention/nan_query", "fp8_quantize/beyond_448", "fp8_quantize/nan_inf",
                 "fp8_gemm/M0_bfloat16", "fp8_gemm/ragged_bfloat16", "fp8_gemm/ue8m0_activation_scales"):
        assert must in names, must
    full = catalog("full")
    assert {c.op for c in full} == set(hal.CONTRACT) and len(full) > 40


def _dtypes_of(op):
    """The dtypes the quick catalog feeds ``op`` (its first tensor argument, or out_dtype for fp8_gemm)."""
    seen = set()
    for c in catalog("quick", [op]):
        args, kwargs = c.materialize(0)
        if op == "fp8_gemm":
            seen.add(kwargs["out_dtype"])
        else:
            first = args[0]
            seen.add(first.hidden.dtype if isinstance(first, hal.DispatchPlan) else first.dtype)
    return seen


def test_catalog_feeds_every_legal_dtype():
    bf16, fp16, fp32, fp8 = torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn
    for op in ("moe_route", "moe_dispatch", "moe_experts", "moe_combine", "moe_forward", "sparse_attention",
               "fp8_quantize", "fp8_quantize_weight", "fp8_linear", "fp8_gemm"):
        assert _dtypes_of(op) >= {bf16, fp16, fp32} - ({fp16} if op == "moe_forward" else set()), op
    assert _dtypes_of("lightning_indexer") == {bf16, fp16, fp32, fp8}


def test_bias_cases_carry_a_bias():
    tagged = [c for c in catalog("quick", ["fp8_gemm", "fp8_linear"]) if "bias" in c.tags]
    assert len(tagged) >= 4
    for c in tagged:
        assert c.materialize(0)[1]["bias"] is not None, c.id
    assert all(c.materialize(0)[1]["bias"] is None for c in catalog("quick", ["fp8_gemm"]) if "bias" not in c.tags)


def test_cases_are_seeded_and_never_all_zero():
    c = catalog("quick", ["fp8_gemm"])[2]
    a1, _ = c.materialize(1)
    a2, _ = c.materialize(1)
    a3, _ = c.materialize(2)
    assert torch.equal(a1[1], a2[1]) and not torch.equal(a1[1], a3[1])
    assert a1[1].abs().sum() > 0


def test_reference_certifies_clean():
    run = certify("cpu")
    assert run.counts()["PASS"] == len(run.results) == len(catalog("quick"))
    assert {p["path"] for p in run.plan} == {"native"}


# ---- planted faults ----------------------------------------------------------------------------

def _faulty(name, **overrides):
    kernels = {**KERNELS, **{k: v for k, v in overrides.items() if v is not None}}
    for k, v in overrides.items():
        if v is None:
            kernels.pop(k)
    return hal.Backend(name, kernels=kernels, capabilities={op: hal.OpCapability("native", (), "planted fault")
                                                            for op in kernels})


@pytest.fixture
def planted(fresh_registry):
    names = []

    def add(backend, ops, fallback="error"):
        if backend.name not in names:
            get_registry().register_backend(backend)
            names.append(backend.name)
        return certify(backend.name, ops=ops, fallback=fallback)

    yield add
    for n in names:
        get_registry().unregister(n)


def _affected(op, fault_kernel):
    """Cases whose output the fault actually changes (compared bitwise with the reference)."""
    out = set()
    for c in catalog("quick", [op]):
        args, kwargs = c.materialize(0)
        want = flatten_outputs(KERNELS[op](*args, **kwargs))
        got = flatten_outputs(fault_kernel(*args, **kwargs))
        from hal.conformance.runner import identical
        if not identical(want, got):
            out.add(c.name)
    return out


def _statuses(run):
    return {r.case: r.status for r in run.results}


def _check_exact_fail_set(run, op, fault):
    affected = _affected(op, fault)
    assert affected, "the planted fault must change at least one case"
    st = _statuses(run)
    assert {c for c, s in st.items() if s == "FAIL"} == affected
    assert {c for c, s in st.items() if s == "PASS"} == set(st) - affected


def test_one_element_off_is_caught(planted):
    def gemm(a, a_scale, b, b_scale, *, out_dtype, bias):
        y = KERNELS["fp8_gemm"](a, a_scale, b, b_scale, out_dtype=out_dtype, bias=bias).clone()
        if y.numel():
            y[-1, -1] += 0.01 * (y.abs().max() + 1)
        return y
    _check_exact_fail_set(planted(_faulty("off_by_one", fp8_gemm=gemm), ["fp8_gemm"]), "fp8_gemm", gemm)


def test_transposed_scale_is_caught(planted):
    def gemm(a, a_scale, b, b_scale, *, out_dtype, bias):
        wrong = b_scale.t().contiguous().reshape(b_scale.shape)      # a column-major grid read as row-major
        return KERNELS["fp8_gemm"](a, a_scale, b, wrong, out_dtype=out_dtype, bias=bias)
    _check_exact_fail_set(planted(_faulty("transposed", fp8_gemm=gemm), ["fp8_gemm"]), "fp8_gemm", gemm)


def test_ties_broken_the_other_way_are_caught(planted):
    def indexer(q, k, weights, **kw):
        return _tie_flip(q, k, weights, kw)
    run = planted(_faulty("ties", lightning_indexer=indexer), ["lightning_indexer"])
    _check_exact_fail_set(run, "lightning_indexer", indexer)


def _tie_flip(q, k, weights, kw):
    """The reference's selection with exact score ties broken toward the higher index."""
    from hal.conformance.scores import indexer_scores
    score, visible = indexer_scores(q, k, weights, **kw)
    score = score.float().where(visible, float("-inf"))
    B, S, L = score.shape
    top_k = kw["top_k"]
    rev = torch.sort(score.flip(-1), dim=-1, descending=True, stable=True).indices
    order = L - 1 - rev
    vis = visible.gather(-1, order)
    order = order.gather(-1, torch.sort(vis.to(torch.int8), dim=-1, descending=True, stable=True).indices)
    n = min(top_k, L)
    out = torch.full((B, S, top_k), -1, dtype=torch.int32)
    out[..., :n] = torch.where(torch.arange(n) < visible.sum(-1, keepdim=True), order[..., :n], -1).to(torch.int32)
    return out


def test_missing_minus_one_tail_is_caught(planted):
    def indexer(q, k, weights, **kw):
        out = KERNELS["lightning_indexer"](q, k, weights, **kw)
        return torch.where(out < 0, 0, out)
    _check_exact_fail_set(planted(_faulty("notail", lightning_indexer=indexer), ["lightning_indexer"]),
                          "lightning_indexer", indexer)


def test_lost_padding_row_is_caught(planted):
    def dispatch(hidden, expert_ids, num_experts, *, align):
        plan = KERNELS["moe_dispatch"](hidden, expert_ids, num_experts, align=align)
        pad = (plan.source < 0).nonzero().flatten()
        if pad.numel():                                     # drop the last padding row
            keep = torch.ones(plan.source.numel(), dtype=torch.bool)
            keep[pad[-1]] = False
            plan.hidden, plan.source = plan.hidden[keep], plan.source[keep]
            plan.offsets = plan.offsets.clone()
            plan.offsets[plan.offsets > pad[-1]] -= 1
        return plan
    _check_exact_fail_set(planted(_faulty("nopad", moe_dispatch=dispatch), ["moe_dispatch"]), "moe_dispatch", dispatch)


def test_swallowed_nan_is_caught(planted):
    def quantize(x, *, group_size, scale_format):
        return KERNELS["fp8_quantize"](torch.nan_to_num(x, nan=0.0), group_size=group_size, scale_format=scale_format)
    run = planted(_faulty("nonan", fp8_quantize=quantize), ["fp8_quantize"])
    _check_exact_fail_set(run, "fp8_quantize", quantize)
    assert _statuses(run)["nan_inf"] == "FAIL"


def _attention_dtype(case_name):
    """The dtype of q in the quick sparse_attention case ``case_name``."""
    case = next(c for c in catalog("quick", ["sparse_attention"]) if c.name == case_name)
    return case.materialize(0)[0][0].dtype


def test_raising_kernel_is_error_missing_op_unsupported_refusal_unsupported(planted):
    def boom(*a, **k):
        raise RuntimeError("kernel launch failed")

    def no_bf16(q, k, v, indices, *, scale, return_lse):
        return "bf16 not supported by this test backend" if q.dtype == torch.bfloat16 else None

    backend = _faulty("mixed", moe_combine=boom, moe_forward=None)
    backend._caps["sparse_attention"] = hal.OpCapability("native", (), "", supports=no_bf16)
    run = planted(backend, ["moe_combine", "moe_forward", "sparse_attention"])
    by_op = {}
    for r in run.results:
        by_op.setdefault(r.op, set()).add(r.status)
    assert by_op["moe_combine"] == {"ERROR"}
    assert all("kernel launch failed" in r.reason and r.traceback for r in run.results if r.op == "moe_combine")
    assert by_op["moe_forward"] == {"UNSUPPORTED"}
    assert {r.path for r in run.results if r.op == "moe_forward"} == {"absent"}
    for r in run.results:
        if r.op == "sparse_attention":
            bf16 = _attention_dtype(r.case) == torch.bfloat16
            assert r.status == ("UNSUPPORTED" if bf16 else "PASS"), (r.case, r.status, r.reason)


def test_nan_key_ranked_like_a_number_is_caught(planted):
    def indexer(q, k, weights, **kw):           # relu(NaN) computed as 0: the NaN key is no longer last
        if k.is_floating_point() and k.dtype != torch.float8_e4m3fn:
            k = torch.nan_to_num(k, nan=0.0)
        return KERNELS["lightning_indexer"](q, k, weights, **kw)
    run = planted(_faulty("nan_as_zero", lightning_indexer=indexer), ["lightning_indexer"])
    _check_exact_fail_set(run, "lightning_indexer", indexer)
    assert {c for c, s in _statuses(run).items() if s == "FAIL"} == {"nan_key"}


def test_reference_fallback_records_the_fallback_path(planted):
    def no_bf16(q, k, v, indices, *, scale, return_lse):
        return "bf16 not supported by this test backend" if q.dtype == torch.bfloat16 else None

    backend = _faulty("partial", moe_forward=None)
    backend._caps["sparse_attention"] = hal.OpCapability("emulated", (), "via a test emulation", supports=no_bf16)
    ops = ["moe_forward", "sparse_attention"]
    strict = planted(backend, ops)
    assert {r.status for r in strict.results if r.op == "moe_forward"} == {"UNSUPPORTED"}
    run = planted(backend, ops, fallback="reference")
    assert run.fallback == "reference" and {p["path"] for p in run.plan if p["op"] == "moe_forward"} == {"fallback"}
    for r in run.results:
        assert r.status == "PASS", (r.case, r.status, r.reason)
        if r.op == "moe_forward":
            assert r.path == "fallback" and "does not implement" in r.reason
        else:
            bf16 = _attention_dtype(r.case) == torch.bfloat16
            assert r.path == ("fallback" if bf16 else "emulated"), (r.case, r.path)
            assert ("bf16 not supported" in r.reason) == bf16
    n_fallback = sum(r.path == "fallback" for r in run.results)
    n_other = sum(_attention_dtype(c.name) != torch.bfloat16 for c in catalog("quick", ["sparse_attention"]))
    assert run.path_counts()["fallback"] == n_fallback and run.path_counts()["emulated"] == n_other >= 3


def test_nondeterminism_is_flagged(planted):
    calls = {"n": 0}

    def flaky(a, a_scale, b, b_scale, *, out_dtype, bias):
        y = KERNELS["fp8_gemm"](a, a_scale, b, b_scale, out_dtype=out_dtype, bias=bias)
        calls["n"] += 1
        if out_dtype == torch.float32 and y.numel() and calls["n"] % 2 == 0:   # one ulp, every other call
            y = y.clone()
            y[0, 0] = torch.nextafter(y[0, 0], torch.tensor(float("inf")))
        return y
    st = _statuses(planted(_faulty("flaky", fp8_gemm=flaky), ["fp8_gemm"]))
    for case, status in st.items():
        assert status == ("NONDETERMINISTIC" if case.endswith("float32") and not case.startswith("M0") else "PASS")


def test_unavailable_backend_is_skipped(planted):
    b = hal.Backend("gone", probe=lambda: hal.Availability(False, "device unplugged"), kernels=dict(KERNELS))
    run = planted(b, ["fp8_quantize"])
    assert {r.status for r in run.results} == {"SKIPPED"} and "device unplugged" in run.results[0].reason


def test_catalog_has_the_models_indexer_calls_and_the_new_edges():
    names = {c.id for c in catalog("quick")}
    for must in ("lightning_indexer/model_prefill_ragged", "lightning_indexer/model_decode_ragged",
                 "lightning_indexer/fp8_model_prefill_ragged", "lightning_indexer/q_offset_int32",
                 "sparse_attention/model_prefill_ragged", "sparse_attention/MLA_model_decode_ragged",
                 "sparse_attention/GQA_out_only", "sparse_attention/L0_every_slot_unused",
                 "fp8_quantize_weight/block64_ragged", "moe_forward/no_renormalize"):
        assert must in names, must


def _fp8_results():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1024, generator=g)
    w, w_s = KERNELS["fp8_quantize_weight"](torch.randn(512, 1024, generator=g) * 0.05)
    a, a_s = KERNELS["fp8_quantize"](x)
    plan = KERNELS["moe_dispatch"](x[:24, :256].bfloat16(), torch.randint(0, 2, (24, 2), generator=g), 2)
    gu = [KERNELS["fp8_quantize_weight"](torch.randn(384, 256, generator=g) * 0.05) for _ in range(2)]
    dn = [KERNELS["fp8_quantize_weight"](torch.randn(256, 192, generator=g) * 0.05) for _ in range(2)]
    experts = KERNELS["moe_experts"](plan, torch.stack([q for q, _ in gu]), torch.stack([q for q, _ in dn]),
                                     w_gate_up_scale=torch.stack([s for _, s in gu]),
                                     w_down_scale=torch.stack([s for _, s in dn]))
    return [KERNELS["fp8_gemm"](a, a_s, w, w_s, out_dtype=torch.float32), KERNELS["fp8_linear"](x, w, w_s), experts]


def test_fp8_reference_is_the_same_for_any_thread_count():
    # fp32 BLAS sums in a thread-dependent order (here: 1 vs 2 threads moved x @ w.T by ~3e-6), and a
    # re-quantization turns such an ulp into a whole e4m3 step; the FP8 reference sums each
    # 128-wide block exactly in float64 and the blocks in a fixed order, so it is bitwise stable
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fp8_results()
        torch.set_num_threads(2)
        two = _fp8_results()
    finally:
        torch.set_num_threads(before)
    for x, y in zip(one, two):
        assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def test_fp8_gemm_reference_sums_blocks_as_the_contract_states():
    # y = sum_kb a_scale * b_scale * dot(a_kb, b_kb): against a float64 evaluation of that formula
    g = torch.Generator().manual_seed(3)
    a, a_s = KERNELS["fp8_quantize"](torch.randn(5, 300, generator=g))
    b, b_s = KERNELS["fp8_quantize_weight"](torch.randn(130, 300, generator=g))
    want = torch.zeros(5, 130, dtype=torch.float64)
    for kb in range(3):
        cols = slice(128 * kb, 128 * (kb + 1))
        dot = a[:, cols].double() @ b[:, cols].double().T
        want += a_s[:, kb, None].double() * b_s[:, kb].double().repeat_interleave(128)[:130] * dot
    got = KERNELS["fp8_gemm"](a, a_s, b, b_s, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= 3 * 2 ** -24 * float(want.abs().max())
    bias = torch.randn(130, generator=g)
    with_bias = KERNELS["fp8_gemm"](a, a_s, b, b_s, out_dtype=torch.float32, bias=bias)
    assert torch.equal(with_bias, got + bias)
