"""Deterministic top-k: descending, ties toward the lower index (a stable sort)."""
import torch


def stable_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] (int64) of the k largest entries along the last dim, ties -> lower index.

    NaN entries must be mapped by the caller (they sort unpredictably relative to -inf)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
