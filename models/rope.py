"""Rotary embedding frequencies: "default" and "yarn" (YaRN, used by the released DeepSeek-V3.2
and GLM-5 configs), computed as transformers' ``modeling_rope_utils`` does."""
from __future__ import annotations

import math

import torch


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_scaling(rope: dict, dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2] fp32, attention factor applied to cos/sin) for a rope_parameters dict."""
    base = rope.get("rope_theta", 10000.0)
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    kind = rope.get("rope_type", "default") or "default"
    if kind == "default":
        return 1.0 / pos, 1.0
    if kind != "yarn":
        raise ValueError(f"rope_type {kind!r} is not implemented (default and yarn are)")
    factor = rope["factor"]
    orig = rope["original_max_position_embeddings"]
    att = rope.get("attention_factor")
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    if att is None:
        att = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else yarn_mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    return inv, float(att)


def mla_softmax_scale(rope: dict, qk_head_dim: int) -> float:
    """MLA's attention scale: qk_head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim."""
    scale = qk_head_dim ** -0.5
    if (rope.get("rope_type", "default") or "default") != "default" and rope.get("mscale_all_dim"):
        m = yarn_mscale(rope["factor"], rope["mscale_all_dim"])
        scale = scale * m * m
    return scale
