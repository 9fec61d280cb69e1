"""Per-rank inputs of the expert-parallel tests (shared by the DeepEP and MC2 test files)."""
from __future__ import annotations

import torch

POOL = (0, 1, 2, 3, 4, 6, 7)          # expert 5 is never chosen: an expert with no rows


def rank_tokens(g: torch.Generator, rank: int, dtype, H: int, k: int, T=None, pool=POOL):
    """``(x [T, H], x_scale [T, ceil(H/128)] or None, topk_ids [T, k] int32, topk_weights [T, k])``
    for ``rank``: T = 0 on rank 1 and 2 + 3 * rank elsewhere unless given; ids drawn from
    ``pool`` (distinct per token while k fits in it, else with repeats); slot 0 of token 1 is -1;
    e4m3 payloads get 1x128 scales in [0.5, 1.5)."""
    T = (0 if rank == 1 else 2 + 3 * rank) if T is None else T
    pool = torch.tensor(pool)
    pick = (lambda: torch.randperm(len(pool), generator=g)[:k]) if k <= len(pool) else \
        (lambda: torch.randint(0, len(pool), (k,), generator=g))         # more slots than experts: repeats
    ids = torch.stack([pool[pick()] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.int64)
    ids = ids.to(torch.int32)
    if T > 1:
        ids[1, 0] = -1
    x = torch.randn(T, H, generator=g)
    scale = None
    if dtype == torch.float8_e4m3fn:
        x, scale = (x * 40).clamp(-448, 448).to(dtype), torch.rand(T, -(-H // 128), generator=g) + 0.5
    else:
        x = x.to(dtype)
    return x, scale, ids, torch.rand(T, k, generator=g)
