"""Kimi Linear (``kimi_linear``): Kimi Delta Attention (KDA) layers interleaved with MLA layers that
apply no RoPE, a sigmoid-routed MoE with a correction bias and shared experts (the first
``first_k_dense_replace`` layers dense).

Contract ops: ``causal_conv1d`` (the short convolution over q, k and v, SiLU), ``gated_delta_rule``
with a per-channel log-decay g [B, T, H, Dk] (KDA; q, k l2-normalized inside, scale Dk^-0.5),
``moe_forward`` (sigmoid routing). Projections, norms and the MLA layers' dense causal attention
are plain torch (like GLM-4.5's GQA: every device type runs it). Semantics read from
transformers 5.24's ``modeling_kimi_linear.py`` / ``configuration_kimi_linear.py``."""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from hal.models.layers import DecoderLayer, Linear, MoE, Step, absorbed_kv_b, masked_attention, rms_norm

FULL, LINEAR = "full_attention", "linear_attention"
KDA_HEADS = "KDA heads (linear_attn_config num_heads)"
LATENT_NORM_EPS = 1e-6                     # KimiLinearRMSNorm's default, which kv_a / q_a layernorms keep


def sigmoid_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """KDA's output norm over the last dim, all in fp32 (weight too), times sigmoid(gate), cast to
    x's dtype: ``weight * x / rms(x) * sigmoid(gate)``. x, gate [..., D]; weight [D]."""
    h = x.float()
    h = weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    return (h * torch.sigmoid(gate.float())).to(x.dtype)


@dataclasses.dataclass
class KimiDeltaAttention:
    """KDA token mixer, H heads of dim D for q, k and v alike. Per token: q, k, v = q_proj(x),
    k_proj(x), v_proj(x) concatenated through the causal depthwise conv (SiLU); the per-channel
    log-decay g = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias) [H, D] (fp32);
    beta = sigmoid(b_proj(x)) [H]; the gated delta rule (q, k l2-normalized, scale D^-0.5); the
    sigmoid-gated RMSNorm per head with gate g_b(g_a(x)); o_proj.
    The cache keeps per sequence the conv window [B, K-1, 3HD] and the recurrent state
    [B, H, D, D] fp32 (zeros before the first call).

    Tensor parallelism: ``n_heads`` (H) are this rank's heads; ``q`` / ``k`` / ``v`` / ``f_b`` /
    ``g_b`` / ``b`` hold their rows, ``conv_weight`` their q, k and v channels, ``dt_bias`` /
    ``a_log`` their entries, ``o`` is row-parallel; ``f_a`` / ``g_a`` (low rank) and the norm are
    whole; the caches hold only these heads."""

    q: Linear
    k: Linear
    v: Linear
    conv_weight: torch.Tensor              # [3HD, K]: q, k, v channels in that order
    f_a: Linear
    f_b: Linear
    dt_bias: torch.Tensor                  # [HD] fp32
    a_log: torch.Tensor                    # [H] fp32
    b: Linear
    g_a: Linear
    g_b: Linear
    o_norm: torch.Tensor                   # [D] fp32
    o: Linear
    n_heads: int
    head_dim: int
    eps: float

    def __call__(self, x, step: Step, layer: int, prev_indices, rt):
        B, S, _ = x.shape
        H, D = self.n_heads, self.head_dim
        n_new = step.lengths - step.start
        conv_key, state_key = (layer, "conv"), (layer, "recurrent")
        qkv = torch.cat([self.q(x, rt), self.k(x, rt), self.v(x, rt)], -1)
        mixed, window = rt.causal_conv1d(qkv, self.conv_weight, conv_state=step.cache.state(conv_key),
                                         seq_lens=n_new, activation="silu")
        q, k, v = (t.reshape(B, S, H, D) for t in mixed.split(H * D, dim=-1))
        g = F.softplus(self.f_b(self.f_a(x, rt), rt).float() + self.dt_bias).view(B, S, H, D)
        g = -self.a_log.exp()[:, None] * g
        beta = torch.sigmoid(self.b(x, rt))
        out, state = rt.gated_delta_rule(q, k, v, g, beta, scale=D ** -0.5, initial_state=step.cache.state(state_key),
                                         seq_lens=n_new, qk_l2norm=True)
        step.cache.set_state(conv_key, window)
        step.cache.set_state(state_key, state)
        gate = self.g_b(self.g_a(x, rt), rt).view(B, S, H, D)
        return self.o(sigmoid_gated_rms_norm(out, gate, self.o_norm, self.eps).reshape(B, S, -1), rt), None


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, scale: float) -> torch.Tensor:
    """Softmax attention of q [B, S, H, Dqk] over the whole cache k [B, T, Hk, Dqk], v [B, T, Hk, Dv]
    (Hk = H, or 1 shared by every head): :func:`hal.models.layers.masked_attention`. Returns [B, S, H, Dv]."""
    k, v = k.expand(-1, -1, q.shape[2], -1), v.expand(-1, -1, q.shape[2], -1)
    return masked_attention(q, k, v, step, scale)


