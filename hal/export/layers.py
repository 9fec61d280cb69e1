"""The model's building blocks as ONNX subgraphs, one emitter per block, each the ONNX form of
its ``hal.models.layers`` counterpart (same math, same order of operations where it matters).

Every emitter takes a :class:`~hal.export.graph.GraphBuilder` and value names and returns value
names. Activations are float32 [B, S, ...]; B, S and the cached length P are dynamic. Standard
ONNX ops wherever they express the block; ``com.microsoft.MoE`` for float routed experts;
``hal.*`` custom nodes (:mod:`hal.export.custom`) for DSA and FP8.
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper

from hal.export.custom import hal_node

FLOAT_MIN = float(np.finfo(np.float32).min)   # the masked score: exp(min - max) == 0, no NaN on a fully masked row
ROUTE_OFF = -1e9                              # com.microsoft.MoE router input of an expert not chosen


def slice_last(g, x: str, start: int, end: int, step: int = 1) -> str:
    """x[..., start:end:step]."""
    return g.op("Slice", [x, g.const([start]), g.const([end]), g.const([-1]), g.const([step])], "slice")


def rms_norm(g, x: str, weight: torch.Tensor, eps: float, hint: str) -> str:
    """weight * x / sqrt(mean(x^2, -1) + eps) over the last axis (fp32)."""
    w = g.weight(weight.float(), f"{hint}.weight")
    ms = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)])])])
    return g.op("Mul", [w, g.op("Mul", [x, inv])], hint)


def linear(g, x: str, lin, hint: str) -> str:
    """y = x @ W.T (+ b). FP8 weights (``lin.scale`` set) become a ``hal.fp8_linear`` node with
    the float8_e4m3fn weight and its block scales as initializers."""
    if lin.scale is not None:
        bias = None if lin.bias is None else g.weight(lin.bias.float(), f"{hint}.bias")
        return hal_node(g, "fp8_linear", [x, g.weight(lin.weight, f"{hint}.weight"),
                                          g.weight(lin.scale.float(), f"{hint}.weight_scale"), bias])
    y = g.op("MatMul", [x, g.weight(lin.weight.float().T, f"{hint}.weight_t")], hint)
    if lin.bias is not None:
        y = g.op("Add", [y, g.weight(lin.bias.float(), f"{hint}.bias")], hint)
    return y


def silu(g, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])], "silu")


def mlp(g, x: str, m, hint: str) -> str:
    """down(silu(gate(x)) * up(x))."""
    h = g.op("Mul", [silu(g, linear(g, x, m.gate, f"{hint}.gate_proj")), linear(g, x, m.up, f"{hint}.up_proj")])
    return linear(g, h, m.down, f"{hint}.down_proj")


def rope_tables(g, position_ids: str, inv_freq: torch.Tensor, factor: float) -> tuple[str, str]:
    """cos, sin [B, S, rope_dim] (the ``cat(freqs, freqs)`` layout, times the attention factor)
    for int64 positions [B, S]."""
    pos = g.op("Unsqueeze", [g.op("Cast", [position_ids], to=TensorProto.FLOAT), g.const([-1])])
    freqs = g.op("Mul", [pos, g.weight(inv_freq.float(), "rope.inv_freq")], "rope_freqs")
    emb = g.op("Concat", [freqs, freqs], axis=-1)
    cos, sin = g.op("Cos", [emb], "rope_cos"), g.op("Sin", [emb], "rope_sin")
    if factor != 1.0:
        f = g.const(factor, np.float32)
        cos, sin = g.op("Mul", [cos, f], "rope_cos"), g.op("Mul", [sin, f], "rope_sin")
    return cos, sin


def rope_half(g, x: str, cos: str, sin: str, dim: int) -> str:
    """Rotate the two halves of x [..., dim] (Llama style): x*cos + cat(-x2, x1)*sin."""
    x1, x2 = slice_last(g, x, 0, dim // 2), slice_last(g, x, dim // 2, dim)
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])], "rope")


def rope_interleaved(g, x: str, cos: str, sin: str, dim: int) -> str:
    """Rotate interleaved pairs of x [..., dim]; output in the half-split layout (DeepSeek MLA)."""
    c, s = slice_last(g, cos, 0, dim // 2), slice_last(g, sin, 0, dim // 2)
    x1, x2 = slice_last(g, x, 0, dim, 2), slice_last(g, x, 1, dim, 2)
    a = g.op("Sub", [g.op("Mul", [x1, c]), g.op("Mul", [x2, s])])
    b = g.op("Add", [g.op("Mul", [x2, c]), g.op("Mul", [x1, s])])
    return g.op("Concat", [a, b], "rope", axis=-1)


def partial_rope(g, x: str, cos: str, sin: str, rotary: int, head_dim: int, interleaved: bool = False) -> str:
    """Rotate the first ``rotary`` channels of x [..., head_dim], keep the rest."""
    fn = rope_interleaved if interleaved else rope_half
    if rotary == head_dim:
        return fn(g, x, cos, sin, rotary)
    return g.op("Concat", [fn(g, slice_last(g, x, 0, rotary), cos, sin, rotary),
                           slice_last(g, x, rotary, head_dim)], axis=-1)


def gqa_attention(g, x: str, a, past_k: str, past_v: str, cos4: str, sin4: str, mask5: str, hint: str):
    """GLM-4.5 attention. x [B, S, H]; past_k/past_v [B, n_kv, P, D]; cos4/sin4 [B, S, 1, rotary];
    mask5 bool [B, 1, 1, S, P+S] (True = visible). Query heads are grouped per KV head
    ([B, n_kv, group, S, D]) so the cache is never repeated. Returns (out [B, S, H], present_k,
    present_v [B, n_kv, P+S, D])."""
    nh, nkv, D = a.n_heads, a.n_kv, a.head_dim
    q = g.op("Reshape", [linear(g, x, a.q, f"{hint}.q_proj"), g.const([0, 0, nh, D])])
    k = g.op("Reshape", [linear(g, x, a.k, f"{hint}.k_proj"), g.const([0, 0, nkv, D])])
    v = g.op("Reshape", [linear(g, x, a.v, f"{hint}.v_proj"), g.const([0, 0, nkv, D])])
    if a.q_norm is not None:
        q, k = rms_norm(g, q, a.q_norm, a.eps, f"{hint}.q_norm"), rms_norm(g, k, a.k_norm, a.eps, f"{hint}.k_norm")
    q = partial_rope(g, q, cos4, sin4, a.rotary_dim, D)
    k = partial_rope(g, k, cos4, sin4, a.rotary_dim, D)
    q5 = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, nkv, nh // nkv, D])])], perm=[0, 2, 3, 1, 4])
    present_k = g.op("Concat", [past_k, g.op("Transpose", [k], perm=[0, 2, 1, 3])], f"{hint}.present_k", axis=2)
    present_v = g.op("Concat", [past_v, g.op("Transpose", [v], perm=[0, 2, 1, 3])], f"{hint}.present_v", axis=2)
    kt = g.op("Transpose", [g.op("Unsqueeze", [present_k, g.const([2])])], perm=[0, 1, 2, 4, 3])
    scores = g.op("Mul", [g.op("MatMul", [q5, kt]), g.const(D ** -0.5, np.float32)], f"{hint}.scores")
    scores = g.op("Where", [mask5, scores, g.const(FLOAT_MIN, np.float32)])
    probs = g.op("Softmax", [scores], f"{hint}.probs", axis=-1)
    out = g.op("MatMul", [probs, g.op("Unsqueeze", [present_v, g.const([2])])])
    out = g.op("Reshape", [g.op("Transpose", [out], perm=[0, 3, 1, 2, 4]), g.const([0, 0, nh * D])])
    return linear(g, out, a.o, f"{hint}.o_proj"), present_k, present_v


def filled(g, like: str, value: float) -> str:
    """A float32 tensor of ``like``'s shape filled with ``value``."""
    return g.op("ConstantOfShape", [g.op("Shape", [like])],
                value=helper.make_tensor("value", TensorProto.FLOAT, [1], [value]))


