"""torch.ops.hal.*: opcheck for every op, and torch.compile(fullgraph=True) matching eager."""
from __future__ import annotations

import pytest
import torch

import hal
from hal.torch_ops import TORCH_OPS, torch_call


def _sample(op: str):
    return hal.CONTRACT[op].sample(torch.Generator().manual_seed(0))


def _torch_op_args(op: str):
    """The op's sample arguments in torch.ops.hal's flat form (plans as tensors)."""
    args, kwargs = _sample(op)
    return torch_call(hal.CONTRACT[op], args, kwargs), {}


def test_every_contract_op_is_a_torch_op():
    assert set(TORCH_OPS) == set(hal.CONTRACT)
    for name in hal.CONTRACT:
        assert hasattr(torch.ops.hal, name)


@pytest.mark.parametrize("op", list(hal.CONTRACT))
def test_opcheck(op):
    args, kwargs = _torch_op_args(op)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
             "test_aot_dispatch_dynamic")
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args):
        # torch's SchemaCheckMode compares inputs with CPU kernels float8_e4m3fn lacks ("mul" is
        # not implemented for Float8_e4m3fn); test_inputs_not_modified covers mutation instead
        tests = tuple(t for t in tests if t != "test_schema")
    if op in ("moe_dispatch", "ep_dispatch"):
        # the row count (plan rows, received rows) is data-dependent (an unbacked size): static AOT tracing cannot
        # specialise it; the dynamic AOT check covers the op
        tests = tuple(t for t in tests if t != "test_aot_dispatch_static")
    torch.library.opcheck(getattr(torch.ops.hal, op).default, args, kwargs, test_utils=tests)


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("op", list(hal.CONTRACT))
def test_inputs_not_modified(op):
    args, kwargs = _torch_op_args(op)
    flat = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    before = [_bits(a).clone() for a in flat]
    outs = getattr(torch.ops.hal, op)(*args, **kwargs)
    for a, b in zip(flat, before):
        assert torch.equal(_bits(a), b)
    for o in (outs if isinstance(outs, tuple) else (outs,)):
        assert all(o.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() for a in flat if a.numel())


@pytest.mark.parametrize("op", list(hal.CONTRACT))
def test_torch_op_equals_python_api(op):
    args, kwargs = _torch_op_args(op)
    got = getattr(torch.ops.hal, op)(*args, **kwargs)
    args, kwargs = _sample(op)
    want = getattr(hal.ops, op)(*args, **kwargs)
    if isinstance(want, hal.DispatchPlan):
        want = want.tensors()
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        assert torch.equal(_bits(g), _bits(w))


def _moe_layer(hidden, logits, w_gu, w_d):
    weights, ids = torch.ops.hal.moe_route(logits, 2, "sigmoid", None, 2, 1, True, 2.5)
    h, tpe, offs, src = torch.ops.hal.moe_dispatch(hidden, ids, w_gu.shape[0], 1)
    y = torch.ops.hal.moe_experts(h, tpe, offs, src, hidden.shape[0], 2, 1, w_gu, w_d)
    return torch.ops.hal.moe_combine(y, h, tpe, offs, src, hidden.shape[0], 2, 1, weights) + hidden


def _fp8_mlp(x, w_q, w_s):
    q, s = torch.ops.hal.fp8_quantize(x)
    return torch.relu(torch.ops.hal.fp8_gemm(q, s, w_q, w_s, torch.float32)) + torch.ops.hal.fp8_linear(x, w_q, w_s).float()


def _dsa(q, k, v, w):
    idx = torch.ops.hal.lightning_indexer(q, k[:, :, 0], w, 3)
    out, lse = torch.ops.hal.sparse_attention(q, k, v, idx, 0.125)
    return out * 2, lse


def test_compile_fullgraph_matches_eager_moe():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(6, 16, generator=g), torch.randn(6, 8, generator=g), torch.randn(8, 16, 16, generator=g),
            torch.randn(8, 16, 8, generator=g))
    eager = _moe_layer(*args)
    compiled = torch.compile(_moe_layer, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_compile_fullgraph_matches_eager_fp8_and_dsa():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 160, generator=g)
    w_q, w_s = hal.ops.fp8_quantize_weight(torch.randn(24, 160, generator=g))
    torch.testing.assert_close(torch.compile(_fp8_mlp, fullgraph=True)(x, w_q, w_s), _fp8_mlp(x, w_q, w_s),
                               rtol=0, atol=0)
    q, k = torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 6, 1, 16, generator=g)
    v, w = torch.randn(1, 6, 1, 8, generator=g), torch.rand(1, 4, 2, generator=g)
    out_c, lse_c = torch.compile(_dsa, fullgraph=True)(q, k, v, w)
    out_e, lse_e = _dsa(q, k, v, w)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.testing.assert_close(lse_c, lse_e, rtol=0, atol=0)
