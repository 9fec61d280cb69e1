"""Model configuration: one dataclass for the GLM-5, DeepSeek-V3.2 and GLM-4.5 families, read from
a Hugging Face ``config.json`` (the field names transformers uses)."""
from __future__ import annotations

import dataclasses
from typing import Optional

SUPPORTED = {"glm_moe_dsa": "GLM-5 (MLA + DSA with shared indexer layers + MoE)",
             "deepseek_v32": "DeepSeek-V3.2 (MLA + DSA + group-limited MoE)",
             "glm4_moe": "GLM-4.5 / GLM-4.5-Air (GQA, partial RoPE, optional qk-norm + MoE)"}


class ModelConfigError(ValueError):
    """A config.json this package cannot run (unknown model_type, unsupported RoPE, bad fields)."""


@dataclasses.dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    mlp_layer_types: tuple = ()
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_id: tuple = ()
    # MLA + DSA (glm_moe_dsa, deepseek_v32)
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    index_topk: int = 0
    index_head_dim: int = 0
    index_n_heads: int = 0
    indexer_types: tuple = ()
    # GQA (glm4_moe)
    head_dim: int = 0
    use_qk_norm: bool = False
    quantization: Optional[dict] = None
    rope_parameters: dict = dataclasses.field(default_factory=dict)

    @property
    def is_mla(self) -> bool:
        return self.model_type in ("glm_moe_dsa", "deepseek_v32")

    @property
    def indexer_rope_interleaved(self) -> bool:
        """GLM-5's indexer rotates interleaved pairs; DeepSeek-V3.2's rotates halves."""
        return self.model_type == "glm_moe_dsa"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Read a config.json dict; fields it omits take transformers' defaults for its model_type."""
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ModelConfigError(f"unsupported model_type {mt!r}; supported: " +
                                   ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items()))
        d = {**FAMILY_DEFAULTS[mt], **{k: v for k, v in d.items() if v is not None or k in ("q_lora_rank", "eos_token_id")}}
        if d.get("num_experts") is not None:                 # transformers' BC alias
            d["n_routed_experts"] = d["num_experts"]
        if d.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act {d['hidden_act']!r} is not implemented (the released models use silu)")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ("default", "yarn"):
            raise ModelConfigError(f"rope_type {rope_type!r} is not implemented (default and yarn are)")
        if rope_type == "yarn" and ("factor" not in rope or "original_max_position_embeddings" not in rope):
            raise ModelConfigError("yarn rope_parameters need 'factor' and 'original_max_position_embeddings'")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        L = d["num_hidden_layers"]
        fk = min(d.get("first_k_dense_replace", 0), L)
        mlp_types = tuple(d.get("mlp_layer_types") or ["dense"] * fk + ["sparse"] * (L - fk))
        eos = d.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        try:
            kw = dict(
                model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], moe_intermediate_size=d["moe_intermediate_size"],
                num_hidden_layers=L, num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                n_routed_experts=d["n_routed_experts"], num_experts_per_tok=d["num_experts_per_tok"],
                n_shared_experts=d.get("n_shared_experts") or 0, routed_scaling_factor=d["routed_scaling_factor"],
                n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
                norm_topk_prob=d["norm_topk_prob"], rms_norm_eps=d["rms_norm_eps"],
                rope_theta=theta, rope_type=rope_type, partial_rotary_factor=partial,
                max_position_embeddings=d["max_position_embeddings"], mlp_layer_types=mlp_types,
                attention_bias=d.get("attention_bias", False), tie_word_embeddings=d.get("tie_word_embeddings", False),
                eos_token_id=eos, quantization=d.get("quantization_config"),
                rope_parameters={**rope, "rope_theta": theta, "rope_type": rope_type})
            if mt in ("glm_moe_dsa", "deepseek_v32"):
                kw.update(q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
                          qk_rope_head_dim=d["qk_rope_head_dim"], qk_nope_head_dim=d["qk_nope_head_dim"],
                          v_head_dim=d["v_head_dim"], index_topk=d["index_topk"], index_head_dim=d["index_head_dim"],
                          index_n_heads=d["index_n_heads"],
                          indexer_types=indexer_types(d, L) if mt == "glm_moe_dsa" else ("full",) * L)
            else:
                kw.update(head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
                          use_qk_norm=d.get("use_qk_norm", False))
        except KeyError as exc:
            raise ModelConfigError(f"config.json lacks the field {exc.args[0]!r} that {mt} needs") from exc
        if len(mlp_types) != L or set(mlp_types) - {"dense", "sparse"}:
            raise ModelConfigError(f"mlp_layer_types must list 'dense'/'sparse' for each of the {L} layers")
        if kw["n_routed_experts"] % kw["n_group"] or kw["topk_group"] > kw["n_group"]:
            raise ModelConfigError(f"n_group={kw['n_group']} must divide n_routed_experts={kw['n_routed_experts']} "
                                   f"and topk_group={kw['topk_group']} must not exceed it")
        if mt in ("glm_moe_dsa", "deepseek_v32"):
            if kw["q_lora_rank"] is None:
                raise ModelConfigError("MLA without q_lora_rank is not supported (no released DSA model uses it)")
            if len(kw["indexer_types"]) != L or set(kw["indexer_types"]) - {"full", "shared"}:
                raise ModelConfigError(f"indexer_types must list 'full'/'shared' for each of the {L} layers")
            if kw["indexer_types"][0] != "full":
                raise ModelConfigError("indexer_types[0] must be 'full': a shared layer reuses an earlier full one")
        return cls(**kw)


