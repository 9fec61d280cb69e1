"""``hal export onnx``: the exported GLM-4.5 graph runs on onnxruntime and gives HAL's logits
(prefill and a decode step through the exported KV cache), its MoE is com.microsoft.MoE with
DeepSeek/GLM routing in plain ONNX, DSA/FP8 models export as hal.* nodes reported not runnable,
and bad inputs give clean errors."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from hal.cli import cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _session(src):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def glm45(tmp_path_factory):
    """tiny-glm45 exported with --check --json: (path, the command's JSON)."""
    out = tmp_path_factory.mktemp("glm45") / "glm45.onnx"
    res = CliRunner().invoke(cli, ["export", "onnx", "--model", "tiny-glm45", "--out", str(out), "--check",
                                   "--seq", "12", "--json"])
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


@pytest.fixture(scope="module")
def hal_glm45():
    import hal.models as M
    return M.load("tiny-glm45", "cpu")


def test_glm45_logits_match_hal_within_budget_at_prefill_and_decode(glm45):
    _, r = glm45
    assert r["runnable_in_onnxruntime"] is True and r["not_runnable_reason"] is None
    c = r["check"]
    assert c["ran"] and c["passed"] and c["prompt_shape"] == [2, 12] and c["budget_op"] == "moe_forward"
    assert [s["step"] for s in c["steps"]] == ["prefill", "decode"]
    assert c["steps"][0]["shape"] == [2, 12, 512] and c["steps"][1]["shape"] == [2, 1, 512]
    for s in c["steps"]:
        # the budget is the contract's: 2 x HAL fp32's own error against the float64 truth + 1e-5
        assert s["budget_abs"] == pytest.approx(2 * s["ref_max_abs"] + 1e-5)
        assert s["max_abs"] <= s["budget_abs"] and s["calc_diff"] <= s["budget_calc_diff"]
        assert s["max_abs_vs_hal"] < 1e-5


def test_left_padded_batch_gives_each_prompt_its_own_logits(glm45, hal_glm45):
    """attention_mask / position_ids: a left-padded row equals that prompt run alone in HAL."""
    path, _ = glm45
    sess = _session(str(path))
    model = hal_glm45
    long_p, short_p = [5, 9, 300, 41, 77, 12, 8], [400, 3, 17, 250]
    pad = len(long_p) - len(short_p)
    ids = np.array([long_p, [0] * pad + short_p], dtype=np.int64)
    mask = np.array([[1] * len(long_p), [0] * pad + [1] * len(short_p)], dtype=np.int64)
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    feeds = {"input_ids": ids, "position_ids": pos, "attention_mask": mask}
    for v in sess.get_inputs():
        if v.name.startswith("past_key_values."):
            feeds[v.name] = np.zeros((2, v.shape[1], 0, v.shape[3]), dtype=np.float32)
    logits = sess.run(["logits"], feeds)[0]
    for row, prompt, start in ((0, long_p, 0), (1, short_p, pad)):
        want = model.forward(torch.tensor([prompt]), model.new_cache(1, len(prompt)), torch.tensor([0]),
                             torch.tensor([len(prompt)]), unpadded=True)[0]
        assert np.abs(logits[row, start:] - want.numpy()).max() < 1e-5


def test_moe_nodes_are_com_microsoft_moe_with_interleaved_swiglu(glm45, hal_glm45):
    path, r = glm45
    m = onnx.load(str(path))
    moe = [n for n in m.graph.node if n.op_type == "MoE"]
    sparse = [i for i, layer in enumerate(hal_glm45.layers) if hasattr(layer.mlp, "w_gate_up")]
    assert len(moe) == len(sparse) == r["moe_nodes"] == 3 and all(n.domain == "com.microsoft" for n in moe)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
    assert attrs == {"k": 4, "activation_type": b"swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
                     "activation_beta": 0.0, "normalize_routing_weights": 0, "use_sparse_mixer": 0}
    inits = {t.name: t for t in m.graph.initializer}
    fc1 = onnx.numpy_helper.to_array(inits[moe[0].input[2]])
    fc2 = onnx.numpy_helper.to_array(inits[moe[0].input[4]])
    mlp = hal_glm45.layers[sparse[0]].mlp
    I = mlp.w_down.shape[2]
    assert fc1.shape == (16, 2 * I, 256) and fc2.shape == (16, 256, I)
    assert np.array_equal(fc1[:, 0::2], mlp.w_gate_up[:, :I].numpy())     # gate rows at even positions
    assert np.array_equal(fc1[:, 1::2], mlp.w_gate_up[:, I:].numpy())     # up rows at odd positions
    assert np.array_equal(fc2, mlp.w_down.numpy())
    assert moe[0].input[3] == ""                                           # no fc1 bias
    # the router input is built from plain ONNX: sigmoid, + correction bias, TopK, GatherElements
    assert {"Sigmoid", "TopK", "GatherElements", "ScatterElements", "Log"} <= {n.op_type for n in m.graph.node}


@pytest.mark.parametrize("n_group, topk_group, renormalize, scaling", [(4, 2, False, 2.5), (1, 1, True, 2.5)])
def test_deepseek_routing_through_com_microsoft_moe_equals_moe_forward(n_group, topk_group, renormalize, scaling):
    """Group-limited routing, no renormalization, a routed scaling factor: the exported MoE block
    on onnxruntime equals HAL's reference moe_forward + shared expert."""
    import hal
    from hal.export import layers as L
    from hal.export.graph import GraphBuilder
    from hal.models.layers import MLP, MoE, Linear
    g_ = torch.Generator().manual_seed(7)
    E, H, I, k = 16, 64, 32, 4
    rnd = lambda *s: torch.randn(*s, generator=g_) * 0.1                                   # noqa: E731
    mlp = MoE(gate_weight=rnd(E, H), correction_bias=rnd(E), w_gate_up=rnd(E, 2 * I, H), w_down=rnd(E, H, I),
              w_gate_up_scale=None, w_down_scale=None,
              shared=MLP(Linear(rnd(I, H)), Linear(rnd(I, H)), Linear(rnd(H, I))),
              top_k=k, n_group=n_group, topk_group=topk_group, renormalize=renormalize, scaling_factor=scaling)
    g = GraphBuilder()
    g.add_input("x", onnx.TensorProto.FLOAT, ["batch", "sequence", H])
    g.add_output(L.moe(g, "x", mlp, "mlp"), "y", onnx.TensorProto.FLOAT, ["batch", "sequence", H])
    model = onnx.helper.make_model(g.graph("moe"), opset_imports=[onnx.helper.make_opsetid("", 21),
                                                                   onnx.helper.make_opsetid("com.microsoft", 1)])
    x = rnd(3, 5, H)
    got = _session(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    want = mlp(x, hal.runtime("cpu"))
    assert np.abs(got - want.numpy()).max() < 2e-6
    # and the routing really differs from plain top-k when groups are limited
    if n_group > 1:
        s = torch.sigmoid(x.reshape(-1, H) @ mlp.gate_weight.T) + mlp.correction_bias
        plain = s.topk(k, -1).indices.sort(-1).values
        limited = hal.ops.moe_route(x.reshape(-1, H) @ mlp.gate_weight.T, top_k=k, correction_bias=mlp.correction_bias,
                                    n_group=n_group, topk_group=topk_group)[1].long().sort(-1).values
        assert not torch.equal(plain, limited)


@pytest.fixture(scope="module")
def dsv32(tmp_path_factory):
    out = tmp_path_factory.mktemp("dsv32") / "dsv32.onnx"
    res = CliRunner().invoke(cli, ["export", "onnx", "-m", "tiny-deepseek-v32", "-o", str(out), "--check", "--json"])
    return out, res


def test_dsa_model_exports_hal_nodes_and_is_reported_not_runnable(dsv32):
    import hal
    out, res = dsv32
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["runnable_in_onnxruntime"] is False and "custom-op library" in r["not_runnable_reason"]
    assert {c["op"]: c["count"] for c in r["custom_nodes"]} == {"hal.lightning_indexer": 4, "hal.sparse_attention": 4}
    assert r["check"]["ran"] is False and r["check"]["reason"].startswith("not possible:")
    assert r["check"]["steps"] == []
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    assert {(o.domain, o.version) for o in m.opset_import} >= {("hal", 1), ("com.microsoft", 1)}
    for n in m.graph.node:
        if n.domain == "hal":
            assert hal.CONTRACT[n.op_type].doc.strip() in n.doc_string
            assert n.doc_string.startswith(f"HAL contract {hal.CONTRACT_VERSION} op {n.op_type}(")
    names = [v.name for v in m.graph.input]
    assert "past_key_values.0.latent" in names and "past_key_values.0.index_k" in names
    with pytest.raises(Exception, match="hal"):          # the claim is true: onnxruntime cannot load it
        _session(str(out))


# onnx.reference finds a custom op by its class name: the classes are named after the ONNX op types
class lightning_indexer(OpRun):      # noqa: N801
    """hal.lightning_indexer computed by HAL's reference kernel (the contract's definition)."""
    op_domain = "hal"

    def _run(self, q, k, w, top_k=None, causal=None):
        import hal
        t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, w)]
        return (hal.ops.lightning_indexer(*t, top_k=int(top_k), causal=bool(causal)).numpy(),)


