"""Every bad input the contract names raises hal.ContractError naming the op and the argument."""
from __future__ import annotations

import pytest
import torch

import hal
from hal import ops

F8 = torch.float8_e4m3fn
r = torch.randn


def _plan(T=3, E=4, H=8, k=2):
    return ops.moe_dispatch(r(T, H), torch.randint(0, E, (T, k)), E)


def _w8(N, K):
    return ops.fp8_quantize_weight(r(N, K))


A8, A8S = ops.fp8_quantize(r(4, 200))
B8, B8S = _w8(16, 200)
IDX = torch.tensor([[[0, 1, -1]]], dtype=torch.int32)

CASES = [
    # (op, call, argument named in the message)
    ("moe_route", lambda: ops.moe_route(r(4), top_k=1), "router_logits"),
    ("moe_route", lambda: ops.moe_route(r(4, 8).int(), top_k=1), "router_logits"),
    ("moe_route", lambda: ops.moe_route(r(4, 8), top_k=9), "top_k"),
    ("moe_route", lambda: ops.moe_route(r(4, 8), top_k=0), "top_k"),
    ("moe_route", lambda: ops.moe_route(r(4, 8), top_k=2.0), "top_k"),
    ("moe_route", lambda: ops.moe_route(r(4, 8), top_k=2, n_group=3), "n_group"),
    ("moe_route", lambda: ops.moe_route(r(4, 8), top_k=2, n_group=4, topk_group=5), "topk_group"),
    ("moe_route", lambda: ops.moe_route(r(4, 8), top_k=5, n_group=4, topk_group=2), "top_k"),
    ("moe_route", lambda: ops.moe_route(r(4, 8), top_k=2, correction_bias=r(7)), "correction_bias"),
    ("moe_route", lambda: ops.moe_route(r(4, 8), top_k=2, correction_bias=r(8, device="meta")), "correction_bias"),
    ("moe_route", lambda: ops.moe_route(r(4, 8), top_k=2, scoring="relu"), "scoring"),
    ("moe_route", lambda: ops.moe_route(r(4, 8), top_k=2, scaling_factor=float("nan")), "scaling_factor"),
    ("moe_dispatch", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [9], [1]]), 4), "expert_ids"),
    ("moe_dispatch", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [-2], [1]]), 4), "expert_ids"),
    ("moe_dispatch", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0.0], [1.0], [1.0]]), 4), "expert_ids"),
    ("moe_dispatch", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1]]), 4), "expert_ids"),
    ("moe_dispatch", lambda: ops.moe_dispatch(r(3, 8, 1), torch.tensor([[0], [1], [1]]), 4), "hidden"),
    ("moe_dispatch", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1], [1]]), 4, align=0), "align"),
    ("moe_dispatch", lambda: ops.moe_dispatch(r(3, 8), torch.tensor([[0], [1], [1]], device="meta"), 4), "expert_ids"),
    ("moe_experts", lambda: ops.moe_experts("plan", r(4, 6, 8), r(4, 8, 3)), "plan"),
    ("moe_experts", lambda: ops.moe_experts(_plan(), r(4, 6, 9), r(4, 8, 3)), "w_gate_up"),
    ("moe_experts", lambda: ops.moe_experts(_plan(), r(3, 6, 8), r(3, 8, 3)), "w_gate_up"),
    ("moe_experts", lambda: ops.moe_experts(_plan(), r(4, 5, 8), r(4, 8, 3)), "w_gate_up"),
    ("moe_experts", lambda: ops.moe_experts(_plan(), r(4, 6, 8), r(4, 8, 4)), "w_down"),
    ("moe_experts", lambda: ops.moe_experts(_plan(), r(4, 6, 8), r(4, 8, 3).bfloat16()), "w_down"),
    ("moe_experts", lambda: ops.moe_experts(_plan(), r(4, 6, 8), r(4, 8, 3), activation="gelu"), "activation"),
    ("moe_experts", lambda: ops.moe_experts(_plan(), r(4, 6, 8).to(F8), r(4, 8, 3).to(F8)), "w_gate_up_scale"),
    ("moe_experts", lambda: ops.moe_experts(_plan(), r(4, 6, 8).to(F8), r(4, 8, 3).to(F8),
                                            w_gate_up_scale=torch.ones(4, 1, 1), w_down_scale=torch.ones(4, 2, 1)),
     "w_down_scale"),
    ("moe_experts", lambda: ops.moe_experts(_plan(), r(4, 6, 8).to(F8), r(4, 8, 3).to(F8),
                                            w_gate_up_scale=torch.full((4, 1, 1), float("inf")),
                                            w_down_scale=torch.ones(4, 1, 1)), "w_gate_up_scale"),
    ("moe_experts", lambda: ops.moe_experts(_plan(), r(4, 6, 8), r(4, 8, 3), w_gate_up_scale=torch.ones(4, 1, 1)),
     "w_gate_up_scale"),
    ("moe_combine", lambda: ops.moe_combine(r(5, 8), _plan(), r(3, 2)), "expert_out"),
    ("moe_combine", lambda: ops.moe_combine(r(6, 8), _plan(), r(3, 3)), "weights"),
    ("moe_combine", lambda: ops.moe_combine(r(6, 8), _plan(), r(3, 2, device="meta")), "weights"),
    ("moe_forward", lambda: ops.moe_forward(r(3, 8), r(4, 4), r(4, 6, 8), r(4, 8, 3), top_k=2), "router_logits"),
    ("moe_forward", lambda: ops.moe_forward(r(3, 8), r(3, 4), r(5, 6, 8), r(5, 8, 3), top_k=2), "w_gate_up"),
    ("moe_forward", lambda: ops.moe_forward(r(3, 8), r(3, 4), r(4, 6, 8), r(4, 8, 3), top_k=5), "top_k"),
    ("lightning_indexer", lambda: ops.lightning_indexer(r(1, 2, 2, 8), r(1, 4, 8), r(1, 2, 2), top_k=0), "top_k"),
    ("lightning_indexer", lambda: ops.lightning_indexer(r(1, 2, 8), r(1, 4, 8), r(1, 2, 2), top_k=2), "q"),
    ("lightning_indexer", lambda: ops.lightning_indexer(r(1, 2, 2, 8), r(1, 4, 7), r(1, 2, 2), top_k=2), "k"),
    ("lightning_indexer", lambda: ops.lightning_indexer(r(1, 2, 2, 8), r(1, 4, 8), r(1, 2, 3), top_k=2), "weights"),
    ("lightning_indexer", lambda: ops.lightning_indexer(r(1, 2, 2, 8), r(1, 4, 8), r(1, 2, 2).bfloat16(), top_k=2),
     "weights"),
    ("lightning_indexer", lambda: ops.lightning_indexer(r(1, 2, 2, 8), r(1, 4, 8), r(1, 2, 2), top_k=2,
                                                        k_lengths=torch.tensor([5])), "k_lengths"),
    ("lightning_indexer", lambda: ops.lightning_indexer(r(1, 2, 2, 8).to(F8), r(1, 4, 8).to(F8), r(1, 2, 2), top_k=2),
     "q_scale"),
    ("lightning_indexer", lambda: ops.lightning_indexer(r(1, 2, 2, 8).to(F8), r(1, 4, 8).to(F8), r(1, 2, 2), top_k=2,
                                                        q_scale=torch.ones(1, 2, 2), k_scale=torch.zeros(1, 4)),
     "k_scale"),
    ("lightning_indexer", lambda: ops.lightning_indexer(r(1, 2, 2, 8), r(1, 4, 8, device="meta"), r(1, 2, 2), top_k=2),
     "k"),
    ("sparse_attention", lambda: ops.sparse_attention(r(1, 1, 4, 8), r(1, 3, 3, 8), r(1, 3, 3, 8), IDX, scale=1.0), "k"),
    ("sparse_attention", lambda: ops.sparse_attention(r(1, 1, 4, 8), r(1, 3, 2, 8), r(1, 4, 2, 8), IDX, scale=1.0), "v"),
    ("sparse_attention", lambda: ops.sparse_attention(r(1, 1, 4, 8), r(1, 3, 2, 8), r(1, 3, 2, 8), IDX + 3, scale=1.0),
     "indices"),
    ("sparse_attention", lambda: ops.sparse_attention(r(1, 1, 4, 8), r(1, 3, 2, 8), r(1, 3, 2, 8), IDX - 2, scale=1.0),
     "indices"),
    ("sparse_attention", lambda: ops.sparse_attention(r(1, 1, 4, 8), r(1, 3, 2, 8), r(1, 3, 2, 8), IDX.long(),
                                                      scale=1.0), "indices"),
    ("sparse_attention", lambda: ops.sparse_attention(r(1, 1, 4, 8), r(1, 3, 2, 8).bfloat16(), r(1, 3, 2, 8), IDX,
                                                      scale=1.0), "k"),
    ("sparse_attention", lambda: ops.sparse_attention(r(1, 1, 4, 8), r(1, 3, 2, 8), r(1, 3, 2, 8), IDX,
                                                      scale=float("inf")), "scale"),
    ("fp8_quantize", lambda: ops.fp8_quantize(r(4, 8).to(F8)), "x"),
    ("fp8_quantize", lambda: ops.fp8_quantize(torch.tensor(1.0)), "x"),
    ("fp8_quantize", lambda: ops.fp8_quantize(r(4, 8), group_size=0), "group_size"),
    ("fp8_quantize", lambda: ops.fp8_quantize(r(4, 8), scale_format="e8m0"), "scale_format"),
    ("fp8_quantize_weight", lambda: ops.fp8_quantize_weight(r(4, 8, 2)), "w"),
    ("fp8_quantize_weight", lambda: ops.fp8_quantize_weight(r(4, 8), block=-1), "block"),
    # a bf16 tensor holding values beyond 448 where float8 is expected: quantize it first
    ("fp8_gemm", lambda: ops.fp8_gemm(r(4, 200).bfloat16() * 1000, A8S, B8, B8S), "a"),
    ("fp8_gemm", lambda: ops.fp8_gemm(A8, A8S[:, :1], B8, B8S), "a_scale"),
    ("fp8_gemm", lambda: ops.fp8_gemm(A8, A8S, B8, B8S.t()), "b_scale"),
    ("fp8_gemm", lambda: ops.fp8_gemm(A8, A8S * float("nan"), B8, B8S), "a_scale"),
    ("fp8_gemm", lambda: ops.fp8_gemm(A8, A8S, B8, -B8S), "b_scale"),
    ("fp8_gemm", lambda: ops.fp8_gemm(A8, A8S, B8[:, :100], B8S), "b"),
    ("fp8_gemm", lambda: ops.fp8_gemm(A8, A8S, B8, B8S, out_dtype=torch.int32), "out_dtype"),
    ("fp8_gemm", lambda: ops.fp8_gemm(A8, A8S, B8, B8S, bias=r(15)), "bias"),
    ("fp8_linear", lambda: ops.fp8_linear(r(4, 199), B8, B8S), "x"),
    ("fp8_linear", lambda: ops.fp8_linear(r(4, 200), B8.float(), B8S), "w_q"),
    ("fp8_linear", lambda: ops.fp8_linear(r(4, 200), B8, B8S[:, :1]), "w_scale"),
    ("fp8_linear", lambda: ops.fp8_linear(r(4, 200), B8, B8S * float("inf")), "w_scale"),
]


