"""Conformance metrics, exactly as docs/contract.md "Conformance metrics" states them.

Float outputs are compared with the float64 evaluation of the reference ("truth"): calc_diff,
max abs error, max relative error, and the NaN/Inf pattern, which must match exactly. A backend
passes when its error is within the op's budget: ``multiple`` x the error of the reference run at
its working precision, plus an absolute floor (budgets live in ``hal.CONTRACT[op].outputs``).
Index outputs compare by the scores of the selected set; dispatch plans compare exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from hal.contract import ExactBudget, FloatBudget, SelectionBudget
from hal.conformance.scores import F64_MAX


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's ``1 - 2*sum(x*y) / sum(x*x + y*y)`` in float64 over finite positions (0 = equal)."""
    x, y = x.double().flatten(), y.double().flatten()
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


@dataclasses.dataclass
class OutputCheck:
    """The verdict for one output of one case."""

    name: str
    kind: str
    passed: bool
    message: str = ""
    calc_diff: Optional[float] = None
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None
    ref_calc_diff: Optional[float] = None
    ref_max_abs: Optional[float] = None
    budget_abs: Optional[float] = None
    budget_calc_diff: Optional[float] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _errors(x: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    x, t = x.double(), truth.double()
    keep = torch.isfinite(x) & torch.isfinite(t)
    if not keep.any():
        return 0.0, 0.0, 0.0
    d = (x[keep] - t[keep]).abs()
    rel = d / t[keep].abs().clamp_min(1e-30)
    return calc_diff(x, t), float(d.max()), float(rel.max())


def nonfinite_mismatch(x: torch.Tensor, truth: torch.Tensor) -> Optional[str]:
    """None when NaN positions and +-Inf positions match exactly, else a description."""
    x, t = x.double(), truth.double()
    for what, fx, ft in (("NaN", torch.isnan(x), torch.isnan(t)),
                         ("+Inf", x == float("inf"), t == float("inf")),
                         ("-Inf", x == float("-inf"), t == float("-inf"))):
        bad = fx != ft
        if bad.any():
            pos = tuple(bad.nonzero()[0].tolist())
            return f"{what} pattern differs ({int(bad.sum())} positions, first at {pos})"
    return None


def check_output_layout(expected: list, got: list) -> Optional[OutputCheck]:
    """The contract's output layout before any numbers: ``expected`` is
    ``CONTRACT[op].expected_outputs(...)`` (``[(name, shape, dtype)]``, ``None`` in a shape for
    a data-dependent extent), ``got`` the backend's flattened outputs. None when the count, every
    shape and every dtype match; else a failed check naming the first output that does not
    (expected vs got)."""
    if len(got) != len(expected):
        return OutputCheck("outputs", "layout", False, f"expected {len(expected)} output(s) "
                           f"({', '.join(n for n, _, _ in expected)}), got {len(got)}")
    for (name, shape, dtype), g in zip(expected, got):
        if not isinstance(g, torch.Tensor):
            return OutputCheck(name, "layout", False, f"expected a tensor, got {type(g).__name__}")
        fits = len(g.shape) == len(shape) and all(w is None or w == x for w, x in zip(shape, g.shape))
        if not fits or g.dtype != dtype:
            want = "(" + ", ".join("N" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
            return OutputCheck(name, "layout", False, f"expected shape {want} {str(dtype)[6:]}, "
                               f"got shape {tuple(g.shape)} {str(g.dtype)[6:]}")
    return None


def check_float(name: str, got: torch.Tensor, truth: torch.Tensor, ref: torch.Tensor, budget: FloatBudget) -> OutputCheck:
    """A float output against the float64 truth, budgeted by the reference's own error."""
    if tuple(got.shape) != tuple(truth.shape):
        return OutputCheck(name, "float", False, f"shape {tuple(got.shape)} != {tuple(truth.shape)}")
    if budget.kind == "fp8":
        return check_fp8_codes(name, got, ref)
    if got.dtype != ref.dtype:
        return OutputCheck(name, "float", False, f"dtype {got.dtype} != {ref.dtype}")
    cd, mabs, mrel = _errors(got, truth)
    rcd, rabs, _ = _errors(ref, truth)
    b_abs = budget.multiple * rabs + budget.abs_floor
    b_cd = budget.multiple * max(rcd, 0.0) + budget.calc_diff_floor
    if budget.calc_diff_max is not None:
        b_cd = min(b_cd, budget.calc_diff_max)
    chk = OutputCheck(name, "float", True, "", cd, mabs, mrel, rcd, rabs, b_abs, b_cd)
    bad = nonfinite_mismatch(got, truth)
    if bad:
        chk.passed, chk.message = False, bad
    elif mabs > b_abs:
        chk.passed, chk.message = False, f"max abs error {mabs:.3g} > budget {b_abs:.3g} (reference: {rabs:.3g})"
    elif cd > b_cd:
        chk.passed, chk.message = False, f"calc_diff {cd:.3g} > budget {b_cd:.3g} (reference: {rcd:.3g})"
    return chk


def check_fp8_codes(name: str, got: torch.Tensor, ref: torch.Tensor) -> OutputCheck:
    """Quantized e4m3 codes equal the reference's, except one-step differences at rounding ties
    (x/s vs x*(1/s)) on at most 0.1% of the elements; NaN positions exactly."""
    if got.dtype != torch.float8_e4m3fn:
        return OutputCheck(name, "fp8", False, f"dtype {got.dtype} != float8_e4m3fn")
    g, r = got.float(), ref.float()
    bad = nonfinite_mismatch(g, r)
    if bad:
        return OutputCheck(name, "fp8", False, bad)
    diff = (g != r) & ~torch.isnan(r)
    n = int(diff.sum())
    if n == 0:
        return OutputCheck(name, "fp8", True, "codes equal", max_abs=0.0)
    codes_g, codes_r = got.view(torch.uint8).int(), ref.view(torch.uint8).int()
    one_step = ((codes_g - codes_r).abs() <= 1) & ((codes_g ^ codes_r) & 0x80 == 0)
    max_abs = float((g - r).abs()[diff].max())
    if bool(one_step[diff].all()) and n <= max(1, int(0.001 * g.numel())):
        return OutputCheck(name, "fp8", True, f"{n} code(s) one e4m3 step apart (rounding ties)", max_abs=max_abs)
    return OutputCheck(name, "fp8", False, f"{n} of {g.numel()} codes differ (max abs {max_abs:.3g})",
                       max_abs=max_abs)


def check_exact(name: str, got: torch.Tensor, ref: torch.Tensor) -> OutputCheck:
    """Integer bookkeeping (and permuted copies) equal bit for bit."""
    if got.dtype != ref.dtype or tuple(got.shape) != tuple(ref.shape):
        return OutputCheck(name, "exact", False, f"{got.dtype}{tuple(got.shape)} != {ref.dtype}{tuple(ref.shape)}")
    if got.numel() == 0:                    # nothing to compare (and an empty golden tensor may have stride 0)
        return OutputCheck(name, "exact", True, "equal (empty)")
    if got.is_floating_point():
        a, b = got.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8)
    else:
        a, b = got, ref
    if torch.equal(a, b):
        return OutputCheck(name, "exact", True, "equal")
    n = int((got != ref).sum()) if not got.is_floating_point() else int((a != b).sum())
    return OutputCheck(name, "exact", False, f"{n} element(s) differ")


def check_selection(name: str, got: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, selectable: torch.Tensor,
                    budget: SelectionBudget) -> OutputCheck:
    """Top-k indices judged by the scores of the selected set.

    ``scores`` [..., n] float64 rank values (:func:`hal.conformance.scores.rank_values`: NaN
    below -inf), ``selectable`` [..., n] bool (visible keys,
    experts of kept groups), ``got``/``ref`` [..., k] int with -1
    tails. Passes when the -1 positions equal the reference's, every row has no duplicates, every
    selected entry is selectable and scores >= the reference's k-th best score minus the tolerance,
    and the selected scores are in descending order (within the tolerance)."""
    if got.dtype != ref.dtype or tuple(got.shape) != tuple(ref.shape):
        return OutputCheck(name, "selection", False, f"{got.dtype}{tuple(got.shape)} != {ref.dtype}{tuple(ref.shape)}")
    if not torch.equal(got < 0, ref < 0):
        return OutputCheck(name, "selection", False, "the -1 tail differs from the reference")
    if got.numel() == 0:
        return OutputCheck(name, "selection", True, "empty")
    k, n = got.shape[-1], scores.shape[-1]
    g, r = got.reshape(-1, k).long(), ref.reshape(-1, k).long()
    s = scores.reshape(-1, n).double()
    if bool((g >= n).any()):
        return OutputCheck(name, "selection", False, f"an index >= {n}")
    valid = g >= 0
    ok = selectable.reshape(-1, n).gather(1, g.clamp_min(0))
    if bool((valid & ~ok).any()):
        row, col = (valid & ~ok).nonzero()[0].tolist()
        return OutputCheck(name, "selection", False, f"row {row} slot {col} selects index {int(g[row, col])}, "
                           "which is not selectable (masked key or dropped group)")
    finite = s[torch.isfinite(s) & (s.abs() < F64_MAX)]            # real numbers, not mapped +-inf
    tol = budget.score_rtol * (float(finite.abs().max()) if finite.numel() else 0.0) + budget.score_atol
    srt = torch.sort(g.masked_fill(~valid, -1), dim=-1).values
    if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
        return OutputCheck(name, "selection", False, "duplicate indices in a row")
    gs = s.gather(1, g.clamp_min(0))
    rs = s.gather(1, r.clamp_min(0))
    kth = torch.where(valid, rs, float("inf")).min(-1, keepdim=True).values      # worst selected ref score
    lowest_ok = torch.where(torch.isfinite(kth), kth - tol, kth)
    worse = valid & ~(gs >= lowest_ok)
    if bool(worse.any()):
        row, col = worse.nonzero()[0].tolist()
        return OutputCheck(name, "selection", False, f"row {row} slot {col} selects index {int(g[row, col])} with score "
                           f"{float(gs[row, col]):.6g} < the reference's k-th best {float(kth[row, 0]):.6g} - {tol:.3g}")
    order = valid[:, 1:] & ((gs[:, 1:] - gs[:, :-1]) > tol)
    if bool(order.any()):
        row = int(order.nonzero()[0, 0])
        return OutputCheck(name, "selection", False, f"row {row} is not in descending score order")
    # exact ties (equal scores, e.g. relu zeros) follow the contract's rule: lower index first, and
    # at the cut no unselected selectable key ties the last selected score with a lower index
    tie_wrong = valid[:, 1:] & (gs[:, 1:] == gs[:, :-1]) & (g[:, 1:] < g[:, :-1])
    last = torch.where(valid, gs, float("nan")).nan_to_num(nan=float("inf")).min(-1).values
    chosen = torch.zeros_like(selectable.reshape(-1, n)).scatter_(1, g.clamp_min(0), valid)
    idx = torch.arange(n).expand_as(s)
    max_at_last = torch.where(valid & (gs == last[:, None]), g, -1).max(-1).values
    skipped = selectable.reshape(-1, n) & ~chosen & (s == last[:, None]) & (idx < max_at_last[:, None])
    if bool(tie_wrong.any()) or bool(skipped.any()):
        row = int((tie_wrong.any(-1) | skipped.any(-1)).nonzero()[0, 0])
        return OutputCheck(name, "selection", False, f"row {row} breaks an exact score tie toward a higher index "
                           "(the contract breaks ties toward the lower index)")
    swaps = int((g != r).sum())
    return OutputCheck(name, "selection", True, f"{swaps} position(s) differ within near-ties" if swaps else "equal")


def budget_kind(b) -> str:
    if isinstance(b, ExactBudget):
        return "exact"
    if isinstance(b, SelectionBudget):
        return "selection"
    return "fp8" if b.kind == "fp8" else "float"