class sparse_attention(OpRun):       # noqa: N801
    op_domain = "hal"

    def _run(self, q, k, v, idx, scale=None, return_lse=None):
        import hal
        t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v, idx)]
        out, lse = hal.ops.sparse_attention(*t, scale=float(scale), return_lse=True)
        return out.numpy(), lse.numpy()


class MoE(OpRun):
    """com.microsoft.MoE as onnxruntime's schema states it (softmax over router_probs, top-k,
    interleaved SwiGLU), in float64, written from the schema, not from HAL."""
    op_domain = "com.microsoft"

    def _run(self, x, router, fc1, fc1_bias=None, fc2=None, k=None, activation_type=None, swiglu_fusion=None,
             activation_alpha=None, activation_beta=None, normalize_routing_weights=None, use_sparse_mixer=None):
        assert activation_type in ("swiglu", b"swiglu") and swiglu_fusion == 1 and normalize_routing_weights == 0
        x, p = torch.from_numpy(x).double(), torch.softmax(torch.from_numpy(router).double(), -1)
        w, ids = p.topk(int(k), -1)
        h = torch.einsum("th,eih->tei", x, torch.from_numpy(np.array(fc1)).double())
        a = torch.nn.functional.silu(h[..., 0::2]) * h[..., 1::2]
        y = torch.einsum("tei,ehi->teh", a, torch.from_numpy(np.array(fc2)).double())
        return ((y.gather(1, ids[..., None].expand(-1, -1, y.shape[-1])) * w[..., None]).sum(1).float().numpy(),)


