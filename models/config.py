"""Model configuration: one dataclass for the GLM-5, DeepSeek-V3.2 and GLM-4.5 families, read from
a Hugging Face ``config.json`` (the field names transformers uses)."""
from __future__ import annotations

import dataclasses
import math
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
        kept = kw["topk_group"] * (kw["n_routed_experts"] // kw["n_group"])
        if kw["num_experts_per_tok"] > kept:
            raise ModelConfigError(f"num_experts_per_tok: expected at most {kept} (the experts in topk_group="
                                   f"{kw['topk_group']} of n_group={kw['n_group']} groups of n_routed_experts="
                                   f"{kw['n_routed_experts']}), got {kw['num_experts_per_tok']}")
        _check_rope(kw, rope)
        if mt == "glm4_moe" and kw["num_attention_heads"] % kw["num_key_value_heads"]:
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
}
_ZERO_OK = {"n_shared_experts", "first_k_dense_replace", "index_topk_freq", "index_skip_topk_offset"}
_GQA_ONLY = {"head_dim"}
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
        if name in d and d[name] is not None and not (name in _GQA_ONLY and model_type != "glm4_moe"):
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
    for name in ("mlp_layer_types", "indexer_types", "index_topk_pattern"):
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
    if kw["model_type"] == "glm4_moe":
        _integer("head_dim", kw["head_dim"], 1, SIZE_LIMITS["head_dim"])
        rotated = int(kw["head_dim"] * kw["partial_rotary_factor"])
        if rotated < 2 or rotated % 2:
            raise ModelConfigError(f"partial_rotary_factor: head_dim={kw['head_dim']} x {kw['partial_rotary_factor']} "
                                   f"must give an even rotated width >= 2, got {rotated}")
    elif kw["qk_rope_head_dim"] % 2:
        raise ModelConfigError(f"qk_rope_head_dim: expected an even number (RoPE rotates pairs), got "
                               f"{kw['qk_rope_head_dim']}")


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
