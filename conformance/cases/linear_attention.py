"""Cases for linear attention (gated_delta_rule, causal_conv1d).

The inputs look like the models' (Qwen3.5 / Qwen3-Next Gated DeltaNet, Kimi KDA): log-decays
``g = -exp(A_log) * softplus(a + dt_bias)`` (finite, < 0), ``beta = sigmoid(b)``, q/k
l2-normalized by the op (or unit keys handed in), states of modest size. Quick lengths cross the
usual chunk sizes (16, 32, 64) without dividing by them.
"""
from __future__ import annotations

import torch

from hal.conformance.cases._case import Case, randn

# (name, B, T, Hk, Hv, Dk, Dv, dtype)
GDR_QUICK = [("T0", 2, 0, 1, 2, 16, 16, torch.bfloat16), ("T1_no_state", 2, 1, 1, 2, 16, 16, torch.bfloat16),
             ("prefill_T37_GVA", 2, 37, 2, 4, 16, 32, torch.bfloat16),
             ("prefill_T70_fp32", 1, 70, 1, 2, 32, 16, torch.float32),
             ("B0", 0, 4, 1, 1, 8, 8, torch.float32)]
# Qwen3.5 / Qwen3-Next: 16 key heads, 32 value heads, 128 x 128 states; Kimi Linear: 32 heads, per-channel g
GDR_FULL = [("qwen35_prefill_T1500", 1, 1500, 16, 32, 128, 128, torch.bfloat16),
            ("qwen35_prefill_T700_fp32", 1, 700, 16, 32, 128, 128, torch.float32)]

# (name, B, T, D, K, dtype)
CONV_QUICK = [("T0", 2, 0, 16, 4, torch.bfloat16), ("prefill_no_state", 2, 9, 32, 4, torch.bfloat16),
              ("T2_shorter_than_window", 2, 2, 16, 4, torch.float32), ("K1_empty_window", 2, 5, 16, 1, torch.float32),
              ("B0", 0, 3, 8, 4, torch.float32)]
# Qwen3.5: conv over q|k|v = 2 * 16 * 128 + 32 * 128 = 8192 channels, K = 4; Kimi Linear: 3 * 32 * 128
CONV_FULL = [("qwen35_prefill", 2, 4096, 8192, 4, torch.bfloat16), ("kimi_prefill", 1, 2048, 12288, 4, torch.bfloat16)]


def _log_decay(g: torch.Generator, B, T, Hv, Dk=None) -> torch.Tensor:
    """Model-like log-decays ``-A * softplus(a)``, one A in [0.01, 1) per head: finite, < 0, most
    decays exp(g) in (0.5, 1). [B, T, Hv], or [B, T, Hv, Dk] (per channel) when Dk is given."""
    A = torch.rand(Hv, generator=g) * 0.99 + 0.01
    shape = (B, T, Hv) if Dk is None else (B, T, Hv, Dk)
    a = torch.nn.functional.softplus(torch.randn(*shape, generator=g) - 1.0)
    return -(a * (A if Dk is None else A[:, None]))


def _gdr_inputs(g, B, T, Hk, Hv, Dk, Dv, dtype, *, per_channel=False):
    q, k, v = randn(g, B, T, Hk, Dk, dtype=dtype), randn(g, B, T, Hk, Dk, dtype=dtype), randn(g, B, T, Hv, Dv, dtype=dtype)
    decay = _log_decay(g, B, T, Hv, Dk if per_channel else None)
    beta = torch.sigmoid(torch.randn(B, T, Hv, generator=g)).to(dtype)
    return q, k, v, decay, beta


