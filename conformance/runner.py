"""Run the case catalog on a backend and judge every output against the contract's budgets."""
from __future__ import annotations

import dataclasses
import hashlib
import time
import traceback
import warnings
from typing import Callable, Optional

import torch

from hal.contract import CONTRACT, DispatchPlan
from hal.conformance import metrics
from hal.conformance.cases import Case, catalog
from hal.binding import to_device
from hal.errors import UnsupportedCase

STATUSES = ("PASS", "FAIL", "ERROR", "UNSUPPORTED", "SKIPPED", "NONDETERMINISTIC", "CORRUPT")
FAILING = ("FAIL", "ERROR", "CORRUPT")
PATHS = ("native", "emulated", "fallback", "absent", "-")


@dataclasses.dataclass
class CaseResult:
    """One op x case on one backend. ``path``: native / emulated / fallback / absent / "-"."""

    backend: str
    label: str
    op: str
    case: str
    status: str
    path: str
    reason: str = ""
    outputs: list = dataclasses.field(default_factory=list)
    traceback: Optional[str] = None
    duration_s: float = 0.0
    tags: tuple = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["outputs"] = [o.to_dict() if hasattr(o, "to_dict") else o for o in self.outputs]
        d["tags"] = list(self.tags)
        return d


def flatten_outputs(out) -> list[torch.Tensor]:
    """An op's return value as a list of tensors in the order of ``spec.outputs``."""
    if isinstance(out, DispatchPlan):
        return list(out.tensors())
    if isinstance(out, tuple):
        return list(out)
    return [out]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8) if t.is_floating_point() and t.numel() else t


def identical(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def _align_paired(got_w, got_ids, ref_ids):
    """Reorder an output that follows a selection's slots (route weights follow expert ids) to the
    reference's order where a row picked the same entries in another order (near-tie swaps), so
    it compares element by element."""
    if got_ids.shape != ref_ids.shape or got_ids.numel() == 0 or got_w.shape != got_ids.shape:
        return got_w
    same = torch.equal(got_ids.sort(-1).values, ref_ids.sort(-1).values)
    if not same or torch.equal(got_ids, ref_ids):
        return got_w
    perm = (ref_ids.long()[:, :, None] == got_ids.long()[:, None, :]).float().argmax(-1)
    return got_w.gather(1, perm)


def judge(op: str, args: tuple, kwargs: dict, got: list, truth: list, ref: list) -> list[metrics.OutputCheck]:
    """Compare a backend's outputs with the float64 truth and the working-precision reference."""
    spec = CONTRACT[op]
    if len(got) != len(ref):
        return [metrics.OutputCheck("outputs", "count", False, f"{len(got)} outputs, expected {len(ref)}")]
    names = list(spec.outputs)[:len(got)]
    score_fn = spec.selection_score_fn()
    selection_scores = score_fn(*args, **kwargs) if score_fn is not None else None
    got = list(got)
    for out_name, sel_name in spec.paired.items():
        i, j = names.index(out_name), names.index(sel_name)
        got[i] = _align_paired(got[i], got[j], ref[j])
    checks = []
    for (name, budget), g, t, r in zip(spec.outputs.items(), got, truth, ref):
        kind = metrics.budget_kind(budget)
        if kind == "exact":
            checks.append(metrics.check_exact(name, g, r))
        elif kind == "selection":
            checks.append(metrics.check_selection(name, g, r, *selection_scores, budget))
        else:
            checks.append(metrics.check_float(name, g, t, r, budget))
    return checks


def reference_outputs(case: Case, args, kwargs):
    """(truth, ref): the reference evaluated in float64 and at its working precision."""
    from hal.backends.cpu import KERNELS, float64_evaluation
    kernel = KERNELS[case.op]
    with float64_evaluation():
        truth = flatten_outputs(kernel(*args, **kwargs))
    ref = flatten_outputs(kernel(*args, **kwargs))
    return truth, ref


FALLBACKS = ("error", "reference")


class BoundBackend:
    """A backend's ops bound for certification, with validation on.

    ``fallback="error"`` (the default, strict): only the backend's own kernels are bound; an op it
    does not implement has path ``absent`` and its cases are UNSUPPORTED, and a per-call refusal
    of its capability's ``supports()`` surfaces as :class:`hal.UnsupportedCase` -> UNSUPPORTED.
    (``hal.runtime(name, fallback="error")`` itself refuses to bind a backend that lacks any op,
    so strict mode binds op by op with the same :func:`hal.binding.make_bound_op`.)
    ``fallback="reference"``: the ops are those of ``hal.runtime(name, fallback="reference")``,
    exactly what an application gets: a missing op runs the CPU reference (path ``fallback``)
    and a refused call does too; each such case is recorded with path ``fallback``.
    """

    def __init__(self, record, fallback: str = "error"):
        from hal.binding import make_bound_op
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        self.record, self.fallback = record, fallback
        self.name, self.label = record.name, record.label
        backend = record.backend
        self.device = torch.device(backend.device_type)
        self.ops, self.paths, self.notes, self.entries = {}, {}, {}, {}
        if fallback == "reference":
            from hal.binding import Runtime
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)       # the plan records it instead
                rt = Runtime(record, fallback="reference")
            for entry in rt.plan():
                self.ops[entry.op] = getattr(rt, entry.op)
                self.paths[entry.op], self.notes[entry.op], self.entries[entry.op] = entry.path, entry.reason, entry
            return
        kernels, caps = backend.kernels(), dict(backend.capabilities())
        for op, spec in CONTRACT.items():
            if op in kernels and op in caps:
                cap = caps[op]
                self.ops[op] = make_bound_op(spec, kernels[op], supports=cap.supports, backend_name=self.name)
                self.paths[op], self.notes[op] = cap.path, cap.note
            else:
                self.paths[op], self.notes[op] = "absent", f"backend {self.name!r} does not implement {op}"

    def plan(self) -> list[dict]:
        """The runtime plan: op -> backend, path, reason, label (what every report carries)."""
        out = []
        for op in CONTRACT:
            e = self.entries.get(op)
            out.append({"op": op, "backend": e.backend if e else self.name, "path": self.paths[op],
                        "reason": self.notes[op], "label": e.label if e else self.label})
        return out

    def fallback_calls(self, op: str) -> int:
        """How many calls of ``op`` the runtime sent to the reference after a refusal so far."""
        e = self.entries.get(op)
        return e.fallback_calls if e is not None else 0


