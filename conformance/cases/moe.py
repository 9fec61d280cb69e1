"""Cases for the MoE family (moe_route, moe_dispatch, moe_experts, moe_combine, moe_forward)."""
from __future__ import annotations

import torch

from hal.conformance.cases._case import Case, randn

# (name, T, E, k, n_group, topk_group, H, I) -- quick: tiny; full: the real models' MoE shapes
QUICK_SHAPES = [("T0", 0, 8, 2, 1, 1, 32, 16), ("T1", 1, 8, 2, 1, 1, 32, 16), ("small", 13, 16, 4, 1, 1, 64, 32),
                ("grouped", 9, 16, 4, 4, 2, 64, 32)]
FULL_SHAPES = [("deepseek_v32", 256, 256, 8, 8, 4, 7168, 2048), ("glm5", 256, 256, 8, 1, 1, 6144, 2048),
               ("glm45", 256, 160, 8, 1, 1, 5120, 1536), ("glm45_air", 256, 128, 8, 1, 1, 4096, 1408)]


def _logits(g, T, E, dtype=torch.float32):
    return randn(g, T, E, dtype=dtype, scale=2.0)


def _route_cases(shapes):
    out = []
    for name, T, E, k, ng, tg, _, _ in shapes:
        for scoring in ("sigmoid", "softmax"):
            def build(g, T=T, E=E, k=k, ng=ng, tg=tg, scoring=scoring):
                bias = torch.rand(E, generator=g) * 0.1 if scoring == "sigmoid" else None
                return (_logits(g, T, E),), dict(top_k=k, scoring=scoring, correction_bias=bias, n_group=ng,
                                                 topk_group=tg, renormalize=True, scaling_factor=2.5)
            out.append(Case("moe_route", f"{name}_{scoring}", build, ("groups",) if ng > 1 else ()))
    return out


def _route_edges():
    def bf16(g):
        return (_logits(g, 11, 16, torch.bfloat16),), dict(top_k=4, scoring="sigmoid",
                                                           correction_bias=torch.rand(16, generator=g) * 0.1,
                                                           n_group=4, topk_group=2, renormalize=False,
                                                           scaling_factor=1.0)

    def nan_inf(g):
        x = _logits(g, 6, 8)
        x[1, 3], x[2, 0], x[4, 5] = float("nan"), float("inf"), float("-inf")
        return (x,), dict(top_k=3, scoring="sigmoid", correction_bias=None, n_group=1, topk_group=1,
                          renormalize=True, scaling_factor=1.0)

    def one_expert(g):
        x = _logits(g, 7, 8)
        x[:, 5] += 50.0                                   # every token's best expert is 5
        return (x,), dict(top_k=1, scoring="softmax", correction_bias=None, n_group=1, topk_group=1,
                          renormalize=True, scaling_factor=1.0)

    def fp16(g):
        return (_logits(g, 5, 8, torch.float16),), dict(top_k=2, scoring="softmax", correction_bias=None, n_group=1,
                                                        topk_group=1, renormalize=False, scaling_factor=1.0)

    return [Case("moe_route", "bf16_grouped", bf16, ("bf16", "groups")),
            Case("moe_route", "fp16_softmax", fp16, ("fp16",)),
            Case("moe_route", "nan_inf_logits", nan_inf, ("nan", "inf")),
            Case("moe_route", "all_to_one_expert", one_expert, ("one_expert",))]


def _ids(g, T, E, k, *, drop=0.0, hot=None):
    scores = torch.rand(T, E, generator=g)
    if hot is not None:
        scores[:, hot] += 10
    ids = scores.argsort(dim=-1, descending=True)[:, :k].to(torch.int32)
    if drop:
        ids[torch.rand(T, k, generator=g) < drop] = -1
    return ids


