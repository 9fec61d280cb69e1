"""Small validation helpers shared by the op specs. Each raises ContractError(op, arg, ...)."""
from __future__ import annotations

import torch

from hal.errors import ContractError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
INT_DTYPES = (torch.int32, torch.int64)

# Upper bounds on integer arguments that size allocations. Each is far above what any supported
# model uses (256 experts, top-8 routing, top-2048 keys, 128-wide groups and blocks, segments
# aligned to at most 128 rows), and low enough that a typo (2**40) is a ContractError naming the
# argument instead of an allocator error or an out-of-memory kill.
MAX_EXPERTS = 2 ** 16        # num_experts, experts in a plan
MAX_TOP_K = 2 ** 16          # top_k of the indexer (or L, when L is larger), plan.top_k
MAX_GROUP = 2 ** 16          # fp8 group_size and block
MAX_ALIGN = 2 ** 10          # dispatch segment alignment


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def tensor(op: str, arg: str, t, *, ndim: int | None = None, dtypes=None, min_ndim: int | None = None,
           dims: str = "") -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank and dtype; ``dims`` names the axes."""
    if not isinstance(t, torch.Tensor):
        raise ContractError(op, arg, "a torch.Tensor", type(t).__name__)
    if ndim is not None and t.dim() != ndim:
        raise ContractError(op, arg, f"a {ndim}-D tensor {dims}".rstrip(), f"shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ContractError(op, arg, f"a tensor of rank >= {min_ndim} {dims}".rstrip(), f"shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ContractError(op, arg, "dtype " + " or ".join(_dt(d) for d in dtypes), _dt(t.dtype))
    return t


def shape(op: str, arg: str, t: torch.Tensor, expected: tuple, names: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        want = f"shape {tuple(expected)}" + (f" {names}" if names else "")
        raise ContractError(op, arg, want, f"shape {tuple(t.shape)}")


def same_device(op: str, ref_arg: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise ContractError(op, name, "a tensor or None", f"{type(t).__name__}")
        if t is not None and t.device != ref.device:
            raise ContractError(op, name, f"a tensor on {ref.device} (the device of {ref_arg})", f"device {t.device}")


def integer(op: str, arg: str, v, *, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ContractError(op, arg, "an int", f"{type(v).__name__} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = what or (f"{lo} <= {arg} <= {hi}" if hi is not None else f"{arg} >= {lo}")
        raise ContractError(op, arg, rng, v)
    return v


def number(op: str, arg: str, v, *, finite: bool = True, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ContractError(op, arg, "a float", f"{type(v).__name__} {v!r}")
    if finite and not (float("-inf") < float(v) < float("inf")):
        raise ContractError(op, arg, "a finite number", v)
    if positive and not v > 0:
        raise ContractError(op, arg, "a positive number", v)
    return float(v)


def choice(op: str, arg: str, v, options) -> None:
    if v not in options:
        raise ContractError(op, arg, "one of " + ", ".join(repr(o) for o in options), repr(v))


def boolean(op: str, arg: str, v) -> None:
    if not isinstance(v, bool):
        raise ContractError(op, arg, "a bool", f"{type(v).__name__} {v!r}")


def finite_positive_scales(op: str, arg: str, s: torch.Tensor) -> None:
    """Block scales must be finite and > 0 (a data check: CPU or checked mode only)."""
    if not s.numel():
        return
    lo, hi = torch.aminmax(s)
    if not (0 < lo.item() and hi.item() < float("inf")):            # a NaN fails both comparisons
        bad = s[~(torch.isfinite(s) & (s > 0))].flatten()[:3].tolist()
        raise ContractError(op, arg, "finite positive scales", f"values such as {bad}")


def value_range(op: str, arg: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Integer data check: every value of ``t`` in [lo, hi] (``what`` says so in the message)."""
    if not t.numel():
        return
    mn, mx = (v.item() for v in torch.aminmax(t))
    if mn < lo or mx > hi:
        raise ContractError(op, arg, what, f"a value {mn if mn < lo else mx}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