def run_case(bound: BoundBackend, case: Case, seed: int) -> CaseResult:
    """Run one case twice on the backend and judge it."""
    t0 = time.perf_counter()
    res = CaseResult(bound.name, bound.label, case.op, case.name, "PASS", bound.paths[case.op], tags=case.tags)
    if case.op not in bound.ops:
        res.status, res.reason = "UNSUPPORTED", bound.notes[case.op]
        return res
    try:
        args, kwargs = case.materialize(seed)
        truth, ref = reference_outputs(case, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - a catalog/reference problem is reported, not hidden
        res.status, res.traceback = "ERROR", traceback.format_exc()
        res.reason = f"reference failed: {type(exc).__name__}: {exc}"
        return res
    run_and_judge(bound, case.op, args, kwargs, truth, ref, res)
    res.duration_s = time.perf_counter() - t0
    return res


def run_and_judge(bound: BoundBackend, op: str, args, kwargs, truth, ref, res: CaseResult) -> None:
    """Run ``op`` twice on the backend and set ``res``: PASS / FAIL / NONDETERMINISTIC /
    UNSUPPORTED / ERROR, with the per-output checks.

    Before any numeric comparison, each call is held to two guards (either one is a FAIL):
    it must leave every input as it found it (:func:`input_digests` before and after the call,
    bitwise, DispatchPlan fields included), and its outputs must have the count, shapes and
    dtypes ``CONTRACT[op].expected_outputs`` states (:func:`metrics.check_output_layout`)."""
    fn = bound.ops[op]
    runs = []
    refused_before = bound.fallback_calls(op)
    try:
        expected = CONTRACT[op].expected_outputs(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the contract's own meta failing is reported, not hidden
        res.status, res.traceback = "ERROR", traceback.format_exc()
        res.reason = f"the contract's expected outputs failed: {type(exc).__name__}: {exc}"
        return
    try:
        with warnings.catch_warnings():
            # a per-call fallback is recorded as this case's path instead of warned about
            warnings.filterwarnings("ignore", message="hal: .* fell back to the CPU reference", category=RuntimeWarning)
            for _ in range(2):
                dev_args = to_device(args, bound.device)
                dev_kwargs = {k: to_device(v, bound.device) for k, v in kwargs.items()}
                before = input_digests(op, dev_args, dev_kwargs)
                out = fn(*dev_args, **dev_kwargs)
                mutated = [name for name, d in input_digests(op, dev_args, dev_kwargs).items() if before.get(name) != d]
                if mutated:
                    res.status = "FAIL"
                    res.reason = "mutated input " + ", ".join(mutated) + " (the kernel must leave its inputs unchanged)"
                    res.outputs = [metrics.OutputCheck(name, "input", False, "mutated by the kernel")
                                   for name in mutated]
                    return
                flat = flatten_outputs(out)
                layout = metrics.check_output_layout(expected, flat)
                if layout is not None:
                    res.status, res.reason, res.outputs = "FAIL", f"{layout.name}: {layout.message}", [layout]
                    return
                runs.append([t.detach().cpu() for t in flat])
    except UnsupportedCase as exc:
        res.status, res.reason = "UNSUPPORTED", exc.reason
        return
    except Exception as exc:  # noqa: BLE001 - a backend's exception is a result, kept with its traceback
        res.status, res.reason, res.traceback = "ERROR", f"{type(exc).__name__}: {exc}", traceback.format_exc()
        return
    if bound.fallback_calls(op) > refused_before:
        e = bound.entries[op]
        res.path, res.reason = "fallback", f"the backend declined this case ({e.fallback_reason}); ran the CPU reference"
    res.outputs = judge(op, args, kwargs, runs[0], truth, ref)
    failed = [o for o in res.outputs if not o.passed]
    if failed:
        res.status = "FAIL"
        res.reason = "; ".join(f"{o.name}: {o.message}" for o in failed)
    elif not identical(runs[0], runs[1]):
        res.status, res.reason = "NONDETERMINISTIC", "two runs on the same inputs differ bitwise"
    elif res.path == "fallback" and not res.reason:
        res.reason = bound.notes[op]


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and element bytes (bitwise: NaN payloads, -0.0 and
    float8 codes included), read in logical order on the host."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def input_digests(op: str, args: tuple, kwargs: dict) -> dict[str, str]:
    """Argument name -> digest of every tensor argument of a call (a DispatchPlan as its tensors
    ``plan.hidden`` ... and its integer fields), for checking that a kernel left them alone."""
    bound = CONTRACT[op].signature.bind(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            out[name] = tensor_digest(value)
        elif isinstance(value, DispatchPlan):
            for field in dataclasses.fields(value):
                v = getattr(value, field.name)
                out[f"{name}.{field.name}"] = tensor_digest(v) if isinstance(v, torch.Tensor) else repr(v)
    return out


@dataclasses.dataclass
class BackendRun:
    """Everything certified for one backend."""

    backend: str
    label: str
    status: str                       # the registry status (available / unavailable / ...)
    reason: str
    device: str
    versions: dict
    plan: list
    results: list
    fallback: str = "error"           # the policy the ops were bound with (see BoundBackend)

    def counts(self) -> dict:
        c = {s: 0 for s in STATUSES}
        for r in self.results:
            c[r.status] += 1
        return c

    def path_counts(self) -> dict:
        """How many cases ran on each path (native / emulated / fallback / absent / "-")."""
        c = {p: 0 for p in PATHS}
        for r in self.results:
            c[r.path] += 1
        return c

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["results"] = [r.to_dict() for r in self.results]
        d["counts"] = self.counts()
        d["paths"] = self.path_counts()
        return d


def certify(backend: str, *, level: str = "quick", ops=None, seed: int = 0, fallback: str = "error",
            progress: Optional[Callable[[CaseResult], None]] = None, cases=None) -> BackendRun:
    """Certify ``backend`` on the catalog (or ``cases``); unavailable backends get SKIPPED cases.

    ``fallback``: "error" (strict: missing or declined ops are UNSUPPORTED) or "reference" (what
    ``hal.runtime`` does by default: they run the CPU reference, recorded with path ``fallback``)."""
    from hal.registry import get_registry
    rec = get_registry().record(backend)
    chosen = cases if cases is not None else catalog(level, ops)
    av = rec.availability
    run = BackendRun(rec.name, rec.label, rec.status, rec.reason, av.device if av else "",
                     dict(av.versions) if av else {}, [], [], fallback)
    if rec.status != "available":
        for c in chosen:
            r = CaseResult(rec.name, rec.label, c.op, c.name, "SKIPPED", "-", f"backend {rec.status}: {rec.reason}",
                           tags=c.tags)
            run.results.append(r)
            if progress:
                progress(r)
        return run
    bound = BoundBackend(rec, fallback)
    run.plan = bound.plan()
    for c in chosen:
        r = run_case(bound, c, seed)
        run.results.append(r)
        if progress:
            progress(r)
    return run
