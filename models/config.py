"""Model configuration: one dataclass for the GLM-5, DeepSeek-V3.2, GLM-4.5, Qwen3.5-MoE and Kimi Linear families,
read from a Hugging Face ``config.json`` (the field names transformers uses)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

SUPPORTED = {"glm_moe_dsa": "GLM-5 (MLA + DSA with shared indexer layers + MoE)",
             "deepseek_v32": "DeepSeek-V3.2 (MLA + DSA + group-limited MoE)",
             "glm4_moe": "GLM-4.5 / GLM-4.5-Air (GQA, partial RoPE, optional qk-norm + MoE)",
             "qwen3_5_moe": "Qwen3.5 MoE, released layout (text model of the nested text_config; Gated DeltaNet + "
                            "gated attention + softmax MoE)",
             "qwen3_5_moe_text": "Qwen3.5 MoE text-only (Qwen3_5MoeForCausalLM)",
             "kimi_linear": "Kimi Linear (KDA linear attention + MLA without RoPE + sigmoid MoE)"}
QWEN35 = ("qwen3_5_moe", "qwen3_5_moe_text")
KIMI_LINEAR = "kimi_linear"


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
    # Qwen3.5 MoE: Gated DeltaNet ("linear_attention") and gated GQA ("full_attention") layers
    layer_types: tuple = ()
    linear_conv_kernel_dim: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    shared_expert_intermediate_size: int = 0
    # Kimi Linear: KDA ("linear_attention") layers use linear_num_key_heads = linear_num_value_heads
    # (its linear_num_heads) and linear_key_head_dim = linear_value_head_dim (its linear_head_dim)

    @property
    def is_qwen35(self) -> bool:
        return self.model_type in QWEN35

    @property
    def is_kimi_linear(self) -> bool:
        return self.model_type == KIMI_LINEAR

    @property
    def is_mla(self) -> bool:
        return self.model_type in ("glm_moe_dsa", "deepseek_v32")

    @property
    def indexer_rope_interleaved(self) -> bool:
        """GLM-5's indexer rotates interleaved pairs; DeepSeek-V3.2's rotates halves."""
        return self.model_type == "glm_moe_dsa"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Read a config.json dict; fields it omits take transformers' defaults for its model_type.

        Every field this package reads is checked for type and range before anything is sized by
        it (see ``SIZE_LIMITS``), and the combinations the contract ops would refuse at run time
        (top-k above the experts, n_group not dividing them, index_topk < 1, ...) are refused
        here, each naming the field: :class:`ModelConfigError`."""
        if not isinstance(d, dict):
            raise ModelConfigError(f"expected a JSON object of fields, got a JSON {_json_kind(d)}")
        mt = d.get("model_type")
        if not isinstance(mt, str) or mt not in SUPPORTED:
            raise ModelConfigError(f"unsupported model_type {mt!r}; supported: " +
                                   ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items()))
        if mt == "qwen3_5_moe":
            d = qwen35_text_fields(d)
        if mt == KIMI_LINEAR:
            d = kimi_linear_fields(d)
        d = {**FAMILY_DEFAULTS[mt], **{k: v for k, v in d.items() if v is not None or k in ("q_lora_rank", "eos_token_id")}}
        if d.get("num_experts") is not None:                 # transformers' BC alias
            d["n_routed_experts"] = d["num_experts"]
        if d.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act {d['hidden_act']!r} is not implemented (the released models use silu)")
        check_fields(d, mt)
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
                intermediate_size=0 if mt in QWEN35 else d["intermediate_size"],
                moe_intermediate_size=d["moe_intermediate_size"],
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
            if mt == KIMI_LINEAR:
                kw.update(q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
                          qk_rope_head_dim=d["qk_rope_head_dim"], qk_nope_head_dim=d["qk_nope_head_dim"],
                          v_head_dim=d["v_head_dim"], head_dim=d["qk_rope_head_dim"], partial_rotary_factor=1.0,
                          layer_types=kimi_linear_layer_types(d, L),
                          linear_conv_kernel_dim=d["linear_conv_kernel_dim"],
                          linear_key_head_dim=d["linear_head_dim"], linear_value_head_dim=d["linear_head_dim"],
                          linear_num_key_heads=d["linear_num_heads"], linear_num_value_heads=d["linear_num_heads"])
            elif mt in ("glm_moe_dsa", "deepseek_v32"):
                kw.update(q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
                          qk_rope_head_dim=d["qk_rope_head_dim"], qk_nope_head_dim=d["qk_nope_head_dim"],
                          v_head_dim=d["v_head_dim"], index_topk=d["index_topk"], index_head_dim=d["index_head_dim"],
                          index_n_heads=d["index_n_heads"],
                          indexer_types=indexer_types(d, L) if mt == "glm_moe_dsa" else ("full",) * L)
            else:
                kw.update(head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
                          use_qk_norm=d.get("use_qk_norm", False))
            if mt in QWEN35:
                kw.update(use_qk_norm=True, n_shared_experts=1, layer_types=qwen35_layer_types(d, L),
                          shared_expert_intermediate_size=d["shared_expert_intermediate_size"],
                          **{f: d[f] for f in _QWEN35_LINEAR})
        except KeyError as exc:
            raise ModelConfigError(f"config.json lacks the field {exc.args[0]!r} that {mt} needs") from exc
        if len(mlp_types) != L or set(mlp_types) - {"dense", "sparse"}:
            raise ModelConfigError(f"mlp_layer_types must list 'dense'/'sparse' for each of the {L} layers")
        if kw["n_routed_experts"] % kw["n_group"] or kw["topk_group"] > kw["n_group"]:
            raise ModelConfigError(f"n_group={kw['n_group']} must divide n_routed_experts={kw['n_routed_experts']} "
                                   f"and topk_group={kw['topk_group']} must not exceed it")
        kept = kw["topk_group"] * (kw["n_routed_experts"] // kw["n_group"])
        if kw["num_experts_per_tok"] > kept:
            raise ModelConfigError(f"num_experts_per_tok: expected at most {kept} (the experts in topk_group="
                                   f"{kw['topk_group']} of n_group={kw['n_group']} groups of n_routed_experts="
                                   f"{kw['n_routed_experts']}), got {kw['num_experts_per_tok']}")
        _check_rope(kw, rope)
        if mt in QWEN35:
            _check_qwen35(kw)
        if mt == KIMI_LINEAR:
            _check_kimi_linear(kw)
        if mt in ("glm4_moe",) + QWEN35 and kw["num_attention_heads"] % kw["num_key_value_heads"]:
            raise ModelConfigError(f"num_key_value_heads: expected a divisor of num_attention_heads="
                                   f"{kw['num_attention_heads']}, got {kw['num_key_value_heads']}")
        if mt in ("glm_moe_dsa", "deepseek_v32"):
            if kw["q_lora_rank"] is None:
                raise ModelConfigError("MLA without q_lora_rank is not supported (no released DSA model uses it)")
            if len(kw["indexer_types"]) != L or set(kw["indexer_types"]) - {"full", "shared"}:
                raise ModelConfigError(f"indexer_types must list 'full'/'shared' for each of the {L} layers")
            if kw["indexer_types"][0] != "full":
                raise ModelConfigError("indexer_types[0] must be 'full': a shared layer reuses an earlier full one")
        return cls(**kw)


# Upper bounds on the sizes a config.json may ask for, checked before anything is sized by them.
# Each admits the released GLM-5, DeepSeek-V3.2, GLM-4.5 and Kimi-K2 configs with a wide margin
# (largest released value in the comment).
SIZE_LIMITS = {
    "vocab_size": 1 << 20,                 # Kimi-K2 163,840; GLM-5 154,880
    "hidden_size": 1 << 16,                # DeepSeek-V3.2 / Kimi-K2 7,168
    "intermediate_size": 1 << 18,          # DeepSeek-V3.2 18,432
    "moe_intermediate_size": 1 << 16,      # 2,048
    "num_hidden_layers": 1024,             # GLM-4.5 92
    "num_attention_heads": 1024,           # DeepSeek-V3.2 128
    "num_key_value_heads": 1024,
    "n_routed_experts": 4096,              # Kimi-K2 384
    "num_experts_per_tok": 4096,           # 8
    "n_shared_experts": 64,                # 1
    "n_group": 4096,
    "topk_group": 4096,
    "first_k_dense_replace": 1024,
    "max_position_embeddings": 1 << 24,    # GLM-5 202,752
    "q_lora_rank": 1 << 16,                # GLM-5 2,048
    "kv_lora_rank": 1 << 16,               # 512
    "qk_rope_head_dim": 4096,              # 64
    "qk_nope_head_dim": 4096,              # GLM-5 192
    "v_head_dim": 4096,                    # GLM-5 256
    "head_dim": 4096,                      # GLM-4.5 128
    "index_topk": 1 << 24,                 # 2,048
    "index_head_dim": 4096,                # 128
    "index_n_heads": 1024,                 # DeepSeek-V3.2 64
    "index_topk_freq": 1024,
    "index_skip_topk_offset": 1024,
    "linear_conv_kernel_dim": 64,          # Qwen3.5 4
    "linear_key_head_dim": 4096,           # Qwen3.5 128
    "linear_value_head_dim": 4096,         # Qwen3.5 128
    "linear_num_key_heads": 1024,          # Qwen3.5 16
    "linear_num_value_heads": 1024,        # Qwen3.5-35B-A3B 32
    "shared_expert_intermediate_size": 1 << 18,   # Qwen3.5-35B-A3B 512
    "full_attention_interval": 1024,       # Qwen3.5 4
    "linear_head_dim": 4096,               # Kimi Linear 128
    "linear_num_heads": 1024,              # Kimi Linear 32
}
_ZERO_OK = {"n_shared_experts", "first_k_dense_replace", "index_topk_freq", "index_skip_topk_offset"}
_GQA_ONLY = {"head_dim"}              # read by glm4_moe and Qwen3.5 only
_QWEN35_LINEAR = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                  "linear_num_value_heads")
_BOOLEANS = ("norm_topk_prob", "attention_bias", "tie_word_embeddings", "use_qk_norm")
_MAX_EOS_IDS = 1024


