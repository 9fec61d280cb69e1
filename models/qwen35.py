"""Qwen3.5 MoE (``qwen3_5_moe`` / ``qwen3_5_moe_text``): Gated DeltaNet layers interleaved with
gated full attention, a softmax-routed MoE with a sigmoid-gated shared expert in every layer.

Contract ops: ``causal_conv1d`` (the short convolution, SiLU), ``gated_delta_rule`` (the
recurrence, q/k l2-normalized inside), ``moe_forward`` (softmax top-k, renormalized). The
projections, norms, partial RoPE and the full attention are plain torch. Semantics read from
transformers 5.24's ``modeling_qwen3_5_moe.py``."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from hal.models.layers import DecoderLayer, Linear, MoE, Step, gqa_attend, rms_norm_zc, rope_half

FULL, LINEAR = "full_attention", "linear_attention"
KEY_HEADS = "linear-attention key heads (linear_num_key_heads)"
VALUE_HEADS = "linear-attention value heads (linear_num_value_heads)"
SHARED_ROWS = "shared-expert intermediate rows (shared_expert_intermediate_size)"


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3.5's output norm of a Gated DeltaNet: RMSNorm over the last dim (fp32, cast back, times
    ``weight``: not zero-centered), then times SiLU(gate) in fp32, cast to x's dtype."""
    h = x.float()
    h = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (h * F.silu(gate.float())).to(x.dtype)


@dataclasses.dataclass
class GatedDeltaNet:
    """Gated DeltaNet token mixer. Per token: qkv = in_proj_qkv(x) through the causal depthwise conv
    (SiLU), split into q, k [Hk, Dk] and v [Hv, Dv]; beta = sigmoid(in_proj_b(x)); log-decay
    g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias); the gated delta rule with q, k
    l2-normalized and scale Dk^-0.5; the gated RMSNorm with z = in_proj_z(x); out_proj.
    The cache keeps per sequence the conv window [B, K-1, conv_dim] and the recurrent state
    [B, Hv, Dk, Dv] fp32 (zeros before the first call).

    Tensor parallelism: ``n_k`` / ``n_v`` are this rank's key / value heads (T divides both, so its
    value heads read only its own key heads); ``in_qkv`` and ``conv_weight`` hold the q, k and v
    channels of those heads (conv_dim = 2 n_k Dk + n_v Dv), ``in_z`` / ``in_b`` / ``in_a`` /
    ``dt_bias`` / ``a_log`` their rows, ``out`` is row-parallel; the caches hold only these heads."""

    in_qkv: Linear                         # (a FusedColumns for a TP slice of an FP8 checkpoint)
    in_z: Linear
    in_b: Linear
    in_a: Linear
    conv_weight: torch.Tensor              # [conv_dim, K]
    dt_bias: torch.Tensor                  # [Hv]
    a_log: torch.Tensor                    # [Hv] fp32
    norm_weight: torch.Tensor              # [Dv]
    out: Linear
    n_k: int
    n_v: int
    d_k: int
    d_v: int
    eps: float

    def __call__(self, x, step: Step, layer: int, prev_indices, rt):
        B, S, _ = x.shape
        n_new = step.lengths - step.start
        conv_key, state_key = (layer, "conv"), (layer, "recurrent")
        mixed, window = rt.causal_conv1d(self.in_qkv(x, rt), self.conv_weight, conv_state=step.cache.state(conv_key),
                                         seq_lens=n_new, activation="silu")
        kd = self.n_k * self.d_k
        q = mixed[..., :kd].reshape(B, S, self.n_k, self.d_k)
        k = mixed[..., kd:2 * kd].reshape(B, S, self.n_k, self.d_k)
        v = mixed[..., 2 * kd:].reshape(B, S, self.n_v, self.d_v)
        beta = torch.sigmoid(self.in_b(x, rt))
        g = -self.a_log.float().exp() * F.softplus(self.in_a(x, rt).float() + self.dt_bias.float())
        out, state = rt.gated_delta_rule(q, k, v, g, beta, scale=self.d_k ** -0.5,
                                         initial_state=step.cache.state(state_key), seq_lens=n_new, qk_l2norm=True)
        step.cache.set_state(conv_key, window)
        step.cache.set_state(state_key, state)
        z = self.in_z(x, rt).view(B, S, self.n_v, self.d_v)
        return self.out(gated_rms_norm(out, z, self.norm_weight, self.eps).reshape(B, S, -1), rt), None


