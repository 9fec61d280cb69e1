"""Built-in tiny models: the real architectures at small sizes with deterministic random weights.

They are NOT trained: their weights are drawn from a fixed seed (normal, std 0.02; norms 1), so
their "text" is meaningless, but every code path of the real model runs: MLA, the DSA indexer with
top_k smaller than the default prompt (so sparsity really happens), shared indexer layers (GLM-5),
group-limited routing (DeepSeek-V3.2), GQA with partial RoPE and qk-norm (GLM-4.5), dense first
layers, shared experts; Gated DeltaNet with its conv and recurrent state, gated attention and
softmax routing with a gated shared expert (Qwen3.5); KDA with its per-channel decay, MLA without RoPE
and a dense first layer (Kimi Linear). They go through the same loader as a checkpoint.
"""
from __future__ import annotations

import hashlib

import torch

_COMMON = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
               num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
               first_k_dense_replace=1, rms_norm_eps=1e-6, max_position_embeddings=1024, eos_token_id=2,
               rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, norm_topk_prob=True)
# MLA keeps the released models' latent (kv_lora_rank 512 + rope 64): the absorbed decode form is the
# 576/512 MQA shape that MLA kernels are built for; head dims follow each family's pattern
# (GLM-5: nope + rope == v; DeepSeek-V3.2: nope + rope != v)
_MLA = dict(num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=512, qk_rope_head_dim=64,
            head_dim=64, index_topk=8, index_head_dim=128, index_n_heads=4)

CONFIGS = {
    "tiny-glm5": {**_COMMON, **_MLA, "model_type": "glm_moe_dsa", "qk_nope_head_dim": 64, "v_head_dim": 128,
                  "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1,
                  "indexer_types": ["full", "shared", "full", "shared"]},
    "tiny-deepseek-v32": {**_COMMON, **_MLA, "model_type": "deepseek_v32", "qk_nope_head_dim": 64, "v_head_dim": 64,
                          "routed_scaling_factor": 2.5, "n_group": 4, "topk_group": 2},
    "tiny-glm45": {**_COMMON, "model_type": "glm4_moe", "num_attention_heads": 8, "num_key_value_heads": 2,
                   "head_dim": 32, "use_qk_norm": True, "attention_bias": True, "routed_scaling_factor": 1.0,
                   "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5}},
    # Qwen3.5 MoE: three Gated DeltaNet layers then one gated full-attention layer (the released
    # 3:1 pattern), 2 key heads serving 4 value heads, partial RoPE 0.25 of head_dim 64
    "tiny-qwen35": {"model_type": "qwen3_5_moe_text", "vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 4,
                    "layer_types": ["linear_attention"] * 3 + ["full_attention"], "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 64, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 64,
                    "linear_value_head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                    "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 128,
                    "shared_expert_intermediate_size": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 1024,
                    "eos_token_id": 2, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default",
                                                           "partial_rotary_factor": 0.25}},
    # Kimi Linear: KDA, KDA, MLA (no RoPE, no q LoRA), KDA (1-indexed in the released
    # linear_attn_config), the first layer dense, 2 groups of 8 sigmoid-routed experts
    "tiny-kimi-linear": {"model_type": "kimi_linear", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
                         "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                         "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 128, "qk_nope_head_dim": 64,
                         "qk_rope_head_dim": 32, "v_head_dim": 64, "num_experts": 16, "num_experts_per_token": 4,
                         "num_shared_experts": 1, "num_expert_group": 2, "topk_group": 1, "moe_renormalize": True,
                         "routed_scaling_factor": 2.446, "first_k_dense_replace": 1, "rms_norm_eps": 1e-5,
                         "model_max_length": 1024, "eos_token_id": 2,
                         "linear_attn_config": {"kda_layers": [1, 2, 4], "full_attn_layers": [3], "head_dim": 64,
                                                "num_heads": 4, "short_conv_kernel_size": 4}},
}
DEFAULT_PROMPT_IDS = [1, 17, 42, 99, 5, 230, 311, 64, 77, 128, 9, 400, 33, 250, 18, 71, 150, 260, 3, 88]


