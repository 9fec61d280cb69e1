"""Backend discovery: the ``hal.backends`` entry-point group, loaded lazily and in isolation.

Nothing here runs during ``import hal``. The first call that needs backends (``hal.runtime``,
``hal.ops``, ``hal backends``) discovers the entry points, loads each plugin module on its own
(an exception is recorded with its traceback; the other plugins still load), checks the
contract version each declares, and probes each backend once, with a timeout
(``HAL_PROBE_TIMEOUT_S``, default 10 s: a probe that takes longer is reported "unavailable: probe
timed out after N s"). An available backend's kernels are checked against the contract's
signatures: a kernel with a missing, renamed or reordered parameter makes the backend
"incompatible", naming the op and the parameter. ``HAL_BACKENDS=cpu,cuda`` restricts which entry
points are loaded. Names are unique: a second distribution claiming a taken name is refused
loudly (listed as broken, naming both distributions), and the reference's name ``cpu`` belongs to
the ``hal`` distribution alone.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import threading
import traceback
import warnings
from importlib import metadata
from typing import Optional

import pluggy

from hal import hookspecs
from hal.backend import Availability, Backend
from hal.contract import CONTRACT_VERSION
from hal.errors import BackendUnavailable

ENTRY_POINT_GROUP = "hal.backends"
STATUSES = ("available", "unavailable", "broken", "incompatible")
REFERENCE = "cpu"                      # the reference backend's name ...
REFERENCE_DISTRIBUTION = "hal"         # ... which only this distribution may register
DEFAULT_PROBE_TIMEOUT_S = 10.0


def probe_timeout_s() -> float:
    """The probe timeout in seconds: ``HAL_PROBE_TIMEOUT_S`` or 10."""
    raw = os.environ.get("HAL_PROBE_TIMEOUT_S", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_PROBE_TIMEOUT_S
    except ValueError:
        value = DEFAULT_PROBE_TIMEOUT_S
    return value if value > 0 else DEFAULT_PROBE_TIMEOUT_S


@dataclasses.dataclass
class BackendRecord:
    """What the registry knows about one backend plugin.

    ``status``: "available", "unavailable" (the probe said no), "broken" (loading, constructing or
    probing raised; ``traceback`` has it) or "incompatible" (another contract version).
    """

    name: str
    status: str
    reason: str
    backend: Optional[Backend] = None
    availability: Optional[Availability] = None
    traceback: Optional[str] = None
    source: str = ""                      # "module:attr" of the entry point, or "registered"
    distribution: str = ""
    distribution_version: str = ""
    contract_version: str = ""

    @property
    def label(self) -> str:
        """The run label plans and reports carry (e.g. "ascend (emulated torch_npu)")."""
        if self.availability is not None and self.availability.label:
            return self.availability.label
        return self.name

    def to_dict(self) -> dict:
        av = self.availability
        return {
            "name": self.name, "status": self.status, "reason": self.reason, "label": self.label,
            "device_type": self.backend.device_type if self.backend else None,
            "device": av.device if av else "", "versions": dict(av.versions) if av else {},
            "contract_version": self.contract_version, "source": self.source,
            "distribution": self.distribution, "distribution_version": self.distribution_version,
            "traceback": self.traceback,
        }


def _major(v: str) -> str:
    return str(v).split(".")[0]


class Registry:
    """All discovered backends. Use :func:`get_registry`; tests may build their own."""

    def __init__(self, *, discover_entry_points: bool = True, probe_timeout_s_: Optional[float] = None):
        self._pm = pluggy.PluginManager("hal")
        self._pm.add_hookspecs(hookspecs)
        self._records: dict[str, BackendRecord] = {}
        self._hidden: dict[str, BackendRecord] = {}       # the reference when HAL_BACKENDS omits it
        self._lock = threading.RLock()
        self._discovered = not discover_entry_points
        self.probe_timeout_s = probe_timeout_s() if probe_timeout_s_ is None else probe_timeout_s_

    # -- discovery --------------------------------------------------------------------------
    def _allowed(self, name: str) -> bool:
        only = os.environ.get("HAL_BACKENDS", "").strip()
        return not only or name in {n.strip() for n in only.split(",") if n.strip()}

    def _discover(self) -> None:
        with self._lock:
            if self._discovered:
                return
            self._discovered = True
            for name, eps in _entry_points_by_name().items():
                if not self._allowed(name) or name in self._records:
                    continue
                keep, refused = _claim(name, eps)
                for ep in refused:
                    self._refuse(name, ep, keep)
                if keep is not None:
                    self._load_entry_point(name, keep)

    def _load_entry_point(self, name: str, ep) -> BackendRecord:
        rec = BackendRecord(name, "broken", "", source=ep.value, distribution=_dist_name(ep),
                            distribution_version=_dist_version(ep))
        try:
            module = ep.load()
        except BaseException as exc:  # noqa: BLE001 - a plugin must never break the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            rec.reason = f"plugin failed to load: {type(exc).__name__}: {exc}"
            rec.traceback = traceback.format_exc()
            self._records[name] = rec
            return rec
        return self._add_plugin(module, name, rec)

    def _refuse(self, name: str, ep, keep) -> None:
        holder = (f"distribution {_dist_name(keep) or '?'} ({keep.value})" if keep is not None
                  else f"HAL's reference (distribution {REFERENCE_DISTRIBUTION})")
        reason = (f"refused: distribution {_dist_name(ep) or '?'} ({ep.value}) registers the backend name {name!r}, "
                  f"which {holder} already holds" + (" (the reference's name is reserved)" if name == REFERENCE else ""))
        key = f"{name} [{_dist_name(ep) or ep.value}]"
        self._records[key] = BackendRecord(key, "broken", reason, source=ep.value, distribution=_dist_name(ep),
                                           distribution_version=_dist_version(ep))
        warnings.warn(f"hal: {reason}", RuntimeWarning, stacklevel=4)

    def reference(self) -> BackendRecord:
        """The reference backend's record (``cpu`` from the ``hal`` distribution), loaded even when
        ``HAL_BACKENDS`` leaves it out of the listed backends: every fallback runs on it."""
        self._discover()
        with self._lock:
            rec = self._records.get(REFERENCE)
            if rec is None or rec.distribution not in ("", REFERENCE_DISTRIBUTION):
                rec = self._hidden.get(REFERENCE)
            if rec is None:
                ep, _ = _claim(REFERENCE, _entry_points_by_name().get(REFERENCE, []))
                if ep is None:
                    raise BackendUnavailable(REFERENCE, "unknown", "the reference backend's entry point is not "
                                             "installed (reinstall hal: pip install .)")
                listed = self._records
                self._records = self._hidden
                try:
                    rec = self._load_entry_point(REFERENCE, ep)
                finally:
                    self._records = listed
            return self._probe(rec)

    def register(self, plugin, name: Optional[str] = None, *, replace: bool = False) -> BackendRecord:
        """Register a plugin object or module directly (no entry point): it must implement the
        ``hal_backend`` and ``hal_contract_version`` hooks. Returns its record. A name already
        taken raises ValueError naming its holder (``replace=True`` replaces an in-process
        registration); the reference's name ``cpu`` can never be taken."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        self._discover()
        with self._lock:
            held = self._records.get(name)
            if name == REFERENCE:
                raise ValueError(f"hal: the backend name {name!r} is reserved for HAL's reference backend")
            if held is not None and not (replace and held.source == "registered"):
                holder = f"distribution {held.distribution}" if held.distribution else "an in-process registration"
                raise ValueError(f"hal: the backend name {name!r} is already taken by {holder} ({held.source}); "
                                 "unregister it first" + ("" if held.distribution else " or pass replace=True"))
            rec = BackendRecord(name, "broken", "", source="registered")
            return self._add_plugin(plugin, name, rec)

    def register_backend(self, backend: Backend, contract_version: str = CONTRACT_VERSION, *,
                         replace: bool = False) -> BackendRecord:
        """Register a :class:`Backend` object directly (tests, notebooks, in-process plugins)."""

        class _Plugin:
            @hookspecs.hookimpl
            def hal_contract_version(self):
                return contract_version

            @hookspecs.hookimpl
            def hal_backend(self):
                return backend

        return self.register(_Plugin(), backend.name, replace=replace)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._records.pop(name, None)
            plugin = self._pm.get_plugin(name)
            if plugin is not None:
                self._pm.unregister(plugin)

    def _call_one(self, hook_name: str, plugin_name: str):
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == plugin_name:
                return impl.function()
        raise LookupError(f"plugin does not implement the {hook_name}() hook")

    def _add_plugin(self, plugin, name: str, rec: BackendRecord) -> BackendRecord:
        rec.name = name
        try:
            if self._pm.get_plugin(name) is not None:
                self._pm.unregister(self._pm.get_plugin(name))
            self._pm.register(plugin, name=name)
            version = str(self._call_one("hal_contract_version", name))
            rec.contract_version = version
            if _major(version) != _major(CONTRACT_VERSION):
                rec.status = "incompatible"
                rec.reason = (f"implements HAL contract {version}, but this hal (version "
                              f"{_hal_version()}) implements contract {CONTRACT_VERSION}")
            else:
                backend = self._call_one("hal_backend", name)
                if not isinstance(backend, Backend):
                    raise TypeError(f"hal_backend() returned {type(backend).__name__}, expected a hal.Backend")
                rec.backend = backend
                rec.status = "unprobed"
                rec.reason = "not probed yet"
                if backend.name and backend.name != name:
                    rec.reason = f"not probed yet (backend calls itself {backend.name!r})"
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            rec.status = "broken"
            rec.reason = f"plugin failed to initialise: {type(exc).__name__}: {exc}"
            rec.traceback = traceback.format_exc()
        self._records[name] = rec
        return rec

    # -- probing ----------------------------------------------------------------------------
    def _probe(self, rec: BackendRecord) -> BackendRecord:
        if rec.status != "unprobed":
            return rec
        result: dict = {}

        def run():
            try:
                result["availability"] = rec.backend.probe()
            except BaseException as exc:  # noqa: BLE001 - recorded below
                result["error"] = (exc, traceback.format_exc())

        worker = threading.Thread(target=run, name=f"hal-probe-{rec.name}", daemon=True)
        worker.start()
        worker.join(self.probe_timeout_s)
        if worker.is_alive():
            rec.status = "unavailable"
            rec.reason = (f"probe timed out after {self.probe_timeout_s:g} s "
                          "(HAL_PROBE_TIMEOUT_S sets the limit)")
            return rec
        if "error" in result:
            exc, tb = result["error"]
            if isinstance(exc, KeyboardInterrupt):
                raise exc
            rec.status, rec.reason, rec.traceback = "broken", f"probe raised {type(exc).__name__}: {exc}", tb
            return rec
        av = result.get("availability")
        if not isinstance(av, Availability):
            rec.status = "broken"
            rec.reason = f"probe() returned {type(av).__name__}, expected hal.Availability"
            return rec
        rec.availability = av
        rec.status = "available" if av.available else "unavailable"
        rec.reason = av.reason
        if av.available:
            self._check_kernels(rec)
        return rec

    @staticmethod
    def _check_kernels(rec: BackendRecord) -> None:
        """Mark an available backend incompatible when a kernel's signature is not its op's."""
        from hal.contract import CONTRACT
        try:
            kernels = rec.backend.kernels()
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            rec.status, rec.reason = "broken", f"kernels() raised {type(exc).__name__}: {exc}"
            rec.traceback = traceback.format_exc()
            return
        problems = [p for op, k in kernels.items() if op in CONTRACT
                    for p in [kernel_signature_problem(CONTRACT[op], k)] if p]
        if problems:
            rec.status = "incompatible"
            rec.reason = "kernel signatures differ from the contract: " + "; ".join(problems)

    def records(self) -> list[BackendRecord]:
        """Every discovered backend, probed, sorted by name."""
        self._discover()
        with self._lock:
            return [self._probe(r) for r in sorted(self._records.values(), key=lambda r: r.name)]

    def record(self, name: str) -> BackendRecord:
        """The probed record of backend ``name``; raises BackendUnavailable if it is unknown."""
        self._discover()
        with self._lock:
            rec = self._records.get(name)
            if rec is None:
                known = ", ".join(sorted(self._records)) or "none"
                hint = " (HAL_BACKENDS restricts loading to: " + os.environ["HAL_BACKENDS"] + ")" \
                    if os.environ.get("HAL_BACKENDS") else ""
                raise BackendUnavailable(name, "unknown", f"no backend plugin of that name is installed "
                                         f"(installed: {known}){hint}")
            return self._probe(rec)

    def configured(self, name: str, options: dict) -> BackendRecord:
        """A record for backend ``name`` built with ``options`` (``Backend.with_options``), probed
        (with the timeout) and kernel-checked like the listed one, but not listed: the listed
        instance keeps its environment defaults."""
        base = self.record(name)
        if base.backend is None:
            raise BackendUnavailable(name, base.status, base.reason)
        try:
            backend = base.backend.with_options(**options)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        rec = dataclasses.replace(base, status="unprobed", reason="not probed yet", backend=backend, availability=None,
                                  traceback=None)
        return self._probe(rec)

    def get(self, name: str) -> Backend:
        """The backend object ``name`` if it is available; BackendUnavailable with the reason otherwise."""
        rec = self.record(name)
        if rec.status != "available":
            raise BackendUnavailable(name, rec.status, rec.reason)
        return rec.backend

    def best(self, device_type: Optional[str] = None) -> BackendRecord:
        """The available backend with the highest priority (optionally for one device type)."""
        cands = [r for r in self.records() if r.status == "available"
                 and (device_type is None or r.backend.device_type == device_type)]
        if not cands:
            where = f" for device type {device_type!r}" if device_type else ""
            raise BackendUnavailable("auto", "unavailable", f"no available backend{where}")
        return max(cands, key=lambda r: (r.backend.priority, r.name == "cpu"))