def _group_mask(g, sel: str, n_group: int, topk_group: int, with_bias: bool, E: int) -> str:
    """sel [N, E] with the experts outside the ``topk_group`` best groups set to -inf (group score:
    the sum of its top-2 selection scores with a correction bias, its maximum without)."""
    per = E // n_group
    cg = g.op("Reshape", [sel, g.const([-1, n_group, per])])
    if with_bias:
        top2, _ = g.op("TopK", [cg, g.const([min(2, per)])], outputs=2, axis=-1, largest=1, sorted=1)
        gscore = g.op("ReduceSum", [top2, g.const([-1])], keepdims=0)
    else:
        gscore = g.op("ReduceMax", [cg, g.const([-1])], keepdims=0)
    _, gidx = g.op("TopK", [gscore, g.const([topk_group])], outputs=2, axis=-1, largest=1, sorted=1)
    zeros, ones = filled(g, gscore, 0.0), filled(g, gidx, 1.0)
    gmask = g.op("ScatterElements", [zeros, gidx, ones], axis=1)                              # [N, n_group]
    emask = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [gmask, g.const([-1])]), g.const([1, 1, per])]),
                             g.const([-1, E])])
    keep = g.op("Cast", [emask], to=TensorProto.BOOL)
    return g.op("Where", [keep, sel, g.const(float("-inf"), np.float32)], "group_masked")