def checkpoint_shapes(cfg: dict) -> dict[str, tuple]:
    """Every tensor name -> shape of a checkpoint of config dict ``cfg`` (the published layout:
    per-expert weights, no FP8; Qwen3.5: the text-only layout)."""
    from hal.models.config import ModelConfig
    c = ModelConfig.from_dict(cfg)
    if c.is_qwen35:
        from hal.models.qwen35 import checkpoint_shapes as qwen35_shapes
        return qwen35_shapes(c)
    if c.is_kimi_linear:
        from hal.models.kimi_linear import checkpoint_shapes as kimi_shapes
        return kimi_shapes(c)
    H = c.hidden_size
    out = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,), "lm_head.weight": (c.vocab_size, H)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = out[f"{p}.post_attention_layernorm.weight"] = (H,)
        a = f"{p}.self_attn"
        if c.is_mla:
            qk = c.qk_nope_head_dim + c.qk_rope_head_dim
            out.update({f"{a}.q_a_proj.weight": (c.q_lora_rank, H), f"{a}.q_a_layernorm.weight": (c.q_lora_rank,),
                        f"{a}.q_b_proj.weight": (c.num_attention_heads * qk, c.q_lora_rank),
                        f"{a}.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, H),
                        f"{a}.kv_a_layernorm.weight": (c.kv_lora_rank,),
                        f"{a}.kv_b_proj.weight": (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
                        f"{a}.o_proj.weight": (H, c.num_attention_heads * c.v_head_dim)})
            if c.indexer_types[i] == "full":
                out.update({f"{a}.indexer.wq_b.weight": (c.index_n_heads * c.index_head_dim, c.q_lora_rank),
                            f"{a}.indexer.wk.weight": (c.index_head_dim, H),
                            f"{a}.indexer.k_norm.weight": (c.index_head_dim,), f"{a}.indexer.k_norm.bias": (c.index_head_dim,),
                            f"{a}.indexer.weights_proj.weight": (c.index_n_heads, H)})
        else:
            D = c.head_dim
            out.update({f"{a}.q_proj.weight": (c.num_attention_heads * D, H), f"{a}.k_proj.weight": (c.num_key_value_heads * D, H),
                        f"{a}.v_proj.weight": (c.num_key_value_heads * D, H), f"{a}.o_proj.weight": (H, c.num_attention_heads * D)})
            if c.attention_bias:
                out.update({f"{a}.q_proj.bias": (c.num_attention_heads * D,), f"{a}.k_proj.bias": (c.num_key_value_heads * D,),
                            f"{a}.v_proj.bias": (c.num_key_value_heads * D,)})
            if c.use_qk_norm:
                out.update({f"{a}.q_norm.weight": (D,), f"{a}.k_norm.weight": (D,)})
        m = f"{p}.mlp"
        if c.mlp_layer_types[i] == "sparse":
            I = c.moe_intermediate_size
            for e in range(c.n_routed_experts):
                out.update({f"{m}.experts.{e}.gate_proj.weight": (I, H), f"{m}.experts.{e}.up_proj.weight": (I, H),
                            f"{m}.experts.{e}.down_proj.weight": (H, I)})
            out.update({f"{m}.gate.weight": (c.n_routed_experts, H), f"{m}.gate.e_score_correction_bias": (c.n_routed_experts,)})
            Is = I * c.n_shared_experts
            out.update({f"{m}.shared_experts.gate_proj.weight": (Is, H), f"{m}.shared_experts.up_proj.weight": (Is, H),
                        f"{m}.shared_experts.down_proj.weight": (H, Is)})
        else:
            out.update({f"{m}.gate_proj.weight": (c.intermediate_size, H), f"{m}.up_proj.weight": (c.intermediate_size, H),
                        f"{m}.down_proj.weight": (H, c.intermediate_size)})
    return out


def random_checkpoint(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights for any config dict (tensor name -> tensor, the published layout): norms 1,
    everything else normal with std 0.02 from ``seed`` (Qwen3.5 / Kimi Linear: see their
    ``initial_value``)."""
    from hal.models import kimi_linear, qwen35
    initial_value = {"qwen3_5_moe": qwen35.initial_value, "qwen3_5_moe_text": qwen35.initial_value,
                     "kimi_linear": kimi_linear.initial_value}.get(cfg.get("model_type"))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in checkpoint_shapes(cfg).items():
        special = initial_value(key, shape, g) if initial_value else None
        if special is not None:
            out[key] = special
        elif key.endswith("norm.weight"):
            out[key] = torch.ones(shape)
        else:
            out[key] = torch.randn(shape, generator=g) * 0.02
    return out


def random_weights(name: str) -> dict[str, torch.Tensor]:
    """Deterministic weights for a built-in config (seeded by the model name)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)
    return random_checkpoint(CONFIGS[name], seed)