@pytest.mark.parametrize("op,call,arg", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_names_op_and_argument(op, call, arg):
    with pytest.raises(hal.ContractError) as exc:
        call()
    err = exc.value
    assert isinstance(err, ValueError)
    assert err.op == op and err.arg == arg, str(err)
    assert str(err).startswith(f"{op}: {arg}: expected ") and ", got " in str(err)


def test_every_op_has_bad_input_cases():
    assert {c[0] for c in CASES} == set(hal.CONTRACT)


def test_checked_mode_reports_duplicate_sparse_indices():
    args = (r(1, 1, 2, 8), r(1, 3, 1, 8), r(1, 3, 1, 8), torch.tensor([[[1, 1, -1]]], dtype=torch.int32))
    ops.sparse_attention(*args, scale=1.0)                       # duplicates are the caller's bug: unchecked
    hal.set_checked(True)
    try:
        with pytest.raises(hal.ContractError, match="duplicate"):
            ops.sparse_attention(*args, scale=1.0)
    finally:
        hal.set_checked(False)


def test_data_checks_skip_device_tensors_unless_checked():
    # on a non-CPU device the value-range checks need a host sync: they run only in checked mode
    from hal.contract._spec import data_checks
    meta = torch.empty(3, device="meta")
    assert data_checks(torch.empty(3)) and not data_checks(meta)
    hal.set_checked(True)
    try:
        assert data_checks(meta)
    finally:
        hal.set_checked(False)