@pytest.mark.parametrize("name", ["tiny-deepseek-v32", "tiny-glm5"])
def test_dsa_graph_with_its_hal_nodes_bound_to_the_contract_is_the_model(name):
    """The graph around the hal.* nodes is right: with the nodes computed as the contract
    defines them (onnx's ReferenceEvaluator, HAL's reference kernels), prefill and a decode step
    through the exported cache give HAL's logits (group routing, shared indexer layers, YaRN-free
    RoPE, MLA expanded form vs HAL's absorbed decode)."""
    import hal.models as M
    from hal.export.onnx import build_graph, empty_cache
    model = M.load(name, "cpu")
    eg = build_graph(model)
    ev = ReferenceEvaluator(eg.model, new_ops=[lightning_indexer, sparse_attention, MoE])
    S = 12                                            # > index_topk = 8: the indexer really selects
    ids = torch.randint(0, 512, (1, S), generator=torch.Generator().manual_seed(1))
    feeds = {"input_ids": ids.numpy(), "position_ids": np.arange(S)[None], **empty_cache(eg.info, 1)}
    outs = dict(zip([o.name for o in eg.model.graph.output], ev.run(None, feeds)))
    cache = model.new_cache(1, S + 1)
    want = model.forward(ids, cache, torch.tensor([0]), torch.tensor([S]), unpadded=True)
    assert np.abs(outs["logits"] - want.numpy()).max() < 1e-5
    nxt = want[:, -1].argmax(-1, keepdim=True)
    feeds = {"input_ids": nxt.numpy(), "position_ids": np.array([[S]]),
             **{n.replace("present.", "past_key_values.", 1): v for n, v in outs.items() if n.startswith("present.")}}
    got = ev.run(["logits"], feeds)[0]
    want = model.forward(nxt, cache, torch.tensor([S]), torch.tensor([1]), unpadded=True)
    assert np.abs(got - want.numpy()).max() < 1e-5


def test_dsa_text_output_says_not_runnable_and_check_not_possible(tmp_path):
    res = CliRunner().invoke(cli, ["export", "onnx", "-m", "tiny-glm5", "-o", str(tmp_path / "g5.onnx"), "--check"])
    assert res.exit_code == 0
    assert "runnable in onnxruntime: no: the graph holds hal.lightning_indexer, hal.sparse_attention" in res.stdout
    assert "check: not possible:" in res.stdout