def _gdr_case(name, B, T, Hk, Hv, Dk, Dv, dtype, *, state="batch", slots=None, seq_lens=None, per_channel=False,
              l2norm=True, beta_fp32=False, g_override=None, unit_keys=False, scale=None):
    """A gated_delta_rule case. ``state``: None, "batch" ([B, ...]) or "pool" (``slots`` = the
    state_indices, pool of ``max(slots) + 2`` rows); ``seq_lens`` one length per sequence;
    ``g_override(g)`` replaces the log-decays; ``unit_keys`` hands in keys of norm 1 (no l2norm)."""
    def build(gen):
        q, k, v, decay, beta = _gdr_inputs(gen, B, T, Hk, Hv, Dk, Dv, dtype, per_channel=per_channel)
        if unit_keys:
            kf = k.float()
            k = (kf / kf.norm(dim=-1, keepdim=True).clamp_min(1e-3)).to(dtype)
        if g_override is not None:
            decay = g_override(decay)
        if beta_fp32:
            beta = beta.float()
        kw = dict(scale=Dk ** -0.5 if scale is None else scale, initial_state=None, state_indices=None, seq_lens=None,
                  qk_l2norm=l2norm)
        if state == "batch":
            kw["initial_state"] = randn(gen, B, Hv, Dk, Dv, scale=0.5)
        elif state == "pool":
            kw["initial_state"] = randn(gen, max(slots) + 2, Hv, Dk, Dv, scale=0.5)
            kw["state_indices"] = torch.tensor(slots, dtype=torch.int32 if isinstance(slots, tuple) else torch.int64)
        if seq_lens is not None:
            kw["seq_lens"] = torch.tensor(seq_lens, dtype=torch.int32 if isinstance(seq_lens, tuple) else torch.int64)
        return (q, k, v, decay, beta), kw
    tags = tuple(t for t, on in (("state", state is not None), ("state_slots", state == "pool"),
                                 ("seq_lens", seq_lens is not None), ("per_channel_g", per_channel),
                                 ("no_l2norm", not l2norm)) if on)
    return Case("gated_delta_rule", name, build, tags)


def _heads_zero_and_large_negative(g: torch.Tensor) -> torch.Tensor:
    """Head 0 never decays (g = 0), head 1 forgets everything each token (g = -1e4), head 2 nearly
    (g = -30); the others keep the model-like values."""
    g = g.clone()
    g[:, :, 0], g[:, :, 1], g[:, :, 2] = 0.0, -1e4, -30.0
    return g


def _carried_case(name, B, T1, T2, Hk, Hv, Dk, Dv, dtype):
    """The second call of a sequence split in two: its initial_state is the reference's final state
    after the first T1 tokens (so a backend must continue a state it did not produce)."""
    def build(gen):
        from hal.backends.cpu import KERNELS
        q, k, v, decay, beta = _gdr_inputs(gen, B, T1 + T2, Hk, Hv, Dk, Dv, dtype)
        first = KERNELS["gated_delta_rule"](q[:, :T1], k[:, :T1], v[:, :T1], decay[:, :T1], beta[:, :T1],
                                            scale=Dk ** -0.5, initial_state=None, state_indices=None, seq_lens=None,
                                            qk_l2norm=True)[1]
        rest = (q[:, T1:], k[:, T1:], v[:, T1:], decay[:, T1:], beta[:, T1:])
        return rest, dict(scale=Dk ** -0.5, initial_state=first, state_indices=None, seq_lens=None, qk_l2norm=True)
    return Case("gated_delta_rule", name, build, ("state", "carried"))


def _gdr_cases(level):
    shapes = GDR_QUICK if level == "quick" else GDR_FULL
    out = [_gdr_case(*s, state=None if "no_state" in s[0] else "batch") for s in shapes]
    if level == "quick":
        out += [_gdr_case("fp16_beta_fp32", 2, 11, 1, 2, 16, 16, torch.float16, beta_fp32=True),
                _gdr_case("g_zero_and_large_negative", 1, 40, 1, 4, 16, 16, torch.float32,
                          g_override=_heads_zero_and_large_negative),
                _gdr_case("unit_keys_no_l2norm", 2, 19, 2, 2, 16, 16, torch.float32, l2norm=False, unit_keys=True,
                          scale=0.7, state=None),
                _gdr_case("varlen", 3, 20, 1, 2, 16, 16, torch.bfloat16, seq_lens=[20, 7, 0]),
                _gdr_case("decode_state_slots", 3, 1, 2, 4, 16, 16, torch.bfloat16, state="pool", slots=[4, 0, 2]),
                _gdr_case("spec_decode_slots_varlen", 2, 3, 1, 2, 16, 16, torch.bfloat16, state="pool", slots=(1, 3),
                          seq_lens=(3, 1)),
                _gdr_case("kda_per_channel", 2, 33, 2, 2, 16, 16, torch.bfloat16, per_channel=True),
                _gdr_case("kda_per_channel_fp32_varlen", 2, 17, 1, 1, 8, 16, torch.float32, per_channel=True,
                          seq_lens=[17, 9]),
                _carried_case("state_carried_across_calls", 2, 24, 21, 1, 2, 16, 16, torch.float32)]
    else:
        out += [_gdr_case("qwen35_prefill_varlen", 4, 600, 16, 32, 128, 128, torch.bfloat16, seq_lens=[600, 413, 77, 1]),
                _gdr_case("qwen35_decode_slots", 64, 1, 16, 32, 128, 128, torch.bfloat16, state="pool",
                          slots=[(7 * i) % 96 for i in range(64)]),
                _gdr_case("qwen35_spec_decode", 16, 4, 16, 32, 128, 128, torch.bfloat16, state="pool",
                          slots=list(range(16)), seq_lens=[1 + i % 4 for i in range(16)]),
                _gdr_case("kimi_kda_prefill", 1, 700, 32, 32, 128, 128, torch.bfloat16, per_channel=True),
                _gdr_case("kimi_kda_decode_slots", 32, 1, 32, 32, 128, 128, torch.bfloat16, per_channel=True,
                          state="pool", slots=list(range(31, -1, -1))),
                _carried_case("qwen35_carried_across_calls", 1, 300, 129, 16, 32, 128, 128, torch.bfloat16)]
    return out