def moe(g, x: str, m, hint: str) -> str:
    """Routed experts + shared experts for x [B, S, H].

    Routing is plain ONNX, as ``moe_route`` defines it: s = sigmoid(x @ Wg.T), selection by
    s + correction_bias (group-limited when n_group > 1), top-k, weights s at the chosen experts.
    The experts are ``com.microsoft.MoE`` (interleaved SwiGLU, ``swiglu_fusion=1``,
    alpha 1, beta 0: silu(gate) * up), fed log(weight) at the chosen experts and -1e9 elsewhere
    with ``normalize_routing_weights=0``: its softmax then gives exactly weight / sum(weights)
    over the chosen experts, and its top-k picks them. The output is scaled back:
    by ``scaling_factor`` (renormalized routing) or by ``sum(weights) * scaling_factor``.
    FP8 experts become one ``hal.moe_forward`` node instead."""
    E, k = m.gate_weight.shape[0], m.top_k
    flat = g.op("Reshape", [x, g.const([-1, m.gate_weight.shape[1]])], f"{hint}.tokens")
    logits = g.op("MatMul", [flat, g.weight(m.gate_weight.float().T, f"{hint}.gate.weight_t")], f"{hint}.router_logits")
    if m.w_gate_up_scale is not None:
        y = hal_node(g, "moe_forward", [flat, logits, g.weight(m.w_gate_up, f"{hint}.experts.w_gate_up"),
                                        g.weight(m.w_down, f"{hint}.experts.w_down"),
                                        None if m.correction_bias is None else
                                        g.weight(m.correction_bias.float(), f"{hint}.gate.e_score_correction_bias"),
                                        g.weight(m.w_gate_up_scale.float(), f"{hint}.experts.w_gate_up_scale"),
                                        g.weight(m.w_down_scale.float(), f"{hint}.experts.w_down_scale")],
                     top_k=k, scoring="sigmoid", n_group=m.n_group, topk_group=m.topk_group,
                     renormalize=m.renormalize, scaling_factor=float(m.scaling_factor), activation="silu")
    else:
        s = g.op("Sigmoid", [logits], f"{hint}.scores")
        sel = s
        if m.correction_bias is not None:
            sel = g.op("Add", [s, g.weight(m.correction_bias.float(), f"{hint}.gate.e_score_correction_bias")])
        if m.n_group > 1:
            sel = _group_mask(g, sel, m.n_group, m.topk_group, m.correction_bias is not None, E)
        _, ids = g.op("TopK", [sel, g.const([k])], outputs=2, axis=-1, largest=1, sorted=1)
        w = g.op("GatherElements", [s, ids], f"{hint}.route_weights", axis=1)
        router = g.op("ScatterElements", [filled(g, s, ROUTE_OFF), ids, g.op("Log", [w])], f"{hint}.router_probs",
                      axis=1)
        I = m.w_down.shape[2]
        gate, up = m.w_gate_up[:, :I].float(), m.w_gate_up[:, I:].float()
        fc1 = torch.stack([gate, up], dim=2).reshape(E, 2 * I, -1)          # rows g0, u0, g1, u1, ...
        y = g.op("MoE", [flat, router, g.weight(fc1, f"{hint}.experts.fc1_interleaved"), "",
                         g.weight(m.w_down.float(), f"{hint}.experts.fc2")], f"{hint}.experts", domain="com.microsoft",
                 k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=0, use_sparse_mixer=0)
        if not m.renormalize or m.scaling_factor != 1.0:
            scale = g.const(float(m.scaling_factor), np.float32)
            if not m.renormalize:
                scale = g.op("Mul", [g.op("ReduceSum", [w, g.const([-1])], keepdims=1), scale])
            y = g.op("Mul", [y, scale], f"{hint}.routed")
    y = g.op("Reshape", [y, g.op("Shape", [x])])
    if m.shared is not None:
        y = g.op("Add", [y, mlp(g, x, m.shared, f"{hint}.shared_experts")], hint)
    return y


