"""The conformance guards that run before any numbers: a kernel must leave its inputs unchanged and
return the contract's output layout, and every optional argument is exercised by some case.

Each planted fault is a test backend built from the reference kernels plus one fault, registered
for the test only. It must FAIL on exactly the cases the fault shows in (computed independently
from the case's arguments, not from the suite's verdicts) and PASS on every other case.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import hal
from hal.backends.cpu import KERNELS
from hal.conformance import metrics
from hal.conformance.cases import catalog
from hal.conformance.runner import certify, flatten_outputs, identical, input_digests, tensor_digest
from hal.registry import get_registry


def _faulty(name, **overrides):
    kernels = {**KERNELS, **overrides}
    return hal.Backend(name, kernels=kernels,
                       capabilities={op: hal.OpCapability("native", (), "planted fault") for op in kernels})


@pytest.fixture
def planted(fresh_registry):
    names = []

    def run(backend, ops):
        get_registry().register_backend(backend)
        names.append(backend.name)
        return {r.case: r for r in certify(backend.name, ops=ops).results}

    yield run
    for n in names:
        get_registry().unregister(n)


def _cases(op):
    return [(c.name, *c.materialize(0)) for c in catalog("quick", [op])]


def _assert_fails_exactly(results, failing, must_say):
    assert failing, "the planted fault must show in at least one case"
    for case, r in results.items():
        if case in failing:
            assert r.status == "FAIL" and must_say in r.reason, (case, r.status, r.reason)
        else:
            assert r.status == "PASS", (case, r.status, r.reason)


# ---- a kernel must leave its inputs alone --------------------------------------------------------

def test_kernel_zeroing_its_input_fails(planted):
    def quantize(x, *, group_size, scale_format):
        out = KERNELS["fp8_quantize"](x, group_size=group_size, scale_format=scale_format)
        x.zero_()                                   # the right answer, and the caller's tensor wiped
        return out
    results = planted(_faulty("zeroes_input", fp8_quantize=quantize), ["fp8_quantize"])
    # zeroing changes x wherever it has a non-zero element (every case but the empty one)
    failing = {name for name, args, _ in _cases("fp8_quantize") if bool((args[0] != 0).any())}
    assert "T0_fp32_float32" not in failing
    _assert_fails_exactly(results, failing, "mutated input x")


def test_kernel_zeroing_the_callers_bias_fails(planted):
    def gemm(a, a_scale, b, b_scale, *, out_dtype, bias):
        y = KERNELS["fp8_gemm"](a, a_scale, b, b_scale, out_dtype=out_dtype, bias=bias)
        if bias is not None:
            bias.zero_()
        return y
    results = planted(_faulty("zeroes_bias", fp8_gemm=gemm), ["fp8_gemm"])
    failing = {name for name, _, kw in _cases("fp8_gemm") if kw["bias"] is not None}
    _assert_fails_exactly(results, failing, "mutated input bias")


def test_kernel_rewriting_a_plan_field_fails(planted):
    def combine(expert_out, plan, weights):
        out = KERNELS["moe_combine"](expert_out, plan, weights)
        plan.source.clamp_(min=0)                   # "cleans" the -1 padding marks in the caller's plan
        return out
    results = planted(_faulty("edits_plan", moe_combine=combine), ["moe_combine"])
    failing = {name for name, args, _ in _cases("moe_combine") if bool((args[1].source < 0).any())}
    _assert_fails_exactly(results, failing, "mutated input plan.source")


# ---- the contract's output layout, before any numbers ----------------------------------------------

def test_attention_output_in_head_major_layout_fails_on_shape(planted):
    def attention(q, k, v, indices, *, scale, return_lse):
        out = KERNELS["sparse_attention"](q, k, v, indices, scale=scale, return_lse=return_lse)
        if return_lse:
            return out[0].transpose(1, 2).contiguous(), out[1]     # [B, Hq, S, Dv]
        return out.transpose(1, 2).contiguous()
    results = planted(_faulty("head_major", sparse_attention=attention), ["sparse_attention"])
    by_shape, by_value = set(), set()
    for name, args, kw in _cases("sparse_attention"):
        want, got = flatten_outputs(KERNELS["sparse_attention"](*args, **kw)), flatten_outputs(attention(*args, **kw))
        if want[0].shape != got[0].shape:
            by_shape.add(name)
        elif not identical(want, got):              # S == Hq: the same shape, the values moved
            by_value.add(name)
    assert len(by_shape) >= 10 and by_value
    _assert_fails_exactly({n: r for n, r in results.items() if n not in by_value}, by_shape, "out: expected shape")
    _assert_fails_exactly({n: r for n, r in results.items() if n not in by_shape}, by_value, "out: max abs error")


def test_wrong_output_dtype_and_count_fail_on_layout(planted):
    def gemm(a, a_scale, b, b_scale, *, out_dtype, bias):
        return KERNELS["fp8_gemm"](a, a_scale, b, b_scale, out_dtype=torch.float32, bias=bias)

    def attention(q, k, v, indices, *, scale, return_lse):
        out = KERNELS["sparse_attention"](q, k, v, indices, scale=scale, return_lse=return_lse)
        return out[0] if return_lse else out        # forgets the lse
    gemm_results = planted(_faulty("fp32_always", fp8_gemm=gemm), ["fp8_gemm"])
    failing = {name for name, _, kw in _cases("fp8_gemm") if kw["out_dtype"] != torch.float32}
    _assert_fails_exactly(gemm_results, failing, "expected shape")
    attn_results = planted(_faulty("no_lse", sparse_attention=attention), ["sparse_attention"])
    failing = {name for name, _, kw in _cases("sparse_attention") if kw["return_lse"]}
    _assert_fails_exactly(attn_results, failing, "expected 2 output(s)")


# ---- optional arguments that a kernel ignores ------------------------------------------------------

@pytest.mark.parametrize("op", ["fp8_gemm", "fp8_linear"])
def test_kernel_ignoring_the_bias_fails(planted, op):
    def without_bias(*args, **kwargs):
        return KERNELS[op](*args, **{**kwargs, "bias": None})
    results = planted(_faulty(f"no_bias_{op}", **{op: without_bias}), [op])
    failing = {name for name, _, kw in _cases(op) if kw["bias"] is not None}
    _assert_fails_exactly(results, failing, "out:")


def test_indexer_ignoring_q_offset_fails(planted):
    def indexer(q, k, weights, **kw):
        return KERNELS["lightning_indexer"](q, k, weights, **{**kw, "q_offset": None})
    results = planted(_faulty("no_q_offset", lightning_indexer=indexer), ["lightning_indexer"])
    failing = set()
    for name, args, kw in _cases("lightning_indexer"):
        want = flatten_outputs(KERNELS["lightning_indexer"](*args, **kw))
        if not identical(want, flatten_outputs(indexer(*args, **kw))):
            failing.add(name)
    # a decode step's q_offset equals the default (k_lengths - S); right-padded prefill's does not
    assert {"model_prefill_ragged", "fp8_model_prefill_ragged", "q_offset_int32"} <= failing
    assert "model_decode_ragged" not in failing
    _assert_fails_exactly(results, failing, "indices:")


# ---- the guards' own parts -------------------------------------------------------------------------

def test_tensor_digest_is_bitwise():
    x = torch.tensor([0.0, 1.0, float("nan")])
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(torch.tensor([-0.0, 1.0, float("nan")]))       # -0.0 differs
    other_nan = x.clone()
    other_nan.view(torch.int32)[2] = 0x7FC00001                                           # another NaN payload
    assert torch.isnan(other_nan[2]) and tensor_digest(x) != tensor_digest(other_nan)
    assert tensor_digest(x.view(torch.int32)) != tensor_digest(x)                         # same bytes, other dtype
    assert tensor_digest(torch.zeros(2, 3)) != tensor_digest(torch.zeros(3, 2))           # same bytes, other shape
    f8 = torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn)
    assert tensor_digest(f8) != tensor_digest(torch.tensor([1.0, 2.5]).to(torch.float8_e4m3fn))
    t = torch.arange(6.0).view(2, 3)
    assert tensor_digest(t.t()) == tensor_digest(t.t().contiguous())                       # logical order


def test_input_digests_name_every_tensor_and_plan_field():
    plan = KERNELS["moe_dispatch"](torch.randn(3, 8), torch.tensor([[0, 1], [1, 2], [2, -1]]), 4, align=2)
    d = input_digests("moe_combine", (torch.randn(plan.hidden.shape[0], 8), plan, torch.rand(3, 2)), {})
    assert set(d) == {"expert_out", "weights", "plan.hidden", "plan.tokens_per_expert", "plan.offsets", "plan.source",
                      "plan.num_tokens", "plan.top_k", "plan.align"}
    d2 = input_digests("fp8_gemm", (torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1)),
                       {"out_dtype": torch.float32, "bias": None})
    assert set(d2) == {"a", "a_scale", "b", "b_scale"}                                    # None and dtypes: no tensor


def test_output_layout_check_names_expected_and_got():
    want = [("out", (2, None, 4), torch.bfloat16), ("lse", (2, 3), torch.float32)]
    ok = [torch.zeros(2, 7, 4, dtype=torch.bfloat16), torch.zeros(2, 3)]
    assert metrics.check_output_layout(want, ok) is None                                  # None: any extent
    bad = metrics.check_output_layout(want, [torch.zeros(2, 7, 4, dtype=torch.bfloat16), torch.zeros(3, 2)])
    assert bad.name == "lse" and not bad.passed
    assert bad.message == "expected shape (2, 3) float32, got shape (3, 2) float32"
    bad = metrics.check_output_layout(want, [torch.zeros(2, 7, 4), torch.zeros(2, 3)])
    assert bad.name == "out" and bad.message == "expected shape (2, N, 4) bfloat16, got shape (2, 7, 4) float32"
    bad = metrics.check_output_layout(want, [torch.zeros(2, 7, 4, 1, dtype=torch.bfloat16), torch.zeros(2, 3)])
    assert bad.name == "out" and "(2, 7, 4, 1)" in bad.message                           # rank counts
    bad = metrics.check_output_layout(want, ok[:1])
    assert bad.name == "outputs" and bad.message == "expected 2 output(s) (out, lse), got 1"
    assert metrics.check_output_layout(want, [ok[0], "lse"]).message == "expected a tensor, got str"


# ---- every optional argument is exercised ----------------------------------------------------------

# arguments whose only legal value is the default (nothing else to exercise); the test fails if the
# contract ever allows another value
SINGLE_VALUED = {("moe_experts", "activation"), ("moe_forward", "activation")}
# one process has one expert-parallel group, "local"; groups of 2 and 4 gloo ranks are exercised by
# tests/test_ep_ops.py
MULTI_PROCESS = {("ep_dispatch", "group"), ("ep_combine", "group")}


def test_single_valued_arguments_really_have_one_legal_value():
    from hal.contract.moe import ACTIVATIONS
    assert ACTIVATIONS == ("silu",)
    for op, arg in SINGLE_VALUED:
        assert hal.CONTRACT[op].signature.parameters[arg].default == "silu"


def _is_default(value, default) -> bool:
    if default is None or isinstance(value, torch.Tensor):
        return value is default
    return type(value) is type(default) and value == default


def test_every_optional_argument_is_exercised_with_a_non_default_value():
    seen: dict = {}
    for c in catalog("quick"):
        args, kwargs = c.materialize(0)
        bound = hal.CONTRACT[c.op].signature.bind(*args, **kwargs)
        for name, param in hal.CONTRACT[c.op].signature.parameters.items():
            if param.default is inspect.Parameter.empty:
                continue
            value = bound.arguments.get(name, param.default)
            seen.setdefault((c.op, name), set()).add("default" if _is_default(value, param.default) else "other")
    missing = []
    for op, spec in hal.CONTRACT.items():
        for name, param in spec.signature.parameters.items():
            if param.default is inspect.Parameter.empty or (op, name) in SINGLE_VALUED | MULTI_PROCESS:
                continue
            if seen.get((op, name), set()) != {"default", "other"}:
                missing.append(f"{op}.{name}: {sorted(seen.get((op, name), set()))}")
    assert not missing, "optional arguments not exercised both ways: " + "; ".join(missing)


def test_models_indexer_calls_are_cases():
    # the models pass q_offset and per-sequence k_lengths with batches of different lengths
    ragged = [c for c in catalog("quick", ["lightning_indexer", "sparse_attention"]) if "q_offset" in c.tags]
    assert {c.op for c in ragged} == {"lightning_indexer", "sparse_attention"}
    for c in ragged:
        _, kw = c.materialize(0)
        if c.op == "lightning_indexer":
            assert kw["q_offset"] is not None
            if kw["k_lengths"] is not None:
                assert len(set(kw["k_lengths"].tolist())) == kw["k_lengths"].numel() > 1   # every length differs