def _dispatch_cases(shapes, level):
    out = []
    for name, T, E, k, _, _, H, _ in shapes:
        for align in ((1, 4) if level == "quick" else (1, 128)):
            def build(g, T=T, E=E, k=k, H=H, align=align):
                return (randn(g, T, H, dtype=torch.bfloat16), _ids(g, T, E, k), E), dict(align=align)
            out.append(Case("moe_dispatch", f"{name}_align{align}", build))
    if level == "quick":
        out.append(Case("moe_dispatch", "dropped_ids_and_empty_experts",
                        lambda g: ((randn(g, 10, 32), _ids(g, 10, 16, 2, drop=0.3), 16), dict(align=8)),
                        ("minus_one", "empty_experts")))
        out.append(Case("moe_dispatch", "all_to_one_expert",
                        lambda g: ((randn(g, 9, 32, dtype=torch.float16), _ids(g, 9, 8, 1, hot=3), 8), dict(align=1)),
                        ("one_expert", "fp16")))
    return out


def _weights(g, E, I, H, fp8, scale=0.05):
    from hal.backends.cpu import KERNELS
    w_gu, w_d = randn(g, E, 2 * I, H, scale=scale), randn(g, E, H, I, scale=scale)
    if not fp8:
        return w_gu.bfloat16(), w_d.bfloat16(), {}
    qg = [KERNELS["fp8_quantize_weight"](w, block=128) for w in w_gu]
    qd = [KERNELS["fp8_quantize_weight"](w, block=128) for w in w_d]
    return (torch.stack([q for q, _ in qg]), torch.stack([q for q, _ in qd]),
            {"w_gate_up_scale": torch.stack([s for _, s in qg]), "w_down_scale": torch.stack([s for _, s in qd])})


def _plan(g, T, E, k, H, *, align=1, drop=0.0, hot=None, dtype=torch.bfloat16):
    from hal.backends.cpu import KERNELS
    return KERNELS["moe_dispatch"](randn(g, T, H, dtype=dtype), _ids(g, T, E, k, drop=drop, hot=hot), E, align=align)


def _experts_cases(shapes, level):
    out = []
    for name, T, E, k, _, _, H, I in shapes:
        for fp8 in (False, True):
            if level == "full" and E > 64:
                E_, T_ = 32, 64                 # full: real H and I, a slice of the experts and tokens
            else:
                E_, T_ = E, T

            def build(g, T=T_, E=E_, k=k, H=H, I=I, fp8=fp8):
                plan = _plan(g, T, E, k, H, align=1 if not fp8 else 4, drop=0.1 if T > 2 else 0.0)
                w_gu, w_d, scales = _weights(g, E, I, H, fp8)
                return (plan, w_gu, w_d), dict(activation="silu", **scales)
            out.append(Case("moe_experts", f"{name}_{'fp8' if fp8 else 'bf16'}", build, ("fp8",) if fp8 else ()))
    if level == "quick":
        for dtype in (torch.float16, torch.float32):          # non-bf16 activations with same-dtype weights
            def other_dtype(g, dtype=dtype):
                plan = _plan(g, 7, 4, 2, 64, align=2, drop=0.1, dtype=dtype)
                w_gu, w_d = randn(g, 4, 64, 64, dtype=dtype, scale=0.05), randn(g, 4, 64, 32, dtype=dtype, scale=0.05)
                return (plan, w_gu, w_d), dict(activation="silu", w_gate_up_scale=None, w_down_scale=None)
            out.append(Case("moe_experts", f"{str(dtype)[6:]}_activations", other_dtype, (str(dtype)[6:],)))

        def partial(g):                       # H and I not multiples of 128: partial scale blocks
            plan = _plan(g, 6, 4, 2, 160, align=2)
            w_gu, w_d, scales = _weights(g, 4, 72, 160, True)
            return (plan, w_gu, w_d), dict(activation="silu", **scales)
        out.append(Case("moe_experts", "fp8_partial_blocks", partial, ("fp8", "partial_blocks")))
    return out