@dataclasses.dataclass
class GatedAttention:
    """Qwen3.5's full attention: GQA whose q_proj also yields a per-channel output gate
    ([Hq, 2D] per token: query then gate), zero-centered RMSNorm on q and k per head, RoPE on the
    first ``rotary_dim`` channels (rotate_half), attention output times sigmoid(gate), o_proj.
    Tensor parallelism as GLM-4.5's GQA: ``n_heads`` / ``n_kv`` this rank's heads, ``o`` row-parallel."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    n_heads: int
    n_kv: int
    head_dim: int
    rotary_dim: int
    eps: float

    def __call__(self, x, step: Step, layer: int, prev_indices, rt):
        B, S, _ = x.shape
        D, rd = self.head_dim, self.rotary_dim
        qg = self.q(x, rt).view(B, S, self.n_heads, 2 * D)
        q, gate = rms_norm_zc(qg[..., :D], self.q_norm, self.eps), qg[..., D:].reshape(B, S, -1)
        k = rms_norm_zc(self.k(x, rt).view(B, S, self.n_kv, D), self.k_norm, self.eps)
        v = self.v(x, rt).view(B, S, self.n_kv, D)
        cos, sin = step.cos[:, :, None], step.sin[:, :, None]
        q = torch.cat([rope_half(q[..., :rd], cos, sin), q[..., rd:]], -1)
        k = torch.cat([rope_half(k[..., :rd], cos, sin), k[..., rd:]], -1)
        out = gqa_attend(q, k, v, step, layer).reshape(B, S, -1)
        return self.o(out * torch.sigmoid(gate), rt), None


def text_prefix(src) -> str:
    """Where the text model's tensors live: ``model.language_model`` in the released
    (vision-language) layout, ``model`` in the text-only one (Qwen3_5MoeForCausalLM)."""
    return "model.language_model" if src.has("model.language_model.embed_tokens.weight") else "model"


def expected_unused(name: str, prefix: str, num_layers: int) -> bool:
    """Checkpoint tensors a text model leaves without a warning: the vision tower (``model.visual``),
    the multi-token-prediction module (``mtp.*``) and layers past ``num_hidden_layers``."""
    if name.startswith(("model.visual.", "mtp.")):
        return True
    parts = name[len(prefix) + 1:].split(".") if name.startswith(prefix + ".") else []
    return len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) >= num_layers


def linear_heads(c) -> list:
    """(count, description) of every head count tensor parallelism splits in a Gated DeltaNet layer:
    the key heads Hk and the value heads Hv (each rank keeps Hk / T and Hv / T)."""
    return [(c.linear_num_key_heads, KEY_HEADS), (c.linear_num_value_heads, VALUE_HEADS)]


def _gated_deltanet(b, p: str) -> GatedDeltaNet:
    """The Gated DeltaNet under ``p`` (``...linear_attn``); under TP this rank's key heads [k0, k1)
    and value heads [v0, v1): of the fused ``in_proj_qkv`` / ``conv1d`` ([2 Hk Dk + Hv Dv, ...]: q,
    k, v channels in that order) the three row ranges of those heads, concatenated; ``in_proj_z``
    (Hv Dv rows), ``in_proj_b`` / ``in_proj_a`` / ``dt_bias`` / ``A_log`` (Hv rows) by value heads;
    ``out_proj`` row-parallel; the norm (shared by every head) whole."""
    c, H, sh = b.cfg, b.cfg.hidden_size, b.sh
    nk, nv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    conv_dim, K = 2 * nk * dk + nv * dv, c.linear_conv_kernel_dim
    qkv = [sh.rows(nk, dk, KEY_HEADS), sh.rows(nk, dk, KEY_HEADS, nk * dk),
           sh.rows(nv, dv, VALUE_HEADS, 2 * nk * dk)]                  # this rank's q, k, v channels
    z, heads = sh.rows(nv, dv, VALUE_HEADS), sh.rows(nv, 1, VALUE_HEADS)
    return GatedDeltaNet(b.linear(f"{p}.in_proj_qkv", conv_dim, H, col=qkv),
                         b.linear(f"{p}.in_proj_z", nv * dv, H, col=z),
                         b.linear(f"{p}.in_proj_b", nv, H, quantizable=False, col=heads),
                         b.linear(f"{p}.in_proj_a", nv, H, quantizable=False, col=heads),
                         b.t_rows(f"{p}.conv1d.weight", (conv_dim, 1, K), qkv).reshape(-1, K),
                         b.t_rows(f"{p}.dt_bias", (nv,), [heads]),
                         b.t_rows(f"{p}.A_log", (nv,), [heads], torch.float32),
                         b.t(f"{p}.norm.weight", (dv,)), b.linear(f"{p}.out_proj", H, nv * dv, row=z),
                         nk // sh.tp.size, nv // sh.tp.size, dk, dv, c.rms_norm_eps)


def build_layer(b, i: int, prefix: str) -> DecoderLayer:
    """Layer ``i`` from the tensors under ``prefix`` (``<text prefix>.layers.<i>``) through the
    loader's builder ``b`` (its ``linear`` / ``t`` / ``mlp`` / ``experts`` / ``gqa_heads`` helpers);
    under TP this rank's heads and shared-expert rows (see :mod:`hal.models.parallel`)."""
    c, H = b.cfg, b.cfg.hidden_size
    if c.layer_types[i] == LINEAR:
        attn = _gated_deltanet(b, f"{prefix}.linear_attn")
    else:
        p, D = f"{prefix}.self_attn", c.head_dim
        q, k, v, o, n_heads, n_kv = b.gqa_heads(p, q_per_head=2, o_bias=True)     # q_proj: query and gate per head
        attn = GatedAttention(q, k, v, o, b.t(f"{p}.q_norm.weight", (D,)), b.t(f"{p}.k_norm.weight", (D,)),
                              n_heads, n_kv, D, int(D * c.partial_rotary_factor), c.rms_norm_eps)
    m = f"{prefix}.mlp"
    gu, dn, gus, dns = b.experts(f"{m}.experts")
    moe = MoE(b.t(f"{m}.gate.weight", (c.n_routed_experts, H)), None, gu, dn, gus, dns,
              b.mlp(f"{m}.shared_expert", c.shared_expert_intermediate_size, SHARED_ROWS), c.num_experts_per_tok, 1, 1,
              c.norm_topk_prob, c.routed_scaling_factor, scoring="softmax",
              shared_gate=b.t(f"{m}.shared_expert_gate.weight", (1, H)))
    return DecoderLayer(attn, moe, b.t(f"{prefix}.input_layernorm.weight", (H,)),
                        b.t(f"{prefix}.post_attention_layernorm.weight", (H,)), c.rms_norm_eps, norm=rms_norm_zc)


