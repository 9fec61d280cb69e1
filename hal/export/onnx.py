"""A loaded HAL model (``hal.models.CausalLM``) as one ONNX graph with a KV-cache interface.

Graph interface (B, S, P dynamic: batch, new tokens, cached tokens):

- inputs ``input_ids`` [B, S] int64, ``position_ids`` [B, S] int64 (RoPE positions), for GQA
  models ``attention_mask`` [B, P+S] int64 (1 = real token, 0 = padding; queries see cached
  and new keys up to their own cache slot, causally), and per layer the cache:
  GQA ``past_key_values.<i>.key`` / ``.value`` [B, n_kv, P, head_dim] (keys after qk-norm and
  RoPE); MLA ``past_key_values.<i>.latent`` [B, P, kv_lora], ``.k_rot`` [B, P, rope] and, for
  layers with their own DSA indexer, ``.index_k`` [B, P, index_head_dim].
- outputs ``logits`` [B, S, vocab] float32 and ``present.<i>.<same names>`` [.., P+S, ..]:
  the cache after this call, fed back as ``past_key_values`` for the next step. A prefill
  passes empty (P = 0) caches.

GQA + MoE models (GLM-4.5) are standard ONNX plus ``com.microsoft.MoE`` and run on
onnxruntime's CPUExecutionProvider. MLA + DSA models (GLM-5, DeepSeek-V3.2) and FP8 layers
contain ``hal.*`` custom-domain nodes (:mod:`hal.export.custom`): valid ONNX, not runnable
without a custom-op library. MLA graphs take no attention_mask (no padding: each query's
keys are the cache plus the new tokens up to itself, the contract's default q_offset).
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import torch
from onnx import TensorProto, checker, helper

from hal.export import custom, layers as L
from hal.export.graph import GraphBuilder

DEFAULT_OPSET = 21
OPSETS = (18, 19, 20, 21, 22, 23)       # the standard ops used here are the same in all of these
MS_DOMAIN = "com.microsoft"


EXPORTABLE = ("glm4_moe", "glm_moe_dsa", "deepseek_v32")


class ExportError(ValueError):
    """The model has a part this exporter has no ONNX form for (the message names it)."""


def unsupported(model) -> str | None:
    """None when every part of ``model`` has an ONNX form here, else the first part that has none."""
    from hal.models.layers import MLP, DecoderLayer, GQAAttention, MLAAttention, MoE, rms_norm
    cfg = model.config
    if cfg.model_type not in EXPORTABLE:
        return f"model_type {cfg.model_type!r} is not exportable yet (exportable: {', '.join(EXPORTABLE)})"
    sharding = getattr(model, "sharding", None)
    tp_size = sharding.tp.size if sharding is not None else 1
    if tp_size > 1 or any(getattr(getattr(layer, "mlp", None), "ep_group", None) for layer in model.layers):
        return ("the model was loaded with tensor or expert parallelism (each rank holds a part of it): load it "
                "whole, in one process, to export it")
    for i, layer in enumerate(model.layers):
        if type(layer) is not DecoderLayer or not isinstance(layer.attn, (GQAAttention, MLAAttention)) \
                or layer.norm is not rms_norm:
            return f"layer {i}: {type(layer.attn).__name__} attention has no ONNX form here (GQA and MLA+DSA have)"
        m = layer.mlp
        if not isinstance(m, (MLP, MoE)):
            return f"layer {i}: {type(m).__name__} has no ONNX form here"
        scoring = getattr(m, "scoring", "sigmoid")
        if isinstance(m, MoE) and (scoring != "sigmoid" or getattr(m, "shared_gate", None) is not None):
            return f"layer {i}: MoE with {scoring} scoring or a gated shared expert is not exportable yet"
    return None


@dataclasses.dataclass
class ExportedGraph:
    """The ONNX model and what it is: interface, node census, custom nodes, runnability."""

    model: object                       # onnx.ModelProto
    info: dict


def cache_layout(model) -> list[dict]:
    """Per layer the cache entries: {name: (shape with symbolic B/P, kind)}; GQA: key/value
    [B, n_kv, P, D]; MLA: latent, k_rot (and index_k where the layer has an indexer)."""
    out = []
    for layer in model.layers:
        a = layer.attn
        if model.config.is_mla:
            entry = {"latent": ["batch", "past_sequence", a.kv_lora], "k_rot": ["batch", "past_sequence", a.rope]}
            if a.indexer is not None:
                entry["index_k"] = ["batch", "past_sequence", a.indexer.head_dim]
        else:
            entry = {"key": ["batch", a.n_kv, "past_sequence", a.head_dim],
                     "value": ["batch", a.n_kv, "past_sequence", a.head_dim]}
        out.append(entry)
    return out


def _present_shape(shape: list) -> list:
    return ["total_sequence" if d == "past_sequence" else d for d in shape]


def _gqa_mask(g, past_k0: str) -> str:
    """bool [B, 1, 1, S, P+S]: key j visible to new token s when j <= P + s and the mask says 1."""
    P = g.op("Gather", [g.op("Shape", [past_k0]), g.const(2)], "past_len")
    S = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], "new_len")
    T = g.op("Add", [P, S], "total_len")
    key_idx = g.op("Unsqueeze", [g.op("Range", [g.const(0), T, g.const(1)]), g.const([0])])        # [1, T]
    q_idx = g.op("Unsqueeze", [g.op("Range", [P, T, g.const(1)]), g.const([1])])                 # [S, 1]
    causal = g.op("LessOrEqual", [key_idx, q_idx], "causal")                                     # [S, T]
    real = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), g.const([1])])   # [B, 1, T]
    return g.op("Unsqueeze", [g.op("And", [causal, real]), g.const([1, 2])], "attention_visible")


def build_graph(model, *, opset: int = DEFAULT_OPSET, name: str = "hal_model") -> ExportedGraph:
    """The ONNX graph of ``model`` (a float32 ``CausalLM``; FP8 layers become ``hal.*`` nodes).

    Raises ExportError for a model with a part that has no ONNX form here (:func:`unsupported`),
    ValueError for an opset outside :data:`OPSETS` or a model whose dtype is not float32."""
    why = unsupported(model)
    if why:
        raise ExportError(why)
    if opset not in OPSETS:
        raise ValueError(f"opset: expected one of {', '.join(map(str, OPSETS))}, got {opset}")
    if model.dtype != torch.float32:
        raise ValueError(f"model dtype: expected float32 (the exported graph computes in float32), got {model.dtype}")
    from hal.models.layers import MoE
    from hal.models.rope import inv_freq_and_scaling
    cfg = model.config
    g = GraphBuilder()
    g.add_input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    g.add_input("position_ids", TensorProto.INT64, ["batch", "sequence"])
    if not cfg.is_mla:
        g.add_input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
    layout = cache_layout(model)
    past = []
    for i, entry in enumerate(layout):
        past.append({k: g.add_input(f"past_key_values.{i}.{k}", TensorProto.FLOAT, shape)
                     for k, shape in entry.items()})
    inv_freq, factor = inv_freq_and_scaling(cfg.rope_parameters, model.rope_dim)
    cos3, sin3 = L.rope_tables(g, "position_ids", inv_freq, factor)
    cos4, sin4 = g.op("Unsqueeze", [cos3, g.const([2])]), g.op("Unsqueeze", [sin3, g.const([2])])
    mask5 = None if cfg.is_mla else _gqa_mask(g, past[0]["key"])
    x = g.op("Gather", [g.weight(model.embed.float(), "embed_tokens.weight"), "input_ids"], "embeddings", axis=0)
    presents, indices = [], None
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        h = L.rms_norm(g, x, layer.input_norm, layer.eps, f"{p}.input_layernorm")
        if cfg.is_mla:
            a, pres, indices = L.mla_attention(g, h, layer.attn, past[i], indices, cos3, sin3, f"{p}.self_attn")
        else:
            a, pk, pv = L.gqa_attention(g, h, layer.attn, past[i]["key"], past[i]["value"], cos4, sin4, mask5,
                                        f"{p}.self_attn")
            pres = {"key": pk, "value": pv}
        presents.append(pres)
        x = g.op("Add", [x, a], f"{p}.attn_residual")
        h = L.rms_norm(g, x, layer.post_norm, layer.eps, f"{p}.post_attention_layernorm")
        y = L.moe(g, h, layer.mlp, f"{p}.mlp") if isinstance(layer.mlp, MoE) else L.mlp(g, h, layer.mlp, f"{p}.mlp")
        x = g.op("Add", [x, y], f"{p}.output")
    x = L.rms_norm(g, x, model.norm, cfg.rms_norm_eps, "norm")
    logits = g.op("MatMul", [x, g.weight(model.lm_head.float().T, "lm_head.weight_t")], "lm_head")
    g.add_output(logits, "logits", TensorProto.FLOAT, ["batch", "sequence", cfg.vocab_size])
    for i, (entry, pres) in enumerate(zip(layout, presents)):
        for k, shape in entry.items():
            g.add_output(pres[k], f"present.{i}.{k}", TensorProto.FLOAT, _present_shape(shape))
    census = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in g.nodes)
    imports = [helper.make_opsetid("", opset)]
    if any(d == MS_DOMAIN for d, _ in census):
        imports.append(helper.make_opsetid(MS_DOMAIN, 1))
    hal_ops = sorted({op for d, op in census if d == custom.DOMAIN})
    if hal_ops:
        imports.append(custom.opset_import())
    proto = helper.make_model(g.graph(name), opset_imports=imports, ir_version=10, producer_name="hal")
    proto.doc_string = (f"HAL export of {model.source or cfg.model_type} ({cfg.model_type}); interface: "
                        "docs/export.md")
    checker.check_model(proto, full_check=False)
    info = {
        "model_type": cfg.model_type, "opset": opset, "ir_version": proto.ir_version,
        "inputs": [_value_info(v) for v in proto.graph.input],
        "outputs": [_value_info(v) for v in proto.graph.output],
        "nodes": {f"{d}.{op}" if d != "ai.onnx" else op: n for (d, op), n in sorted(census.items())},
        "custom_nodes": [{"op": f"{custom.DOMAIN}.{op}", "count": census[(custom.DOMAIN, op)],
                          "why": custom.WHY_CUSTOM[op]} for op in hal_ops],
        "moe_nodes": census.get((MS_DOMAIN, "MoE"), 0),
        "runnable_in_onnxruntime": not hal_ops,
        "not_runnable_reason": None if not hal_ops else (
            f"the graph holds {', '.join(f'{custom.DOMAIN}.{op}' for op in hal_ops)} custom-domain nodes; "
            "onnxruntime runs them only with a custom-op library registering the 'hal' domain, which HAL does "
            "not ship"),
    }
    return ExportedGraph(proto, info)


def _value_info(v) -> dict:
    dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return {"name": v.name, "dtype": TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(), "shape": dims}


def empty_cache(info: dict, batch: int) -> dict:
    """Feeds for a prefill: every ``past_key_values.*`` input as a float32 array with P = 0."""
    feeds = {}
    for v in info["inputs"]:
        if v["name"].startswith("past_key_values."):
            shape = [batch if d == "batch" else 0 if d == "past_sequence" else d for d in v["shape"]]
            feeds[v["name"]] = np.zeros(shape, dtype=np.float32)
    return feeds