def indexer(g, x: str, q_resid: str, ix, past_index_k: str, cos3: str, sin3: str, hint: str):
    """DSA's lightning indexer: top-k key indices [B, S, top_k] int32 (``hal.lightning_indexer``)
    over the cached indexer keys, and the cache's new value [B, P+S, Di]."""
    q = g.op("Reshape", [linear(g, q_resid, ix.wq_b, f"{hint}.wq_b"), g.const([0, 0, ix.n_heads, ix.head_dim])])
    k = g.op("LayerNormalization", [linear(g, x, ix.wk, f"{hint}.wk"),
                                    g.weight(ix.k_norm_weight.float(), f"{hint}.k_norm.weight"),
                                    g.weight(ix.k_norm_bias.float(), f"{hint}.k_norm.bias")], axis=-1, epsilon=1e-6)
    cos4, sin4 = g.op("Unsqueeze", [cos3, g.const([2])]), g.op("Unsqueeze", [sin3, g.const([2])])
    q = partial_rope(g, q, cos4, sin4, ix.rope_dim, ix.head_dim, ix.interleaved)
    k = partial_rope(g, k, cos3, sin3, ix.rope_dim, ix.head_dim, ix.interleaved)
    k_all = g.op("Concat", [past_index_k, k], f"{hint}.present_index_k", axis=1)
    w = g.op("Mul", [g.op("MatMul", [x, g.weight(ix.weights_proj.float().T, f"{hint}.weights_proj.weight_t")]),
                     g.const(ix.n_heads ** -0.5 * ix.head_dim ** -0.5, np.float32)], f"{hint}.weights")
    return hal_node(g, "lightning_indexer", [q, k_all, w], top_k=ix.top_k, causal=True), k_all


def mla_attention(g, x: str, a, past: dict, prev_indices, cos3: str, sin3: str, hint: str):
    """MLA + DSA in the expanded form (per-head keys from ``kv_b`` over the cached latent), as
    ``MLAAttention`` computes prefill. past: {"latent": [B, P, kv_lora], "k_rot": [B, P, rope],
    "index_k": [B, P, Di] (layers with their own indexer)}. Returns (out [B, S, H], presents
    {same keys: [B, P+S, ...]}, indices)."""
    nh, nope, rope, vd, r = a.n_heads, a.nope, a.rope, a.v_dim, a.kv_lora
    cos4, sin4 = g.op("Unsqueeze", [cos3, g.const([2])]), g.op("Unsqueeze", [sin3, g.const([2])])
    q_resid = rms_norm(g, linear(g, x, a.q_a, f"{hint}.q_a_proj"), a.q_a_norm, a.eps, f"{hint}.q_a_layernorm")
    q = g.op("Reshape", [linear(g, q_resid, a.q_b, f"{hint}.q_b_proj"), g.const([0, 0, nh, nope + rope])])
    q_rot = rope_interleaved(g, slice_last(g, q, nope, nope + rope), cos4, sin4, rope)
    q = g.op("Concat", [slice_last(g, q, 0, nope), q_rot], axis=-1)
    ckv = linear(g, x, a.kv_a, f"{hint}.kv_a_proj_with_mqa")
    latent = rms_norm(g, slice_last(g, ckv, 0, r), a.kv_a_norm, a.eps, f"{hint}.kv_a_layernorm")
    k_rot = rope_interleaved(g, slice_last(g, ckv, r, r + rope), cos3, sin3, rope)
    presents = {"latent": g.op("Concat", [past["latent"], latent], f"{hint}.present_latent", axis=1),
                "k_rot": g.op("Concat", [past["k_rot"], k_rot], f"{hint}.present_k_rot", axis=1)}
    indices = prev_indices
    if a.indexer is not None:
        indices, presents["index_k"] = indexer(g, x, q_resid, a.indexer, past["index_k"], cos3, sin3, f"{hint}.indexer")
    kv = g.op("Reshape", [linear(g, presents["latent"], a.kv_b, f"{hint}.kv_b_proj"), g.const([0, 0, nh, nope + vd])])
    k_rot_heads = g.op("Expand", [g.op("Unsqueeze", [presents["k_rot"], g.const([2])]), g.const([1, 1, nh, 1])])
    k = g.op("Concat", [slice_last(g, kv, 0, nope), k_rot_heads], axis=-1)
    out, _lse = hal_node(g, "sparse_attention", [q, k, slice_last(g, kv, nope, nope + vd), indices], outputs=2,
                         scale=float(a.scale), return_lse=True)
    out = g.op("Reshape", [out, g.const([0, 0, nh * vd])])
    return linear(g, out, a.o, f"{hint}.o_proj"), presents, indices
