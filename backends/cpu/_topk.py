"""Deterministic ranking for every top-k of the contract.

Order: eligible entries first, then numbers before NaN, then descending score, then lower index.
Each key is one stable sort, least significant first, so every tie falls to the lower index.
"""
import torch


def _stable_reorder(order: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``order`` re-sorted (stably) by ``key`` (bool: False first) read at the positions in order."""
    return order.gather(-1, torch.sort(key.gather(-1, order).to(torch.int8), dim=-1, stable=True).indices)


def ranked(scores: torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [..., n] (int64) of ``scores`` [..., n] ranked best first: entries with
    ``eligible`` True (all when None) before the others, numbers (-inf included) before NaN,
    higher scores first, ties toward the lower index."""
    nan = torch.isnan(scores)
    order = torch.sort(scores.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
    order = _stable_reorder(order, nan)
    if eligible is not None:
        order = _stable_reorder(order, ~eligible)
    return order


def top_k_indices(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``k`` of :func:`ranked` (int64 [..., k])."""
    return ranked(scores, eligible)[..., :k]
