"""Binding: every contract op bound to one kernel, once (what `hal.runtime(...)` returns).

``hal.runtime(backend="auto", fallback="reference", profile=False)`` resolves, for each op of the
contract, which kernel runs it (the backend's native or emulated kernel, or the CPU reference as a
recorded fallback) and returns a :class:`Runtime` whose attributes are the ops::

    rt = hal.runtime("cuda")
    y = rt.fp8_gemm(a, a_scale, b, b_scale)
    print(rt.plan_table())

Per call, a bound op validates its arguments against the contract and calls the kernel; nothing
is looked up per call. Ops whose capability declares a ``supports(...)`` rule check it per call
and fall back (recorded) or raise according to the policy.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, Callable, Optional

import torch

from hal.contract import CONTRACT, DispatchPlan, OpSpec
from hal import validation_cache
from hal.contract._spec import _CHECKED_HERE, Args, checked_mode
from hal.errors import BackendUnavailable, KernelOutputError, UnsupportedCase
from hal.registry import REFERENCE, BackendRecord, Registry, get_registry

FALLBACKS = ("reference", "error")


@dataclasses.dataclass
class PlanEntry:
    """How one op runs in a runtime: which backend, which path, and why."""

    op: str
    backend: str
    path: str            # "native" | "emulated" | "fallback"
    reason: str
    label: str = ""      # the backend's run label, e.g. "cuda (Triton interpreter, no GPU)"
    calls: int = 0
    total_s: float = 0.0
    fallback_calls: int = 0
    fallback_reason: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def to_device(obj, device):
    """``obj`` with every tensor (and DispatchPlan) in it moved to ``device`` (tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, DispatchPlan):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    return obj


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, DispatchPlan):
            return a.hidden.device
    return torch.device("cpu")


def reference_on_cpu(kernel: Callable) -> Callable:
    """Wrap a reference kernel so it takes tensors on any device: moved to the CPU and back."""

    def run(*args, **kwargs):
        device = _device_of(args, kwargs)
        if device.type == "cpu":
            return kernel(*args, **kwargs)
        out = kernel(*to_device(args, "cpu"), **{k: to_device(v, "cpu") for k, v in kwargs.items()})
        return to_device(out, device)

    return run