def indexer_types(d: dict, num_layers: int) -> tuple:
    """GLM-5's per-layer indexer mode, derived as transformers' GlmMoeDsaConfig does: an explicit
    ``indexer_types`` list, else ``index_topk_pattern`` ("FSSF..." or a list), else the schedule
    ``index_topk_freq`` / ``index_skip_topk_offset`` (layer i is "full" iff
    max(i - offset + 1, 0) % freq == 0; freq 1, the default, makes every layer full)."""
    if d.get("indexer_types"):
        return tuple(d["indexer_types"])
    pattern = d.get("index_topk_pattern")
    if pattern is not None:
        if isinstance(pattern, str):
            try:
                return tuple({"F": "full", "S": "shared"}[ch] for ch in pattern)
            except KeyError as exc:
                raise ModelConfigError(f"index_topk_pattern {pattern!r}: letters must be F or S") from exc
        return tuple(pattern)
    freq = max(d.get("index_topk_freq", 1) or 1, 1)
    offset = d.get("index_skip_topk_offset", 2)
    return tuple("full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(num_layers))


# transformers 5.23's defaults for the fields a config.json may omit (configuration_<model_type>.py)
_MOE_DEFAULTS = dict(n_shared_experts=1, norm_topk_prob=True, hidden_act="silu", attention_bias=False,
                     tie_word_embeddings=False, rope_theta=10000.0)
FAMILY_DEFAULTS = {
    "glm_moe_dsa": dict(_MOE_DEFAULTS, rms_norm_eps=1e-5, first_k_dense_replace=3, n_group=1, topk_group=1,
                        routed_scaling_factor=2.5, max_position_embeddings=202752, eos_token_id=1, q_lora_rank=2048,
                        index_topk=2048, index_head_dim=128, index_n_heads=32),
    "deepseek_v32": dict(_MOE_DEFAULTS, rms_norm_eps=1e-6, first_k_dense_replace=3, n_group=8, topk_group=4,
                         routed_scaling_factor=2.5, max_position_embeddings=163840, eos_token_id=1, q_lora_rank=1536,
                         index_topk=2048, index_head_dim=128, index_n_heads=64),
    "glm4_moe": dict(_MOE_DEFAULTS, rms_norm_eps=1e-5, first_k_dense_replace=1, n_group=1, topk_group=1,
                     routed_scaling_factor=1.0, max_position_embeddings=131072, partial_rotary_factor=0.5),
}