def _hal_version() -> str:
    from hal import __version__
    return __version__


_registry: Optional[Registry] = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry (created on first use)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry


_RESET_LISTENERS: list = []


def on_reset(listener) -> None:
    """Call ``listener()`` whenever :func:`reset_registry` runs (``hal.ops`` drops its runtimes)."""
    _RESET_LISTENERS.append(listener)


def reset_registry() -> None:
    """Forget every discovered backend and every cached runtime (re-discovered on next use)."""
    global _registry
    with _registry_lock:
        _registry = None
    for listener in _RESET_LISTENERS:
        listener()


def kernel_signature_problem(spec, kernel) -> Optional[str]:
    """Why ``kernel`` cannot take ``spec``'s call, or None. Bound ops pass the contract's
    positional parameters by position and its keyword-only ones by name, so the kernel's leading
    positional parameters must carry the contract's names in its order, every keyword-only one
    must be accepted by name, and the kernel may require nothing else."""
    try:
        ksig = inspect.signature(kernel)
    except (TypeError, ValueError):
        return None                                   # a builtin without a signature: not checkable
    kparams = list(ksig.parameters.values())
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in kparams)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in kparams)
    positional = [p for p in kparams if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in kparams}
    want_pos = [p for p in spec.signature.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    want_kw = [p for p in spec.signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    for i, p in enumerate(want_pos):
        if i >= len(positional):
            if var_pos:
                break
            return f"{spec.name}: positional parameter {i} {p.name!r} is missing"
        if positional[i].name != p.name:
            return f"{spec.name}: positional parameter {i} is {positional[i].name!r}, the contract's is {p.name!r}"
    for p in want_kw:
        k = by_name.get(p.name)
        if k is None and not var_kw:
            return f"{spec.name}: keyword parameter {p.name!r} is missing"
        if k is not None and k.kind is k.POSITIONAL_ONLY:
            return f"{spec.name}: parameter {p.name!r} is positional-only, the contract passes it by name"
    known = {p.name for p in spec.signature.parameters.values()}
    for i, k in enumerate(kparams):
        required = k.default is k.empty and k.kind not in (k.VAR_POSITIONAL, k.VAR_KEYWORD)
        if required and k.name not in known:
            return f"{spec.name}: the kernel requires parameter {k.name!r}, which the contract does not have"
    return None


def _entry_points_by_name() -> dict:
    """``hal.backends`` entry points by name, sorted, each (distribution, target) pair once."""
    out: dict = {}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, _dist_name(e), e.value)):
        group = out.setdefault(ep.name, [])
        if all((_dist_name(o), o.value) != (_dist_name(ep), ep.value) for o in group):
            group.append(ep)
    return out


def _claim(name: str, eps: list):
    """(the entry point that holds ``name``, the refused ones). The reference's name belongs to
    the hal distribution; any other name to the first distribution by name."""
    if not eps:
        return None, []
    if name == REFERENCE:
        ours = [ep for ep in eps if _dist_name(ep) in (REFERENCE_DISTRIBUTION, "")]
        keep = ours[0] if ours else None
    else:
        keep = eps[0]
    return keep, [ep for ep in eps if ep is not keep]


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else ""


def _dist_version(ep) -> str:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else ""