def _conv_case(name, B, T, D, K, dtype, *, state=None, slots=None, seq_lens=None, bias=False, activation="none",
               w_dtype=None, carried=False):
    """A causal_conv1d case; ``state`` as in :func:`_gdr_case`; ``carried`` takes the window from a
    reference call on the previous 6 tokens."""
    def build(gen):
        from hal.backends.cpu import KERNELS
        x = randn(gen, B, T, D, dtype=dtype)
        w = randn(gen, D, K, dtype=w_dtype or dtype, scale=K ** -0.5)
        kw = dict(bias=randn(gen, D, dtype=w_dtype or dtype, scale=0.1) if bias else None, conv_state=None,
                  state_indices=None, seq_lens=None, activation=activation)
        if state == "batch":
            kw["conv_state"] = randn(gen, B, K - 1, D, dtype=dtype)
        elif state == "pool":
            kw["conv_state"] = randn(gen, max(slots) + 2, K - 1, D, dtype=dtype)
            kw["state_indices"] = torch.tensor(slots, dtype=torch.int32 if isinstance(slots, tuple) else torch.int64)
        if carried:
            before = randn(gen, B, 6, D, dtype=dtype)
            kw["conv_state"] = KERNELS["causal_conv1d"](before, w, bias=None, conv_state=None, state_indices=None,
                                                        seq_lens=None, activation=activation)[1]
        if seq_lens is not None:
            kw["seq_lens"] = torch.tensor(seq_lens, dtype=torch.int32 if isinstance(seq_lens, tuple) else torch.int64)
        return (x, w), kw
    tags = tuple(t for t, on in (("state", state is not None or carried), ("state_slots", state == "pool"),
                                 ("seq_lens", seq_lens is not None), ("bias", bias), ("silu", activation == "silu"),
                                 ("carried", carried)) if on)
    return Case("causal_conv1d", name, build, tags)


def _conv_cases(level):
    shapes = CONV_QUICK if level == "quick" else CONV_FULL
    out = [_conv_case(*s, state="batch" if s[0] == "T0" else None, activation="silu" if s[3] >= 32 else "none")
           for s in shapes]
    if level == "quick":
        out += [_conv_case("decode_step_slots", 3, 1, 32, 4, torch.bfloat16, state="pool", slots=[4, 0, 2], bias=True,
                           activation="silu"),
                _conv_case("varlen_state_fp16", 3, 7, 16, 4, torch.float16, state="batch", seq_lens=[7, 3, 0], bias=True),
                _conv_case("fp32_weight_bf16_x", 2, 6, 16, 3, torch.bfloat16, w_dtype=torch.float32, bias=True),
                _conv_case("spec_decode_slots_varlen", 2, 3, 16, 4, torch.bfloat16, state="pool", slots=(1, 3),
                           seq_lens=(3, 1), activation="silu"),
                _conv_case("state_carried_across_calls", 2, 5, 16, 4, torch.float32, carried=True, activation="silu")]
    else:
        out += [_conv_case("qwen35_decode_slots", 128, 1, 8192, 4, torch.bfloat16, state="pool",
                           slots=list(range(127, -1, -1)), activation="silu"),
                _conv_case("qwen35_prefill_varlen_state", 4, 1024, 8192, 4, torch.bfloat16, state="batch",
                           seq_lens=[1024, 700, 33, 1], activation="silu")]
    return out


def cases(level: str) -> list[Case]:
    return _gdr_cases(level) + _conv_cases(level)