def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued work (no-op on the CPU): what profiling and timing need."""
    if device.type != "cpu":
        acc = getattr(torch, "accelerator", None)
        if acc is not None and hasattr(acc, "synchronize"):
            acc.synchronize()


def check_outputs(spec: OpSpec, backend: str, out, arguments: dict) -> None:
    """Raise :class:`hal.errors.KernelOutputError` unless ``out`` has the shapes and dtypes the
    contract gives for the call whose arguments (by parameter name) are ``arguments``
    (``spec.meta``; a ``None`` extent matches any size)."""
    if spec.returns == "plan":
        if not isinstance(out, DispatchPlan):
            raise KernelOutputError(spec.name, backend, "its result", "a hal.DispatchPlan", type(out).__name__)
        flat = list(out.tensors())
    elif spec.returns == "tuple" and isinstance(out, tuple):
        flat = list(out)
    else:
        flat = [out]
    metas = spec.meta(Args(arguments))
    if len(flat) != len(metas):
        raise KernelOutputError(spec.name, backend, "its result", f"{len(metas)} output(s)", f"{len(flat)}")
    for name, m, t in zip(spec.outputs, metas, flat):
        if not isinstance(t, torch.Tensor):
            raise KernelOutputError(spec.name, backend, name, "a tensor", type(t).__name__)
        if t.dtype != m.dtype:
            raise KernelOutputError(spec.name, backend, name, f"dtype {m.dtype}", t.dtype)
        if len(t.shape) != len(m.shape) or any(w is not None and w != g for w, g in zip(m.shape, t.shape)):
            shown = tuple("*" if w is None else w for w in m.shape)
            raise KernelOutputError(spec.name, backend, name, f"shape {shown}", tuple(t.shape))


def make_bound_op(spec: OpSpec, kernel: Callable, *, supports: Optional[Callable] = None,
                  fallback: Optional[Callable] = None, entry: Optional[PlanEntry] = None,
                  profile: bool = False, backend_name: str = "", validate: bool = True,
                  checked: Optional[bool] = None) -> Callable:
    """Build ``spec.name(...)`` with the op's exact signature: validate, then call ``kernel``.

    The function is generated once (so ``help(rt.moe_route)`` shows the contract signature and
    docstring) and passes every argument explicitly, so kernels never depend on defaults.
    Validation is remembered per call signature (:mod:`hal.validation_cache`: every tensor's
    type, shape, strides, dtype, device and dispatch keys, every other argument's value and type)
    when no data-dependent check applies (device tensors outside checked mode), so a decode loop
    pays the structural checks once per shape. In checked mode
    (``checked=True``, or the process default when ``checked`` is None) every output's shape and
    dtype is also compared with the contract (:class:`hal.errors.KernelOutputError`).
    """
    sig = spec.signature
    params = list(sig.parameters.values())
    call = spec.call_source()
    env: dict[str, Any] = {"_validate": spec.validate, "_kernel": kernel, "_supports": supports,
                           "_fallback": fallback, "_entry": entry, "_perf": time.perf_counter,
                           "_sync": sync_device, "_device_of": _device_of, "_Unsupported": UnsupportedCase,
                           "_backend": backend_name, "_op": spec.name, "_warn": _warn_once, "_seen": {},
                           "_checked": checked_mode, "_CV": _CHECKED_HERE, "_mode": checked,
                           "_check_out": check_outputs, "_spec": spec, "_remember": validation_cache.remember}
    env.update(spec.defaults_env())
    header = spec.header_source()
    first = params[0].name
    first_device = f"{first}.hidden.device" if "DispatchPlan" in str(params[0].annotation) else f"{first}.device"
    body = []
    # checked mode for this call: a constant when the runtime fixes it, else read once per call
    ck = "_ck" if checked is None else repr(bool(checked))
    if checked is None:                # hal.contract.checked_mode(), inlined
        body += ["    _ck = _CV.get()", "    if _ck is None:", "        _ck = _checked()"]
    if validate:
        body += _remembered_validation_source(spec, call, ck, first_device)
        env.update({"_L": (validation_cache.never,) + (None,) * len(validation_cache.last_signature(spec)),
                    "_immutable": validation_cache.all_immutable})
    if profile:
        body += [f"    _dev = _device_of(({first},), {{}})", "    _t0 = _perf()"]
    done = (["    _sync(_dev)", "    _entry.calls += 1", "    _entry.total_s += _perf() - _t0"] if profile else [])
    if supports is not None:
        body.append(f"    _why = _supports({call})")
        body.append("    if _why is not None:")
        body.append("        if _fallback is None:")
        body.append("            raise _Unsupported(_op, _backend, _why)")
        body.append("        _entry.fallback_calls += 1")
        body.append("        _entry.fallback_reason = _why")
        body.append("        _warn(_op, _backend, _why)")
        body.append(f"        _out = _fallback({call})")
        body += ["    " + line for line in done]
        body.append("        return _out")
    body.append(f"    _out = _kernel({call})")
    body += done
    check_out = f"_check_out(_spec, _backend, _out, {{{', '.join(repr(p.name) + ': ' + p.name for p in params)}}})"
    if ck == "True":
        body.append("    " + check_out)
    elif ck != "False":
        body += [f"    if {ck}:", "        " + check_out]
    body.append("    return _out")
    if checked is not None:            # this runtime's own checked mode, for everything the call does
        body = ["    _tok = _CV.set(_mode)", "    try:"] + ["    " + line for line in body] + \
               ["    finally:", "        _CV.reset(_tok)"]
    if validate:
        body.insert(0, "    global _L")
    src = f"def {spec.name}{header}:\n" + "\n".join(body) + "\n"
    exec(compile(src, f"<hal bound op {spec.name}>", "exec"), env)  # noqa: S102 - generated from the spec
    fn = env[spec.name]
    fn.__doc__ = spec.doc
    fn.__signature__ = sig
    fn.__qualname__ = spec.name
    fn.__hal_source__ = src
    return fn


def _remembered_validation_source(spec: OpSpec, call: str, ck: str, first_device: str) -> list[str]:
    """The bound op's validation, as source lines: in checked mode validate every call; otherwise
    skip validation when the call matches a remembered valid call signature
    (:mod:`hal.validation_cache`).

    Two lookups, cheapest first: the last signature that matched (its non-tensor parts compared
    by identity, then its tensor guard), then every remembered signature of the call's non-tensor
    key. ``_L`` (a module global of the generated function, replaced whole so that threads never
    see half of one) holds the last match: its guard's ``check`` and the non-tensor parts. It is
    only set when those parts are immutable objects, so "the same object" means "equal"."""
    last = validation_cache.last_signature(spec)
    names = ["_lc"] + [f"_l{i}" for i in range(len(last))]
    same = " and ".join(f"{expr} is _l{i}" for i, (_, expr) in enumerate(last)) or "True"
    parts = ", ".join(expr for _, expr in last)

    def set_last(indent: str, guard: str) -> list[str]:
        return [f"{indent}if _immutable({parts}):", f"{indent}    _L = ({guard}.check, {parts}{',' if parts else ''})"] \
            if parts else [f"{indent}_L = ({guard}.check,)"]

    if ck == "True":
        return [f"    _validate({call})"]
    remembered = [
            "        _hit = False",
            "        _key = None",
            "        try:",
            f"            {', '.join(names)}{',' if len(names) == 1 else ''} = _L",
            f"            if {same}:",
            *validation_cache.guard_call_lines(spec, " " * 16, "_lc", "_hit"),
            "            if not _hit:",
            f"                _key = {validation_cache.key_source(spec)}",
            "                _gs = _seen.get(_key)",
            "                if _gs is not None:",
            *validation_cache.tensors_lines(spec, " " * 20),
            "                    for _g in _gs:",
            "                        if _g.check(*_ts):",
            "                            _hit = True",
            *set_last(" " * 28, "_g"),
            "                            break",
            "        except Exception:",
            "            _key = None",
            "        if not _hit:",
            f"            _validate({call})",
            f"            if _key is not None and {first_device}.type != 'cpu':",
            *validation_cache.tensors_lines(spec, " " * 16),
            "                _g = _remember(_seen, _key, _ts)",
            *set_last(" " * 16, "_g")]
    if ck == "False":
        return [line[4:] for line in remembered]
    return [f"    if {ck}:", f"        _validate({call})", "    else:", *remembered]


_warned: set = set()


def _warn_once(op: str, backend: str, why: str) -> None:
    key = (op, backend, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"hal: {op} on backend {backend!r} fell back to the CPU reference: {why}", RuntimeWarning,
                      stacklevel=3)


class Runtime:
    """Contract ops bound to kernels. Build with :func:`hal.runtime`; call ops as attributes."""

    def __init__(self, record: BackendRecord, *, fallback: str = "reference", profile: bool = False,
                 validate: bool = True, checked: Optional[bool] = None, registry: Optional[Registry] = None):
        if fallback not in FALLBACKS:
            raise ValueError(f"hal.runtime: fallback: expected one of {FALLBACKS}, got {fallback!r}")
        self.backend_name = record.name
        self.label = record.label
        self.device_type = record.backend.device_type
        self.fallback = fallback
        self.profile = profile
        self.validate = validate
        self.checked = checked
        self.record = record
        self._entries: dict[str, PlanEntry] = {}
        backend = record.backend
        kernels = backend.kernels()
        caps = dict(backend.capabilities())
        reference = None
        if fallback == "reference" and record.name != REFERENCE:
            # the fallback is the contract's definition itself, whichever plugins HAL_BACKENDS lists
            reference = (registry or get_registry()).reference().backend.kernels()
        missing = [op for op in CONTRACT if op not in kernels or op not in caps]
        if missing and fallback == "error":
            raise UnsupportedCase(missing[0], record.name,
                                  f"the backend does not implement {', '.join(missing)} and fallback='error'")
        if missing:
            warnings.warn(f"hal: backend {record.name!r} does not implement {', '.join(missing)}: "
                          "these ops run on the CPU reference (see the runtime plan)", RuntimeWarning, stacklevel=3)
        for name, spec in CONTRACT.items():
            if name in kernels and name in caps:
                cap = caps[name]
                entry = PlanEntry(name, record.name, cap.path, cap.note or f"{cap.path} kernel", record.label)
                fb = reference_on_cpu(reference[name]) if reference is not None else None
                fn = make_bound_op(spec, kernels[name], supports=cap.supports, fallback=fb, entry=entry,
                                   profile=profile, backend_name=record.name, validate=validate, checked=checked)
            else:
                entry = PlanEntry(name, "cpu", "fallback", f"backend {record.name!r} does not implement {name}; "
                                  "running the CPU reference (tensors moved to the CPU and back)", "cpu (reference)")
                fn = make_bound_op(spec, reference_on_cpu(reference[name]), entry=entry, profile=profile,
                                   backend_name=REFERENCE, validate=validate, checked=checked)
            self._entries[name] = entry
            setattr(self, name, fn)

    def prepare_weights(self, op: str, **weights: torch.Tensor) -> dict:
        """Lay out an op's weights once, at load, the way this runtime's backend wants them
        (``Backend.prepare_weights``; e.g. a transposed storage for a grouped matmul, an NPU
        format). Returns the same names mapped to tensors equal in shape, dtype, device and value
        (only strides / storage format may differ): pass those to the op from then on. Ops that
        fall back to the reference get their weights unchanged."""
        if op not in CONTRACT:
            raise KeyError(f"prepare_weights: {op!r} is not a contract op")
        entry = self._entries[op]
        if entry.path == "fallback" or not weights:
            return dict(weights)
        out = dict(self.record.backend.prepare_weights(op, dict(weights)))
        for name, w in weights.items():
            got = out.get(name)
            if got is None and w is None:
                continue
            if not isinstance(got, torch.Tensor) or got.shape != w.shape or got.dtype != w.dtype or got.device != w.device:
                raise KernelOutputError(op, self.backend_name, f"prepared weight {name}",
                                        f"a tensor of shape {tuple(w.shape)}, {w.dtype} on {w.device}",
                                        "nothing" if got is None else (tuple(got.shape), got.dtype, got.device)
                                        if isinstance(got, torch.Tensor) else type(got).__name__)
        return out

    def plan(self) -> list[PlanEntry]:
        """op -> backend, path (native / emulated / fallback), reason, and (with profile) calls/time."""
        return list(self._entries.values())

    def plan_dict(self) -> list[dict]:
        return [e.to_dict() for e in self._entries.values()]

    def plan_table(self, with_stats: Optional[bool] = None) -> str:
        """The plan as an aligned text table (with calls and time when profiling)."""
        stats = self.profile if with_stats is None else with_stats
        rows = [("op", "backend", "path", "calls", "time_ms", "reason") if stats else ("op", "backend", "path", "reason")]
        for e in self._entries.values():
            path = e.path + (f" (+{e.fallback_calls} fallback)" if e.fallback_calls else "")
            reason = e.reason + (f"; fallback: {e.fallback_reason}" if e.fallback_reason else "")
            rows.append((e.op, e.label or e.backend, path, str(e.calls), f"{e.total_s * 1e3:.3f}", reason) if stats
                        else (e.op, e.label or e.backend, path, reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)

    def reset_stats(self) -> None:
        for e in self._entries.values():
            e.calls, e.total_s, e.fallback_calls, e.fallback_reason = 0, 0.0, 0, ""

    def __repr__(self) -> str:
        return f"<hal Runtime backend={self.backend_name!r} label={self.label!r} fallback={self.fallback!r}>"


def resolve(backend: str = "auto", registry: Optional[Registry] = None) -> BackendRecord:
    """The record of the backend a runtime would use: by name, or ``"auto"`` (``HAL_BACKEND``
    overrides; otherwise the highest-priority available backend). A named backend that is
    unknown, broken, incompatible or unavailable raises :class:`hal.BackendUnavailable`."""
    reg = registry or get_registry()
    if backend == "auto":
        env = os.environ.get("HAL_BACKEND", "").strip()
        if env and env != "auto":
            backend = env
        else:
            return reg.best()
    rec = reg.record(backend)
    if rec.status != "available":
        raise BackendUnavailable(backend, rec.status, rec.reason)
    return rec


def runtime(backend: str = "auto", *, fallback: str = "reference", profile: bool = False, validate: bool = True,
            checked: Optional[bool] = None, options: Optional[dict] = None,
            registry: Optional[Registry] = None) -> Runtime:
    """Bind every contract op to a kernel of ``backend`` once; return the :class:`Runtime`.

    backend: a backend name ("cpu", "cuda", "ascend", a plugin's name) or "auto" (``HAL_BACKEND``
    if set, else the available backend with the highest priority: cuda 30, ascend 20, cpu 0). fallback: "reference" runs ops the backend lacks (or declines
    per call) on the CPU reference, recorded in the plan and warned about; "error" makes a missing
    op a :class:`hal.UnsupportedCase` at bind time and a declined call one at call time.
    profile: count calls and time them (synchronizing the device after each call).
    validate: check every call against the contract (default). ``validate=False`` skips the checks
    for hot loops whose inputs are already known good (a model's decode step): the caller then owns
    every guarantee the checks give, and a bad input may give a wrong answer instead of an error.
    ``hal bench overhead`` shows what validation costs per op.
    checked: this runtime's checked mode (data checks on device tensors, output shapes/dtypes
    compared with the contract); None follows the process default (``HAL_CHECKED``,
    :func:`hal.set_checked`).
    options: per-instance backend options (``Backend.with_options``), e.g. ``{"emulate": True}`` for
    hal-ascend: environment variables only give their defaults, so one process can hold a real
    and an emulated backend at once. Unknown options raise ValueError.
    """
    if options:                  # the listed instance may be unavailable with its defaults: configure by name
        name = resolve(backend, registry).name if backend == "auto" else backend
        record = (registry or get_registry()).configured(name, dict(options))
        if record.status != "available":
            raise BackendUnavailable(record.name, record.status, record.reason)
    else:
        record = resolve(backend, registry)
    return Runtime(record, fallback=fallback, profile=profile, validate=validate, checked=checked, registry=registry)