def _combine_cases(shapes, level):
    out = []
    for name, T, E, k, _, _, H, _ in shapes:
        def build(g, T=T, E=E, k=k, H=H):
            plan = _plan(g, T, E, k, H, align=4, drop=0.2 if T > 2 else 0.0)
            w = torch.rand(T, k, generator=g)
            return (randn(g, plan.hidden.shape[0], H, dtype=torch.bfloat16), plan, w), {}
        out.append(Case("moe_combine", name, build))

    def dense(g, T=shapes[-1][1], E=shapes[-1][2], k=shapes[-1][3], H=shapes[-1][6]):
        plan = _plan(g, T, E, k, H, align=1)          # one row per token copy, as moe_forward builds it
        return (randn(g, plan.hidden.shape[0], H, dtype=torch.bfloat16), plan, torch.rand(T, k, generator=g)), {}
    out.append(Case("moe_combine", "one_row_per_copy", dense))
    for dtype in ((torch.float16, torch.float32) if level == "quick" else ()):
        def other_dtype(g, dtype=dtype):
            plan = _plan(g, 8, 8, 2, 48, align=4, drop=0.2, dtype=dtype)
            return (randn(g, plan.hidden.shape[0], 48, dtype=dtype), plan, torch.rand(8, 2, generator=g)), {}
        out.append(Case("moe_combine", f"{str(dtype)[6:]}_expert_out", other_dtype, (str(dtype)[6:],)))
    return out


def _forward_cases(shapes, level):
    out = []
    for name, T, E, k, ng, tg, H, I in shapes:
        if level == "full":
            E, T = min(E, 64), min(T, 64)       # full: real H/I, fewer experts and tokens (reference time)
            k, ng, tg = min(k, 8), min(ng, 8), min(tg, 4)
        for fp8 in (False, True):
            def build(g, T=T, E=E, k=k, ng=ng, tg=tg, H=H, I=I, fp8=fp8):
                w_gu, w_d, scales = _weights(g, E, I, H, fp8)
                return ((randn(g, T, H, dtype=torch.bfloat16), _logits(g, T, E), w_gu, w_d),
                        dict(top_k=k, scoring="sigmoid", correction_bias=torch.rand(E, generator=g) * 0.1,
                             n_group=ng, topk_group=tg, renormalize=True, scaling_factor=2.5, activation="silu",
                             **scales))
            out.append(Case("moe_forward", f"{name}_{'fp8' if fp8 else 'bf16'}", build))
    if level == "quick":
        def fp32(g, T=5, E=8, H=32, I=16):
            w_gu, w_d = randn(g, E, 2 * I, H, scale=0.05), randn(g, E, H, I, scale=0.05)
            return ((randn(g, T, H), _logits(g, T, E), w_gu, w_d),
                    dict(top_k=2, scoring="softmax", correction_bias=None, n_group=1, topk_group=1, renormalize=True,
                         scaling_factor=1.0, activation="silu", w_gate_up_scale=None, w_down_scale=None))
        out.append(Case("moe_forward", "fp32_softmax", fp32, ("fp32",)))

        def raw_weights(g, T=6, E=8, H=32, I=16):          # renormalize=False: the gates' own scores weight
            w_gu, w_d, _ = _weights(g, E, I, H, False)
            return ((randn(g, T, H, dtype=torch.bfloat16), _logits(g, T, E), w_gu, w_d),
                    dict(top_k=3, scoring="sigmoid", correction_bias=torch.rand(E, generator=g) * 0.1, n_group=2,
                         topk_group=1, renormalize=False, scaling_factor=1.5, activation="silu"))
        out.append(Case("moe_forward", "no_renormalize", raw_weights, ("no_renormalize", "groups")))
    return out


def cases(level: str) -> list[Case]:
    shapes = QUICK_SHAPES if level == "quick" else FULL_SHAPES
    out = _route_cases(shapes) + _dispatch_cases(shapes, level) + _experts_cases(shapes, level)
    out += _combine_cases(shapes, level) + _forward_cases(shapes if level == "full" else shapes[1:], level)
    if level == "quick":
        out += _route_edges()
    return out