@dataclasses.dataclass
class NoRopeMLA:
    """Kimi Linear's full attention: MLA (DeepSeek-V2's latent KV) with no RoPE and no DSA. The
    query comes from ``q_proj`` (or, with ``q_lora_rank``, q_b(RMSNorm(q_a(x)))), [H, nope + rope];
    the cache holds the RMS-normalized latent [kv_lora] and the shared key part [rope], neither
    rotated; attention is dense and causal with scale (nope + rope)^-0.5. Tensor parallelism as
    GLM-5's MLA: ``n_heads`` this rank's heads of ``q`` / ``q_b`` / ``kv_b``, ``o`` row-parallel;
    ``q_a``, ``kv_a`` and the latent caches whole.
    Expanded form (prefill, what transformers computes): keys [nope from kv_b, shared rope part]
    and values per head from ``kv_b`` over the cached latent. Absorbed form (decode): kv_b's key
    rows folded into the query and its value rows into the output, attention as MQA over the
    cached latent (Dqk = kv_lora + rope, Dv = kv_lora), so a step never re-expands the cache."""

    q: Optional[Linear]
    q_a: Optional[Linear]
    q_a_norm: Optional[torch.Tensor]
    q_b: Optional[Linear]
    kv_a: Linear
    kv_a_norm: torch.Tensor
    kv_b: Linear
    o: Linear
    n_heads: int
    nope: int
    rope: int
    v_dim: int
    kv_lora: int
    w_uk: torch.Tensor = None              # [H, nope, kv_lora]: kv_b's key rows (dequantized when FP8)
    w_uv: torch.Tensor = None              # [H, v_dim, kv_lora]: kv_b's value rows

    def __post_init__(self):
        self.w_uk, self.w_uv = absorbed_kv_b(self.kv_b, self.n_heads, self.nope, self.v_dim, self.kv_a_norm.dtype)

    def __call__(self, x, step: Step, layer: int, prev_indices, rt):
        B, S, _ = x.shape
        H, scale = self.n_heads, (self.nope + self.rope) ** -0.5
        if self.q is not None:
            q = self.q(x, rt)
        else:
            q = self.q_b(rms_norm(self.q_a(x, rt), self.q_a_norm, LATENT_NORM_EPS), rt)
        q = q.view(B, S, H, self.nope + self.rope)
        ckv = self.kv_a(x, rt)
        latent = rms_norm(ckv[..., :self.kv_lora], self.kv_a_norm, LATENT_NORM_EPS)
        latent_all = step.cache.write((layer, "latent"), latent, step.start)                # [B, T, kv_lora]
        k_pe_all = step.cache.write((layer, "k_pe"), ckv[..., self.kv_lora:], step.start)    # [B, T, rope]
        if step.absorb:
            q_lat = torch.einsum("bshn,hnc->bshc", q[..., :self.nope], self.w_uk)
            k = torch.cat([latent_all, k_pe_all], -1)[:, :, None]
            out = causal_attend(torch.cat([q_lat, q[..., self.nope:]], -1), k, latent_all[:, :, None], step, scale)
            out = torch.einsum("bshc,hvc->bshv", out, self.w_uv)
        else:
            T = latent_all.shape[1]
            kv = self.kv_b(latent_all, rt).view(B, T, H, self.nope + self.v_dim)
            k = torch.cat([kv[..., :self.nope], k_pe_all[:, :, None].expand(B, T, H, self.rope)], -1)
            out = causal_attend(q, k, kv[..., self.nope:], step, scale)
        return self.o(out.reshape(B, S, -1), rt), None


