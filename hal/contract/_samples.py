"""Building blocks of the contract's sample arguments (``OpSpec.sample``): small, valid, seeded,
never zero. Samples exercise the op's plumbing (overhead benchmark, generated-op tests); the
conformance catalog, not these, exercises its numerics."""
from __future__ import annotations

import torch


def rnd(g: torch.Generator, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Standard-normal values times ``scale``, cast to ``dtype``."""
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def fp8_codes(g: torch.Generator, *shape) -> torch.Tensor:
    """Random float8_e4m3fn values inside the e4m3 range."""
    return (torch.randn(*shape, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)


def scales(g: torch.Generator, *shape) -> torch.Tensor:
    """Random finite, positive fp32 block scales."""
    return torch.rand(*shape, generator=g) * 0.01 + 1e-3


def plan_fields(g: torch.Generator, T: int, k: int, E: int, H: int):
    """A consistent (align 1) DispatchPlan's fields for random expert ids: hidden [T*k, H],
    tokens_per_expert [E], offsets [E+1], source [T*k], rows grouped by expert then copy."""
    ids = torch.randint(0, E, (T * k,), generator=g)
    source = torch.sort(ids, stable=True).indices
    counts = torch.bincount(ids, minlength=E).to(torch.int32)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    return rnd(g, T * k, H), counts, offsets, source.to(torch.int64)
