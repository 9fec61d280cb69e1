"""Working precision of the reference kernels.

By default the reference computes like a careful kernel: fp32 accumulation, outputs in the
contract's dtypes (and intermediates rounded where the contract says real kernels round them).
Inside ``float64_evaluation()`` every computation runs in float64, nothing is rounded to a
narrower dtype, and float outputs come back as float64: the "float64 evaluation of the
reference" the conformance metrics compare against. Rounding that *is* the op's semantics
(the cast to float8_e4m3fn in quantization) still happens.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


def exact() -> bool:
    """True inside :func:`float64_evaluation`."""
    return getattr(_state, "exact", False)


@contextlib.contextmanager
def float64_evaluation():
    """Run reference kernels in float64 with no intermediate or output rounding."""
    prev = exact()
    _state.exact = True
    try:
        yield
    finally:
        _state.exact = prev


def acc() -> torch.dtype:
    """The accumulation dtype: fp32, or fp64 in the float64 evaluation."""
    return torch.float64 if exact() else torch.float32


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` (an intermediate or output), or kept in fp64 when exact."""
    return t if exact() else t.to(dtype)


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [N, K].T`` in the accumulation dtype. The operands are made contiguous so the
    BLAS summation order (and so the last bit) never depends on how the inputs are laid out."""
    return a.to(acc()).contiguous() @ b.to(acc()).contiguous().T