class _ReleasedExpertNames:
    """A tensor source whose per-expert names read as transformers' (``gate_proj`` / ``up_proj`` /
    ``down_proj``) for a checkpoint storing them as Moonshot does (``w1`` / ``w3`` / ``w2``), so the
    loader's expert stacking (FP8 included) runs unchanged; errors name the stored tensors."""

    def __init__(self, src):
        self.src, self.where = src, src.where

    @staticmethod
    def _stored(name: str) -> str:
        return name.replace(".gate_proj.", ".w1.").replace(".up_proj.", ".w3.").replace(".down_proj.", ".w2.")

    def has(self, name: str) -> bool:
        return self.src.has(self._stored(name))

    def get(self, name: str, shape=None, index=None) -> torch.Tensor:
        return self.src.get(self._stored(name), shape, index)

    def skip(self, name: str, shape=None) -> None:
        self.src.skip(self._stored(name), shape)


def _mlp_prefix(src, prefix: str) -> str:
    """``block_sparse_moe`` (the released layout, which save_pretrained writes back for every
    layer) or ``mlp`` (transformers' module names), whichever holds this layer's tensors."""
    p = f"{prefix}.block_sparse_moe"
    return p if any(src.has(f"{p}.{n}.weight") for n in ("gate", "gate_proj")) else f"{prefix}.mlp"


def _moe(b, m: str) -> MoE:
    c, H = b.cfg, b.cfg.hidden_size
    if b.src.has(f"{m}.experts.gate_up_proj"):                      # transformers' fused layout
        gu, dn, gus, dns = b.experts(f"{m}.experts")
    else:                                                          # released: experts.{e}.w1 / w3 / w2
        renamed = copy.copy(b)
        renamed.src = _ReleasedExpertNames(b.src)
        gu, dn, gus, dns = renamed.experts(f"{m}.experts")
    shared = b.mlp(f"{m}.shared_experts", c.moe_intermediate_size * c.n_shared_experts,
                   "shared-expert intermediate rows (moe_intermediate_size x n_shared_experts)") \
        if c.n_shared_experts else None
    return MoE(b.t(f"{m}.gate.weight", (c.n_routed_experts, H), torch.float32),
               b.t(f"{m}.gate.e_score_correction_bias", (c.n_routed_experts,), torch.float32),
               gu, dn, gus, dns, shared, c.num_experts_per_tok, c.n_group, c.topk_group, c.norm_topk_prob,
               c.routed_scaling_factor)


def linear_heads(c) -> list:
    """(count, description) of the head count tensor parallelism splits in a KDA layer (each rank
    keeps H / T heads of q, k and v alike)."""
    return [(c.linear_num_key_heads, KDA_HEADS)]


