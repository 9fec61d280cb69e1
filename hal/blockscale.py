"""Block scales of FP8 tensors, the one home of their expansion (reference, backends, models).

A tensor ``q [..., rows, cols]`` quantized in blocks of ``block_rows x block_cols`` carries scales
``[..., ceil(rows / block_rows), ceil(cols / block_cols)]``; element (r, c) uses
``scale[r // block_rows, c // block_cols]`` (partial blocks at the edges included). Activations
(1 x 128 groups) are the case ``block_rows = 1``; weights (128 x 128) the default.
"""
from __future__ import annotations

import torch


def expand(scale: torch.Tensor, rows: int, cols: int, block_rows: int = 128, block_cols: int = 128) -> torch.Tensor:
    """Block scales [..., R, C] -> per-element scales [..., rows, cols]."""
    return scale.repeat_interleave(block_rows, -2)[..., :rows, :].repeat_interleave(block_cols, -1)[..., :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block_rows: int = 128, block_cols: int = 128,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q [..., rows, cols]`` (e4m3) times its expanded block scales, in ``dtype``."""
    return q.to(dtype) * expand(scale.to(dtype), q.shape[-2], q.shape[-1], block_rows, block_cols)
