"""Properties of the reference as a whole, for every op: its outputs depend on the input values,
not on their memory layout, and ``float64_evaluation()`` returns every float output in float64
while quantized outputs keep the contract's dtypes.

(Not claimed: bitwise equality across thread counts or CPUs. MKL's fp32 GEMM sums in an order that
depends on both, e.g. a 9x140x300 product differs between 1 and 2 threads in the last bit.)"""
from __future__ import annotations

import pytest
import torch

import hal
from hal import ops
from hal.backends.cpu import KERNELS, float64_evaluation
from hal.contract import OP_NAMES


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, stored in another layout: column-major-like for >= 2-D, every other
    element of a twice-as-long buffer for 1-D."""
    if t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


def _bits(x):
    if isinstance(x, hal.DispatchPlan):
        return [_bits(t) for t in x.tensors()]
    if isinstance(x, tuple):
        return [_bits(t) for t in x]
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def _equal(a, b) -> bool:
    if isinstance(a, list):
        return all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _cases(g):
    x, logits, bias = torch.randn(7, 40, generator=g), torch.randn(7, 8, generator=g), torch.rand(8, generator=g)
    ids = torch.randint(1, 8, (7, 3), generator=g)
    ids[0, 0] = 0                                     # expert 0 gets one row (a GEMV: layout-sensitive in BLAS)
    plan = ops.moe_dispatch(x, ids, 8, align=2)
    w_gu, w_d = torch.randn(8, 6, 40, generator=g), torch.randn(8, 40, 3, generator=g)
    q8 = [ops.fp8_quantize_weight(w) for w in w_gu]
    d8 = [ops.fp8_quantize_weight(w) for w in w_d]
    g8 = dict(w_gate_up_scale=torch.stack([s for _, s in q8]), w_down_scale=torch.stack([s for _, s in d8]))
    gu8, dn8 = torch.stack([q for q, _ in q8]), torch.stack([q for q, _ in d8])
    qi, ki, wi = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 9, 16, generator=g), torch.rand(2, 5, 4, generator=g)
    idx = ops.lightning_indexer(qi, ki, wi, top_k=6)
    qa, ka, va = (torch.randn(2, 5, 4, 24, generator=g), torch.randn(2, 9, 2, 24, generator=g),
                  torch.randn(2, 9, 2, 12, generator=g))
    xa = torch.randn(9, 300, generator=g)
    wb = torch.randn(140, 300, generator=g)
    a, a_s = ops.fp8_quantize(xa)
    b, b_s = ops.fp8_quantize_weight(wb)
    route = dict(top_k=3, correction_bias=bias, n_group=4, topk_group=2)
    qd, kd, vd = (torch.randn(2, 6, 1, 8, generator=g), torch.randn(2, 6, 1, 8, generator=g),
                  torch.randn(2, 6, 2, 4, generator=g))
    gd, bd = -torch.rand(2, 6, 2, generator=g), torch.rand(2, 6, 2, generator=g)
    xc, wc = torch.randn(2, 5, 8, generator=g), torch.randn(8, 4, generator=g)
    # (op, positional tensors, keywords whose tensors are re-laid out too, fixed keywords)
    return [
        ("moe_route", (logits,), {"correction_bias": bias}, dict(top_k=3, n_group=4, topk_group=2)),
        ("moe_dispatch", (x, ids), {}, dict(num_experts=8, align=2)),
        ("moe_experts", (plan, w_gu, w_d), {}, {}),
        ("moe_experts", (plan, gu8, dn8), g8, {}),
        ("moe_combine", (torch.randn(plan.hidden.shape, generator=g), plan, torch.rand(7, 3, generator=g)), {}, {}),
        ("moe_forward", (x, logits, w_gu, w_d), {}, route),
        ("lightning_indexer", (qi, ki, wi), {"k_lengths": torch.tensor([9, 6])}, dict(top_k=6)),
        ("sparse_attention", (qa, ka, va, idx), {}, dict(scale=0.2, return_lse=True)),
        ("fp8_quantize", (xa,), {}, dict(scale_format="ue8m0")),
        ("fp8_quantize_weight", (wb,), {}, {}),
        ("fp8_gemm", (a, a_s, b, b_s), {"bias": torch.randn(140, generator=g)}, dict(out_dtype=torch.float32)),
        ("fp8_linear", (xa, b, b_s), {}, {}),
        ("gated_delta_rule", (qd, kd, vd, gd, bd), {"initial_state": torch.randn(3, 2, 8, 4, generator=g),
                                                   "state_indices": torch.tensor([2, 0]), "seq_lens": torch.tensor([6, 3])},
         dict(scale=0.3, qk_l2norm=True)),
        ("causal_conv1d", (xc, wc), {"bias": torch.randn(8, generator=g), "conv_state": torch.randn(3, 3, 8, generator=g),
                                     "state_indices": torch.tensor([1, 2]), "seq_lens": torch.tensor([5, 2])},
         dict(activation="silu")),
        ("ep_dispatch", (x, ids.to(torch.int32)), {"expert_map": torch.zeros(8, dtype=torch.int32)}, dict(num_experts=8)),
        ("ep_combine", (torch.randn(5, 40, generator=g), torch.tensor([[0, 0, 1], [0, 3, 0], [0, 6, 2], [0, 0, 0], [0, 2, 2]]),
                        torch.rand(7, 3, generator=g)), {}, {}),
        # one row / one query: BLAS takes its GEMV paths, whose summation order follows the layout
        ("fp8_gemm", (a[:1], a_s[:1], b, b_s), {}, dict(out_dtype=torch.float32)),
        ("fp8_linear", (xa[:1], b, b_s), {}, {}),
        ("lightning_indexer", (qi[:, :1], ki, wi[:, :1]), {}, dict(top_k=6)),
        ("sparse_attention", (qa[:, :1], ka, va, idx[:, :1]), {}, dict(scale=0.2, return_lse=True)),
        ("sparse_attention", (qa[:1, :1], ka[:1], va[:1], idx[:1, :1]), {}, dict(scale=0.2, return_lse=True)),
    ]


CASES = _cases(torch.Generator().manual_seed(30))


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_outputs_do_not_depend_on_the_memory_layout(case):
    op, args, tensor_kw, kw = case
    fn = getattr(ops, op)
    relaid = [a if isinstance(a, hal.DispatchPlan) else _strided(a) for a in args]
    assert any(not t.is_contiguous() for t in relaid if isinstance(t, torch.Tensor))
    want = fn(*args, **tensor_kw, **kw)
    got = fn(*relaid, **{k: _strided(v) for k, v in tensor_kw.items()}, **kw)
    assert _equal(_bits(want), _bits(got)), op


def test_every_op_has_a_layout_case():
    assert {c[0] for c in CASES} == set(OP_NAMES)   # HAL's own ops (tests may add_op others)


# outputs of each op in return order: "float" (float64 inside float64_evaluation), or the dtype
# they keep there (quantization and selections are the op's semantics, not working precision)
OUTPUT_DTYPES = {
    "moe_route": ("float", torch.int32), "moe_dispatch": None, "moe_experts": ("float",),
    "moe_combine": ("float",), "moe_forward": ("float",), "lightning_indexer": (torch.int32,),
    "sparse_attention": ("float", "float"), "fp8_quantize": (torch.float8_e4m3fn, torch.float32),
    "fp8_quantize_weight": (torch.float8_e4m3fn, torch.float32), "fp8_gemm": ("float",), "fp8_linear": ("float",),
    "gated_delta_rule": ("float", "float"), "causal_conv1d": ("float", torch.float32),
    "ep_dispatch": (torch.float32, torch.float32, torch.int32, torch.int32), "ep_combine": ("float",),
}


def test_float64_evaluation_dtypes_and_scope():
    assert set(OUTPUT_DTYPES) == set(OP_NAMES)
    for case in CASES:
        op, args, tensor_kw, kw = case
        normal = getattr(ops, op)(*args, **tensor_kw, **kw)
        with float64_evaluation():
            exact = KERNELS[op](*args, **tensor_kw, **kw)
        want = OUTPUT_DTYPES[op]
        if want is None:                                    # a DispatchPlan: integer bookkeeping + copied rows
            assert all(torch.equal(a, b) for a, b in zip(exact.tensors(), normal.tensors()))
            continue
        exact = exact if isinstance(exact, tuple) else (exact,)
        normal = normal if isinstance(normal, tuple) else (normal,)
        for e, n, w in zip(exact, normal, want):
            assert e.dtype == (torch.float64 if w == "float" else w), op
            assert n.dtype != torch.float64, op
            if w != "float":              # quantization happens in fp32 in both; these selections have no near-ties
                assert _equal(_bits(e), _bits(n)), op
    # the context restores the previous state, also when nested
    with float64_evaluation():
        with float64_evaluation():
            pass
        assert KERNELS["fp8_linear"](torch.ones(1, 4), *ops.fp8_quantize_weight(torch.ones(2, 4))).dtype == torch.float64
    assert KERNELS["fp8_linear"](torch.ones(1, 4), *ops.fp8_quantize_weight(torch.ones(2, 4))).dtype == torch.float32