def _kda(b, a: str) -> KimiDeltaAttention:
    """The KDA layer under ``a`` (``...self_attn``); under TP this rank's heads [h0, h1): rows
    [h0 D, h1 D) of q / k / v / f_b / g_b, ``dt_bias`` and each conv (the fused ``conv1d``
    [3HD, 1, K]: that range in each of its q, k, v thirds), rows [h0, h1) of ``b_proj`` and ``A_log``,
    ``o_proj`` row-parallel; ``f_a`` / ``g_a`` and ``o_norm`` whole."""
    c, Hd, sh = b.cfg, b.cfg.hidden_size, b.sh
    H, D, K = c.linear_num_key_heads, c.linear_key_head_dim, c.linear_conv_kernel_dim
    mine, heads = sh.rows(H, D, KDA_HEADS), sh.rows(H, 1, KDA_HEADS)
    f = f"{a}.forget_gate" if b.src.has(f"{a}.forget_gate.f_a_proj.weight") else a     # transformers' / released
    if b.src.has(f"{a}.conv1d.weight"):
        thirds = [sh.rows(H, D, KDA_HEADS, j * H * D) for j in range(3)]           # q, k, v channels
        conv = b.t_rows(f"{a}.conv1d.weight", (3 * H * D, 1, K), thirds)
    else:
        conv = torch.cat([b.t_rows(f"{a}.{n}_conv1d.weight", (H * D, 1, K), [mine]) for n in "qkv"])
    return KimiDeltaAttention(
        *(b.linear(f"{a}.{n}_proj", H * D, Hd, col=mine) for n in "qkv"), conv.reshape(-1, K),
        b.linear(f"{f}.f_a_proj", D, Hd, quantizable=False),
        b.linear(f"{f}.f_b_proj", H * D, D, quantizable=False, col=mine),
        b.t_rows(f"{f}.dt_bias", (H * D,), [mine], torch.float32),
        b.t_rows(f"{f}.A_log", (1, 1, H, 1), [heads], torch.float32, dim=2).reshape(-1),
        b.linear(f"{a}.b_proj", H, Hd, quantizable=False, col=heads),
        b.linear(f"{a}.g_a_proj", D, Hd, quantizable=False),
        b.linear(f"{a}.g_b_proj", H * D, D, quantizable=False, col=mine),
        b.t(f"{a}.o_norm.weight", (D,), torch.float32), b.linear(f"{a}.o_proj", Hd, H * D, row=mine),
        H // sh.tp.size, D, c.rms_norm_eps)


def _mla(b, a: str) -> NoRopeMLA:
    """The MLA layer under ``a``; its per-head linears through the loader's ``mla_heads`` (this
    rank's heads under TP), the q LoRA and ``kv_a`` whole."""
    c, Hd = b.cfg, b.cfg.hidden_size
    if c.q_lora_rank is None:
        q, kv_b, o, n_heads = b.mla_heads(a, "q_proj", Hd)
        q_a = q_a_norm = q_b = None
    else:
        q_b, kv_b, o, n_heads = b.mla_heads(a, "q_b_proj", c.q_lora_rank)
        q, q_a = None, b.linear(f"{a}.q_a_proj", c.q_lora_rank, Hd, bias=c.attention_bias)
        q_a_norm = b.t(f"{a}.q_a_layernorm.weight", (c.q_lora_rank,))
    return NoRopeMLA(q, q_a, q_a_norm, q_b,
                     b.linear(f"{a}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, Hd, bias=c.attention_bias),
                     b.t(f"{a}.kv_a_layernorm.weight", (c.kv_lora_rank,)), kv_b, o,
                     n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank)


def build_layer(b, i: int, prefix: str) -> DecoderLayer:
    """Layer ``i`` from the tensors under ``prefix`` (``model.layers.<i>``) through the loader's
    builder ``b`` (its ``linear`` / ``t`` / ``mlp`` / ``experts`` helpers). Both layouts load: the
    released one (``self_attn.f_a_proj``, ``q_conv1d`` / ``k_conv1d`` / ``v_conv1d``,
    ``block_sparse_moe.experts.{e}.w1/w2/w3``; what save_pretrained writes) and transformers'
    module names (``self_attn.forget_gate.*``, one ``conv1d``, ``mlp.experts.gate_up_proj``)."""
    c, H = b.cfg, b.cfg.hidden_size
    a = f"{prefix}.self_attn"
    attn = _kda(b, a) if c.layer_types[i] == LINEAR else _mla(b, a)
    m = _mlp_prefix(b.src, prefix)
    mlp = _moe(b, m) if c.mlp_layer_types[i] == "sparse" else b.mlp(m, c.intermediate_size)
    return DecoderLayer(attn, mlp, b.t(f"{prefix}.input_layernorm.weight", (H,)),
                        b.t(f"{prefix}.post_attention_layernorm.weight", (H,)), c.rms_norm_eps)


def checkpoint_shapes(c) -> dict:
    """Every tensor name -> shape of a Kimi Linear checkpoint of ModelConfig ``c`` in the released
    layout (what KimiLinearForCausalLM.save_pretrained writes)."""
    Hd, E, I = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
    H, D, K = c.linear_num_key_heads, c.linear_key_head_dim, c.linear_conv_kernel_dim
    Ha, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    out = {"model.embed_tokens.weight": (c.vocab_size, Hd), "model.norm.weight": (Hd,),
           "lm_head.weight": (c.vocab_size, Hd)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = out[f"{p}.post_attention_layernorm.weight"] = (Hd,)
        a = f"{p}.self_attn"
        if c.layer_types[i] == LINEAR:
            out.update({f"{a}.{n}_proj.weight": (H * D, Hd) for n in "qkv"})
            out.update({f"{a}.{n}_conv1d.weight": (H * D, 1, K) for n in "qkv"})
            out.update({f"{a}.f_a_proj.weight": (D, Hd), f"{a}.f_b_proj.weight": (H * D, D), f"{a}.dt_bias": (H * D,),
                        f"{a}.A_log": (1, 1, H, 1), f"{a}.b_proj.weight": (H, Hd), f"{a}.g_a_proj.weight": (D, Hd),
                        f"{a}.g_b_proj.weight": (H * D, D), f"{a}.o_norm.weight": (D,),
                        f"{a}.o_proj.weight": (Hd, H * D)})
        else:
            if c.q_lora_rank is None:
                out[f"{a}.q_proj.weight"] = (Ha * qk, Hd)
            else:
                out.update({f"{a}.q_a_proj.weight": (c.q_lora_rank, Hd), f"{a}.q_a_layernorm.weight": (c.q_lora_rank,),
                            f"{a}.q_b_proj.weight": (Ha * qk, c.q_lora_rank)})
            out.update({f"{a}.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, Hd),
                        f"{a}.kv_a_layernorm.weight": (c.kv_lora_rank,),
                        f"{a}.kv_b_proj.weight": (Ha * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
                        f"{a}.o_proj.weight": (Hd, Ha * c.v_head_dim)})
        m = f"{p}.block_sparse_moe"
        if c.mlp_layer_types[i] == "sparse":
            for e in range(E):
                out.update({f"{m}.experts.{e}.w1.weight": (I, Hd), f"{m}.experts.{e}.w3.weight": (I, Hd),
                            f"{m}.experts.{e}.w2.weight": (Hd, I)})
            out.update({f"{m}.gate.weight": (E, Hd), f"{m}.gate.e_score_correction_bias": (E,)})
            if c.n_shared_experts:
                Is = I * c.n_shared_experts
                out.update({f"{m}.shared_experts.gate_proj.weight": (Is, Hd),
                            f"{m}.shared_experts.up_proj.weight": (Is, Hd),
                            f"{m}.shared_experts.down_proj.weight": (Hd, Is)})
        else:
            out.update({f"{m}.gate_proj.weight": (c.intermediate_size, Hd), f"{m}.up_proj.weight": (c.intermediate_size, Hd),
                        f"{m}.down_proj.weight": (Hd, c.intermediate_size)})
    return out


def initial_value(name: str, shape: tuple, g: torch.Generator) -> Optional[torch.Tensor]:
    """The built-in random weights' values where std-0.02 noise would not be a working KDA layer
    (None elsewhere), as transformers initializes them: A_log = log(uniform(1, 16)), dt_bias the
    inverse softplus of uniform(1e-3, 1e-1) in log space; the conv taps std 0.3."""
    if name.endswith("A_log"):
        return (torch.rand(shape, generator=g) * 15 + 1).log()
    if name.endswith("dt_bias"):
        dt = (torch.rand(shape, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
              + torch.log(torch.tensor(1e-3))).exp()
        return dt + torch.log(-torch.expm1(-dt))
    if name.endswith("conv1d.weight"):
        return torch.randn(shape, generator=g) * 0.3
    return None