def test_fp8_layers_export_as_hal_nodes(tmp_path):
    res = CliRunner().invoke(cli, ["export", "onnx", "-m", "tiny-glm45", "--quantize", "fp8",
                                   "-o", str(tmp_path / "fp8.onnx"), "--json"])
    r = json.loads(res.stdout)
    assert res.exit_code == 0 and r["runnable_in_onnxruntime"] is False and r["moe_nodes"] == 0
    ops = {c["op"] for c in r["custom_nodes"]}
    assert ops == {"hal.fp8_linear", "hal.moe_forward"}
    m = onnx.load(str(tmp_path / "fp8.onnx"))
    fp8 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert fp8 and all(t.name.endswith((".weight", "w_gate_up", "w_down")) for t in fp8)


def test_unknown_model_exits_4_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(cli, ["export", "onnx", "-m", "no-such-model", "-o", str(out)])
    assert res.exit_code == 4 and res.stdout == "" and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 1 and "no-such-model" in res.stderr
    assert list(tmp_path.iterdir()) == []
    res = CliRunner().invoke(cli, ["export", "onnx", "-m", "no-such-model", "-o", str(out), "--json"])
    assert res.exit_code == 4 and json.loads(res.stdout)["exit_code"] == 4


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_bad_out_is_a_usage_error_before_loading(tmp_path, where):
    out = tmp_path / "nope" / "m.onnx" if where == "missing-folder" else tmp_path
    res = CliRunner().invoke(cli, ["export", "onnx", "-m", "tiny-glm45", "-o", str(out)])
    assert res.exit_code == 2 and "--out" in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_exits_4_and_leaves_nothing(tmp_path, monkeypatch):
    from hal import atomic
    old = tmp_path / "m.onnx"
    old.write_bytes(b"previous model")

    def disk_full(fd, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    res = CliRunner().invoke(cli, ["export", "onnx", "-m", "tiny-glm45", "-o", str(old)])
    assert res.exit_code == 4 and "No space left on device" in res.stderr and "nothing was written" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and old.read_bytes() == b"previous model"


@pytest.mark.parametrize("missing, args", [("onnx", []), ("onnxruntime", ["--check"])])
def test_a_missing_extra_names_the_pip_install(tmp_path, monkeypatch, missing, args):
    monkeypatch.setitem(sys.modules, missing, None)
    res = CliRunner().invoke(cli, ["export", "onnx", "-m", "tiny-glm45", "-o", str(tmp_path / "m.onnx"), *args])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [f"hal: error: hal export onnx{' --check' if args else ''} needs {missing}, "
                                       "not installed: pip install 'hal[conformance]'"]
    assert list(tmp_path.iterdir()) == []


def test_external_data_model_loads_and_equals_the_inline_one(glm45, tmp_path):
    """Over the size limit the initializers go to NAME.data; onnxruntime reads it back."""
    from hal.export.save import save_model
    path, _ = glm45
    m = onnx.load(str(path))
    saved = save_model(m, tmp_path / "ext.onnx", external_over=0)
    assert saved["external_data"] == str(tmp_path / "ext.onnx.data") and saved["bytes"] < 1_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    feeds = {"input_ids": np.array([[1, 2, 3]]), "position_ids": np.array([[0, 1, 2]]),
             "attention_mask": np.ones((1, 3), np.int64)}
    sess = _session(str(path))
    for v in sess.get_inputs():
        if v.name.startswith("past_key_values."):
            feeds[v.name] = np.zeros((1, v.shape[1], 0, v.shape[3]), dtype=np.float32)
    a = sess.run(["logits"], feeds)[0]
    b = _session(str(tmp_path / "ext.onnx")).run(["logits"], feeds)[0]
    assert np.array_equal(a, b)


def test_a_part_without_an_onnx_form_is_refused_by_name(hal_glm45):
    """A MoE scored by softmax (Qwen3.5's router) has no export here: refused, naming the layer."""
    import copy

    from hal.export.onnx import ExportError, build_graph
    model = copy.copy(hal_glm45)
    model.layers = list(model.layers)
    model.layers[2] = copy.copy(model.layers[2])
    model.layers[2].mlp = copy.copy(model.layers[2].mlp)
    model.layers[2].mlp.scoring = "softmax"
    with pytest.raises(ExportError, match="layer 2: MoE with softmax scoring"):
        build_graph(model)
    build_graph(hal_glm45)                                  # the untouched model still exports


def test_a_model_loaded_expert_parallel_is_refused():
    """A rank's part of a model is not the model: exporting it is refused (ep_group "local" is a
    group of one process, which still marks the layers as expert-parallel)."""
    import hal.models as M
    from hal.export.onnx import ExportError, build_graph
    with pytest.raises(ExportError, match="tensor or expert parallelism"):
        build_graph(M.load("tiny-glm45", "cpu", ep_group="local"))