def _json_kind(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _integer(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ModelConfigError(f"{name}: expected an integer in [{lo}, {hi}], got {v!r} (a JSON {_json_kind(v)})")
    if not lo <= v <= hi:
        raise ModelConfigError(f"{name}: expected an integer in [{lo}, {hi}] (this package's limit), got {v}")
    return v


def _real(name: str, v, *, positive: bool = False, above: Optional[float] = None,
          at_most: Optional[float] = None) -> float:
    """A finite JSON number (bool refused), optionally > 0, > ``above``, <= ``at_most``."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and (not positive or v > 0) and (above is None or v > above) and (at_most is None or v <= at_most)
    if not ok:
        if positive and at_most is not None:
            want = f"a finite number in (0, {at_most}]"
        else:
            want = "a finite number" + (" > 0" if positive else "") + (f" > {above}" if above is not None else "") + \
                (f" <= {at_most}" if at_most is not None else "")
        raise ModelConfigError(f"{name}: expected {want}, got {v!r}")
    return v


def check_fields(d: dict, model_type: str) -> None:
    """Type and range of every field ``from_dict`` reads (absent fields are left to its KeyError),
    so that nothing is sized by an unchecked number. Raises ModelConfigError naming the field."""
    for name, hi in SIZE_LIMITS.items():
        if name in d and d[name] is not None and not (name in _GQA_ONLY and model_type not in ("glm4_moe",) + QWEN35):
            _integer(name, d[name], 0 if name in _ZERO_OK else 1, hi)
    for name in _BOOLEANS:
        if name in d and not isinstance(d[name], bool):
            raise ModelConfigError(f"{name}: expected true or false, got {d[name]!r}")
    if "routed_scaling_factor" in d:
        _real("routed_scaling_factor", d["routed_scaling_factor"])
    if "rms_norm_eps" in d:
        _real("rms_norm_eps", d["rms_norm_eps"], positive=True)
    if "rope_theta" in d:
        _real("rope_theta", d["rope_theta"], above=1)
    if "partial_rotary_factor" in d:
        _real("partial_rotary_factor", d["partial_rotary_factor"], positive=True, at_most=1)
    for name in ("quantization_config", "rope_parameters", "rope_scaling"):
        if d.get(name) is not None and not isinstance(d[name], dict):
            raise ModelConfigError(f"{name}: expected a JSON object, got {d[name]!r} (a JSON {_json_kind(d[name])})")
    L = d.get("num_hidden_layers")
    for name in ("mlp_layer_types", "indexer_types", "index_topk_pattern", "layer_types"):
        v = d.get(name)
        if v is None or L is None:
            continue
        if not isinstance(v, (list, str) if name == "index_topk_pattern" else list):
            raise ModelConfigError(f"{name}: expected a list, got a JSON {_json_kind(v)}")
        if v and len(v) != L:
            raise ModelConfigError(f"{name}: expected one entry for each of the num_hidden_layers={L} layers, "
                                   f"got {len(v)}")
    eos = d.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if len(eos_list) > _MAX_EOS_IDS or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in eos_list):
        raise ModelConfigError(f"eos_token_id: expected a token id >= 0 or a list of at most {_MAX_EOS_IDS}, "
                               f"got {eos!r}")


def _check_rope(kw: dict, rope: dict) -> None:
    """The RoPE fields: finite numbers where the frequencies use them; an even rotated width."""
    _real("rope_parameters.rope_theta", kw["rope_theta"], above=1)
    _real("rope_parameters.partial_rotary_factor", kw["partial_rotary_factor"], positive=True, at_most=1)
    if kw["rope_type"] == "yarn":
        _real("rope_parameters.factor", rope["factor"], positive=True)
        _integer("rope_parameters.original_max_position_embeddings", rope["original_max_position_embeddings"],
                 1, SIZE_LIMITS["max_position_embeddings"])
        for name in ("attention_factor", "beta_fast", "beta_slow"):
            if rope.get(name) is not None:
                _real(f"rope_parameters.{name}", rope[name], positive=True)
        for name in ("mscale", "mscale_all_dim"):
            if rope.get(name) is not None:
                _real(f"rope_parameters.{name}", rope[name])
    if kw["model_type"] in ("glm4_moe",) + QWEN35:
        _integer("head_dim", kw["head_dim"], 1, SIZE_LIMITS["head_dim"])
        rotated = int(kw["head_dim"] * kw["partial_rotary_factor"])
        if rotated < 2 or rotated % 2:
            raise ModelConfigError(f"partial_rotary_factor: head_dim={kw['head_dim']} x {kw['partial_rotary_factor']} "
                                   f"must give an even rotated width >= 2, got {rotated}")
    elif kw["model_type"] != KIMI_LINEAR and kw["qk_rope_head_dim"] % 2:      # Kimi Linear's MLA has no RoPE
        raise ModelConfigError(f"qk_rope_head_dim: expected an even number (RoPE rotates pairs), got "
                               f"{kw['qk_rope_head_dim']}")


def qwen35_text_fields(d: dict) -> dict:
    """The text model's fields of a released Qwen3.5 MoE config (``model_type`` "qwen3_5_moe", the
    vision-language wrapper): its ``text_config`` object, with ``tie_word_embeddings`` and
    ``eos_token_id`` taken from the top level when the text config omits them. The vision tower's
    fields are not read."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ModelConfigError(f"text_config: expected a JSON object (model_type qwen3_5_moe nests the text model's "
                               f"fields there), got {'nothing' if text is None else 'a JSON ' + _json_kind(text)}")
    out = {k: d[k] for k in ("tie_word_embeddings", "eos_token_id") if d.get(k) is not None}
    out.update({k: v for k, v in text.items() if v is not None})
    out["model_type"] = "qwen3_5_moe"
    return out


def qwen35_layer_types(d: dict, num_layers: int) -> tuple:
    """Qwen3.5's per-layer token mixer, derived as transformers' Qwen3_5MoeTextConfig does: an
    explicit ``layer_types`` list, else every ``full_attention_interval``-th layer (default 4) is
    "full_attention" and the others "linear_attention"."""
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    every = d.get("full_attention_interval", 4)
    return tuple("linear_attention" if (i + 1) % every else "full_attention" for i in range(num_layers))


def _check_qwen35(kw: dict) -> None:
    L = kw["num_hidden_layers"]
    if len(kw["layer_types"]) != L or set(kw["layer_types"]) - {"linear_attention", "full_attention"}:
        raise ModelConfigError(f"layer_types must list 'linear_attention'/'full_attention' for each of the {L} layers")
    if "dense" in kw["mlp_layer_types"]:
        raise ModelConfigError("mlp_layer_types: Qwen3.5 MoE has a MoE block in every layer; 'dense' is not supported")
    for name in _QWEN35_LINEAR + ("shared_expert_intermediate_size",):
        _integer(name, kw[name], 1, SIZE_LIMITS[name])
    if kw["linear_num_value_heads"] % kw["linear_num_key_heads"]:
        raise ModelConfigError(f"linear_num_value_heads: expected a multiple of linear_num_key_heads="
                               f"{kw['linear_num_key_heads']} (each key head serves consecutive value heads), "
                               f"got {kw['linear_num_value_heads']}")


# transformers' KimiLinearConfig.attribute_map: the released config.json's names -> this package's
_KIMI_ALIASES = {"num_experts_per_token": "num_experts_per_tok", "moe_renormalize": "norm_topk_prob",
                 "num_expert_group": "n_group", "num_shared_experts": "n_shared_experts",
                 "num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts",
                 "model_max_length": "max_position_embeddings"}
# linear_attn_config's names (the released config.json) -> the flat fields transformers reads them into
_KIMI_LINEAR_ATTN = {"head_dim": "linear_head_dim", "num_heads": "linear_num_heads",
                     "short_conv_kernel_size": "linear_conv_kernel_dim"}


def kimi_linear_fields(d: dict) -> dict:
    """A Kimi Linear config.json read as transformers 5.24's KimiLinearConfig reads it: the
    released names (``num_experts``, ``num_experts_per_token``, ``moe_renormalize``,
    ``num_expert_group``, ``num_shared_experts``, ``model_max_length``) for this package's ones, and
    ``linear_attn_config``'s ``head_dim`` / ``num_heads`` / ``short_conv_kernel_size`` over the flat
    ``linear_head_dim`` / ``linear_num_heads`` / ``linear_conv_kernel_dim``."""
    out = dict(d)
    for theirs, ours in _KIMI_ALIASES.items():
        if d.get(theirs) is not None:
            out[ours] = d[theirs]
    lac = d.get("linear_attn_config")
    if lac is not None:
        if not isinstance(lac, dict):
            raise ModelConfigError(f"linear_attn_config: expected a JSON object, got a JSON {_json_kind(lac)}")
        out.update({ours: lac[theirs] for theirs, ours in _KIMI_LINEAR_ATTN.items() if lac.get(theirs) is not None})
    return out


def kimi_linear_layer_types(d: dict, num_layers: int) -> tuple:
    """Kimi Linear's per-layer token mixer, as KimiLinearConfig derives it: an explicit
    ``layer_types`` list, else ``linear_attn_config``'s 1-indexed ``full_attn_layers`` and
    ``kda_layers`` (which must name every layer exactly once), else layer i > 0 with i % 4 == 0 is
    "full_attention" and every other one "linear_attention"."""
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    lac = d.get("linear_attn_config") or {}
    if "full_attn_layers" in lac and "kda_layers" in lac:
        types = [None] * num_layers
        for name, kind in (("full_attn_layers", "full_attention"), ("kda_layers", "linear_attention")):
            layers = lac[name]
            if not isinstance(layers, list):
                raise ModelConfigError(f"linear_attn_config.{name}: expected a list of 1-indexed layer numbers, "
                                       f"got a JSON {_json_kind(layers)}")
            for n in layers:
                _integer(f"linear_attn_config.{name}", n, 1, num_layers)
                if types[n - 1] is not None:
                    raise ModelConfigError(f"linear_attn_config.{name}: layer {n} is listed twice in "
                                           "full_attn_layers / kda_layers")
                types[n - 1] = kind
        if None in types:
            raise ModelConfigError(f"linear_attn_config: layer {types.index(None) + 1} is in neither full_attn_layers "
                                   f"nor kda_layers (1-indexed; num_hidden_layers={num_layers})")
        return tuple(types)
    return tuple("full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(num_layers))


def _check_kimi_linear(kw: dict) -> None:
    L = kw["num_hidden_layers"]
    if len(kw["layer_types"]) != L or set(kw["layer_types"]) - {"linear_attention", "full_attention"}:
        raise ModelConfigError(f"layer_types must list 'linear_attention'/'full_attention' for each of the {L} layers")
    for name, value in (("linear_head_dim", kw["linear_key_head_dim"]), ("linear_num_heads", kw["linear_num_key_heads"]),
                        ("linear_conv_kernel_dim", kw["linear_conv_kernel_dim"])):
        _integer(name, value, 1, SIZE_LIMITS[name])
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        _integer(name, kw[name], 1, SIZE_LIMITS[name])
    if kw["q_lora_rank"] is not None:
        _integer("q_lora_rank", kw["q_lora_rank"], 1, SIZE_LIMITS["q_lora_rank"])
    if kw["num_key_value_heads"] != kw["num_attention_heads"]:
        raise ModelConfigError(f"num_key_value_heads: expected num_attention_heads={kw['num_attention_heads']} "
                               f"(Kimi Linear's MLA expands every head's key and value from the latent), "
                               f"got {kw['num_key_value_heads']}")


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
    # transformers 5.24's Qwen3_5MoeTextConfig (routing always renormalized, one gated shared expert)
    "qwen3_5_moe_text": dict(hidden_act="silu", tie_word_embeddings=False, rope_theta=10000.0, vocab_size=248320,
                             hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
                             head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6, attention_bias=False,
                             partial_rotary_factor=0.25, linear_conv_kernel_dim=4, linear_key_head_dim=128,
                             linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
                             moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts_per_tok=8,
                             num_experts=256, norm_topk_prob=True, routed_scaling_factor=1.0, n_group=1, topk_group=1),
}
FAMILY_DEFAULTS["qwen3_5_moe"] = FAMILY_DEFAULTS["qwen3_5_moe_text"]
# transformers 5.24's KimiLinearConfig (Kimi-Linear-48B-A3B); no RoPE is applied, rope_theta is not read
FAMILY_DEFAULTS["kimi_linear"] = dict(
    hidden_act="silu", vocab_size=163840, hidden_size=2304, intermediate_size=9216, moe_intermediate_size=1024,
    num_hidden_layers=27, num_attention_heads=32, n_shared_experts=1, routed_scaling_factor=2.446, kv_lora_rank=512,
    q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1,
    num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=1048576, rms_norm_eps=1e-5,
    eos_token_id=163586, tie_word_embeddings=False, attention_bias=False, n_routed_experts=256,
    first_k_dense_replace=1, linear_head_dim=128, linear_num_heads=32, linear_conv_kernel_dim=4)
