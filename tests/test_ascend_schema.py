"""hal-ascend's emulator bound to the installed torch_npu wheel's own schemas and meta functions:
calls bind exactly as the real ops bind them, results have the arity, shapes and dtypes the wheel
declares, and the backend's calls survive that binding. CI has the wheel (ci/test.sh); elsewhere
these tests skip, saying why."""
from __future__ import annotations

import inspect
import os

import pytest
import torch

pytest.importorskip("hal_ascend", reason="hal-ascend is installed by ci/test.sh")

from hal_ascend import emulator as emu  # noqa: E402
from hal_ascend import npu, schema  # noqa: E402

PKG = schema.torch_npu_dir()
if PKG is None and os.environ.get("HAL_TEST_TORCH_NPU_PATH"):
    raise RuntimeError(f"HAL_TEST_TORCH_NPU_PATH={os.environ['HAL_TEST_TORCH_NPU_PATH']} is set (CI) but holds no "
                       f"{schema.YAML_PATH}: the schema-bound tests must run there")
pytestmark = pytest.mark.skipif(PKG is None, reason="the torch-npu wheel (its npu_native_functions_by_codegen.yaml) "
                                "is not installed; ci/test.sh installs it to .hal-test-deps/torch-npu")


@pytest.fixture
def bound(monkeypatch):
    """The emulator's ops bound to the wheel's schemas, as HAL_ASCEND_EMULATE=1 resolves them."""
    monkeypatch.setenv("HAL_ASCEND_EMULATE", "1")
    npu.reset()
    b = npu.binding()
    assert b.bound, b.reason
    yield npu.functions()
    npu.reset()


def _yaml_schema(name):
    return schema.read_schemas({name}, os.path.join(PKG, schema.YAML_PATH))[name][0]


def test_every_emulated_op_is_registered_under_the_wheels_exact_schema(bound):
    b = npu.binding()
    assert set(b.schemas) == set(npu.NAMES) and set(b.meta) == set(npu.NAMES) and b.version == "2.13.0"
    for name in npu.NAMES:
        registered = str(getattr(torch.ops, schema.NAMESPACE).__getattr__(name).default._schema)
        assert registered == str(torch._C.parse_schema(f"{schema.NAMESPACE}::{_yaml_schema(name)}")), name
    assert "int sparse_block_size=1" in _yaml_schema("npu_sparse_flash_attention")       # keyword-only, after `*`
    assert _yaml_schema("npu_lightning_indexer").endswith("-> (Tensor, Tensor)")


def test_the_emulators_python_signatures_equal_the_schemas():
    """The defaults used when the wheel is absent are the schema's, argument for argument."""
    for name in npu.NAMES:
        sch = torch._C.parse_schema(f"x::{_yaml_schema(name)}")
        params = list(inspect.signature(emu.IMPLS[name]).parameters.values())
        assert [p.name for p in params] == [a.name for a in sch.arguments], name
        for p, a in zip(params, sch.arguments):
            assert (p.kind == p.KEYWORD_ONLY) == a.kwarg_only, (name, p.name)
            if a.default_value is not None or p.default is not p.empty:
                expected = a.default_value
                got = list(p.default) if isinstance(p.default, tuple) else p.default
                assert got == expected, (name, p.name, got, expected)


def _indexer_args():
    q = torch.randn(1, 3, 2, 128).bfloat16()
    return q, torch.randn(1, 5, 1, 128).bfloat16(), torch.rand(1, 3, 2).bfloat16()


def test_the_old_calls_fail_as_on_the_real_op(bound):
    q, k, w = _indexer_args()
    with pytest.raises(RuntimeError, match="positional"):     # sparse_block_size passed positionally
        bound.npu_sparse_flash_attention(q, k, k, torch.zeros(1, 3, 1, 2, dtype=torch.int32), 1.0, 1)
    with pytest.raises(RuntimeError, match="int"):            # a float where the schema says int
        bound.npu_lightning_indexer(q, k, w, sparse_count=2.0)
    with pytest.raises(RuntimeError, match="Unknown keyword"):
        bound.npu_lightning_indexer(q, k, w, sparse_count=2, layout="BSND")
    out = bound.npu_lightning_indexer(q, k, w, sparse_count=4)
    assert isinstance(out, tuple) and len(out) == 2            # (indices, values): indexing it as one tensor fails
    with pytest.raises(TypeError):
        out[:, :, 0, :]


def test_schema_defaults_reach_the_emulator(bound):
    """sparse_mode defaults to 3 (rightDownCausal) in the schema: query 0 of 3 over 5 keys sees 3."""
    q, k, w = _indexer_args()
    idx, vals = bound.npu_lightning_indexer(q, k, w, sparse_count=5)
    assert (idx[0, :, 0] >= 0).sum(-1).tolist() == [3, 4, 5] and vals.shape == (0,) and vals.dtype == q.dtype


def _faulty(name, result):
    impls = dict(emu.IMPLS)
    impls[name] = lambda **kw: result(**kw)
    return schema.SchemaBinding(impls)


@pytest.mark.parametrize("result,fragment", [
    (lambda **kw: emu.npu_lightning_indexer(**kw)[0], "returns 2 tensors"),                  # one output, not two
    (lambda **kw: tuple(t[..., :1] for t in emu.npu_lightning_indexer(**kw)), "meta function gives"),   # wrong shape
    (lambda **kw: (emu.npu_lightning_indexer(**kw)[0].long(), emu.npu_lightning_indexer(**kw)[1]), "torch.int64"),
])
def test_a_wrong_output_arity_shape_or_dtype_fails(bound, result, fragment):
    previous = schema.activate(_faulty("npu_lightning_indexer", result))
    try:
        with pytest.raises(schema.NpuSchemaError, match=fragment):
            bound.npu_lightning_indexer(*_indexer_args(), sparse_count=4)
    finally:
        schema.activate(previous)


def test_meta_functions_come_from_the_wheel_and_check_its_rules(bound):
    """The wheel's meta function for npu_sparse_flash_attention gives softmax_max / softmax_sum as
    [B, N2, S1, N1 / N2] fp32 (and empty without return_softmax_lse)."""
    meta = npu.binding().meta["npu_sparse_flash_attention"]
    q, kv = torch.empty(2, 3, 4, 512), torch.empty(2, 7, 1, 512)
    out, mx, sm = meta(q, kv, kv, torch.empty(2, 3, 1, 5, dtype=torch.int32), 1.0, return_softmax_lse=True)
    assert tuple(out.shape) == (2, 3, 4, 512) and tuple(mx.shape) == tuple(sm.shape) == (2, 1, 3, 4)
    assert mx.dtype == torch.float32
    with pytest.raises(RuntimeError, match="sparse_count"):
        npu.binding().meta["npu_lightning_indexer"](*_indexer_args(), sparse_count=0)


def test_without_the_wheel_the_emulator_runs_unbound_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HAL_ASCEND_EMULATE", "1")
    monkeypatch.setenv("HAL_ASCEND_TORCH_NPU_DIR", str(tmp_path))
    npu.reset()
    try:
        b = npu.binding()
        assert not b.bound and "UNBOUND" in b.describe() and "not found" in b.reason
        from hal_ascend.kernels import lightning_indexer
        q, k, w = _indexer_args()
        out = lightning_indexer(q, k[:, :, 0], w.float(), top_k=2, causal=True, q_offset=None, k_lengths=None,
                                q_scale=None, k_scale=None)
        assert out.shape == (1, 3, 2) and npu.functions().npu_lightning_indexer is emu.npu_lightning_indexer
    finally:
        npu.reset()