def checkpoint_shapes(c) -> dict:
    """Every tensor name -> shape of a text-only Qwen3.5 MoE checkpoint of ModelConfig ``c`` (what
    Qwen3_5MoeForCausalLM.save_pretrained writes: per-expert weights under ``model.``)."""
    H, E, I = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
    out = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,),
           "lm_head.weight": (c.vocab_size, H)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = out[f"{p}.post_attention_layernorm.weight"] = (H,)
        if c.layer_types[i] == LINEAR:
            a = f"{p}.linear_attn"
            nk, nv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, \
                c.linear_value_head_dim
            conv_dim = 2 * nk * dk + nv * dv
            out.update({f"{a}.in_proj_qkv.weight": (conv_dim, H), f"{a}.in_proj_z.weight": (nv * dv, H),
                        f"{a}.in_proj_b.weight": (nv, H), f"{a}.in_proj_a.weight": (nv, H),
                        f"{a}.conv1d.weight": (conv_dim, 1, c.linear_conv_kernel_dim), f"{a}.dt_bias": (nv,),
                        f"{a}.A_log": (nv,), f"{a}.norm.weight": (dv,), f"{a}.out_proj.weight": (H, nv * dv)})
        else:
            a, D = f"{p}.self_attn", c.head_dim
            Hq, Hkv = c.num_attention_heads, c.num_key_value_heads
            out.update({f"{a}.q_proj.weight": (2 * Hq * D, H), f"{a}.k_proj.weight": (Hkv * D, H),
                        f"{a}.v_proj.weight": (Hkv * D, H), f"{a}.o_proj.weight": (H, Hq * D),
                        f"{a}.q_norm.weight": (D,), f"{a}.k_norm.weight": (D,)})
        m = f"{p}.mlp"
        for e in range(E):
            out.update({f"{m}.experts.{e}.gate_proj.weight": (I, H), f"{m}.experts.{e}.up_proj.weight": (I, H),
                        f"{m}.experts.{e}.down_proj.weight": (H, I)})
        Is = c.shared_expert_intermediate_size
        out.update({f"{m}.gate.weight": (E, H), f"{m}.shared_expert.gate_proj.weight": (Is, H),
                    f"{m}.shared_expert.up_proj.weight": (Is, H), f"{m}.shared_expert.down_proj.weight": (H, Is),
                    f"{m}.shared_expert_gate.weight": (1, H)})
    return out


def initial_value(name: str, shape: tuple, g: torch.Generator) -> Optional[torch.Tensor]:
    """The built-in random weights' values where std-0.02 noise would not be a working Qwen3.5
    layer (None elsewhere): zero-centered norms 0 (scale 1), the gated norm 1, dt_bias 1 and
    A_log = log(uniform(1, 16)) as transformers initializes them, the conv taps std 0.3."""
    if name.endswith("linear_attn.norm.weight") or name.endswith("dt_bias"):
        return torch.ones(shape)
    if name.endswith("norm.weight"):
        return torch.zeros(shape)
    if name.endswith("A_log"):
        return (torch.rand(shape, generator=g) * 15 + 1).log()
    if name.endswith("conv1d.weight"):
        return torch.randn(shape, generator=g) * 0.3
    return None
