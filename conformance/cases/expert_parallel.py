"""Cases for expert parallelism (ep_dispatch, ep_combine) in one process (the group ``"local"``,
world size 1). The exchange between ranks is exercised over gloo groups of 2 and 4 processes by
``tests/test_ep_ops.py``; these cases hold a backend to the ops' layout and reduction rules.
"""
from __future__ import annotations

import torch

from hal.conformance.cases._case import Case, randn

# (name, T, H, E, k, dtype, fp8)
DISPATCH_QUICK = [("T0", 0, 32, 4, 2, torch.bfloat16, False), ("T1", 1, 32, 4, 2, torch.float32, False),
                  ("ragged_minus1", 9, 48, 6, 3, torch.bfloat16, False), ("fp16", 5, 16, 4, 1, torch.float16, False),
                  ("fp8_payload_H200", 6, 200, 8, 2, None, True)]
# DeepSeek-V3.2 / GLM-5 at EP 1: 256 experts, top-8, hidden 7168; GLM-4.5: 160 experts, hidden 5120
DISPATCH_FULL = [("dsv32_T256", 256, 7168, 256, 8, torch.bfloat16, False),
                 ("dsv32_fp8_T256", 256, 7168, 256, 8, None, True),
                 ("glm45_T512", 512, 5120, 160, 8, torch.bfloat16, False)]


def _ids(g, T, E, k, minus_one: bool):
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.empty(0, k)
    ids = ids.to(torch.int32)
    if minus_one and T > 2:
        ids[1, -1] = -1
        ids[2, :] = -1                                 # a token that goes nowhere
    return ids


def _dispatch_case(name, T, H, E, k, dtype, fp8, *, permuted=False):
    def build(g):
        ids = _ids(g, T, E, k, minus_one=True)
        kw = dict(num_experts=E, group="local")
        if permuted:
            kw["expert_map"] = torch.zeros(E, dtype=torch.int32)
        if fp8:
            x = (torch.randn(T, H, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
            kw["x_scale"] = torch.rand(T, -(-H // 128), generator=g) + 1e-3
            return (x, ids), kw
        return (randn(g, T, H, dtype=dtype), ids), kw
    return Case("ep_dispatch", name, build, ("fp8",) if fp8 else ())


def _combine_case(name, T, H, k, dtype, *, R=None, weights_dtype=torch.float32, nan_unused=False):
    def build(g):
        pairs = torch.randperm(T * k, generator=g)
        n = len(pairs) if R is None else min(R, len(pairs))
        pairs = pairs[:n]
        source = torch.stack([torch.zeros(n, dtype=torch.int64), pairs // k, pairs % k], 1).to(torch.int32)
        weights = torch.rand(T, k, generator=g).to(weights_dtype)
        if nan_unused and T * k > n:
            unused = torch.ones(T * k, dtype=torch.bool)
            unused[pairs] = False
            weights.view(-1)[unused] = float("nan")       # a slot without a row adds nothing, even a NaN weight
        return (randn(g, n, H, dtype=dtype), source, weights), dict(group="local")
    return Case("ep_combine", name, build)


def cases(level: str) -> list[Case]:
    if level == "full":
        return [_dispatch_case(*c) for c in DISPATCH_FULL] + \
            [_combine_case("dsv32_T256", 256, 7168, 8, torch.bfloat16),
             _combine_case("glm45_T512_dropped_slots", 512, 5120, 8, torch.bfloat16, R=3000)]
    return [_dispatch_case(*c) for c in DISPATCH_QUICK] + \
        [_dispatch_case("explicit_expert_map", 7, 32, 5, 2, torch.float32, False, permuted=True),
         _combine_case("T0", 0, 16, 2, torch.bfloat16), _combine_case("all_rows_fp32", 6, 24, 3, torch.float32),
         _combine_case("dropped_slots_bf16", 8, 40, 4, torch.bfloat16, R=19),
         _combine_case("nan_weight_unused_slot", 5, 16, 3, torch.float32, R=9, nan_unused=True),
         _combine_case("bf16_weights", 4, 16, 2, torch.bfloat16, weights_dtype=torch.bfloat16)]
