"""Backend discovery: the ``hal.backends`` entry-point group, loaded lazily and in isolation.

Nothing here runs during ``import hal``. The first call that needs backends (``hal.runtime``,
``hal.ops``, ``hal backends``) discovers the entry points, loads each plugin module on its own
(an exception is recorded with its traceback; the other plugins still load), checks the
contract version each declares, and probes each backend once. ``HAL_BACKENDS=cpu,cuda`` restricts
which entry points are loaded.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import traceback
from importlib import metadata
from typing import Optional

import pluggy

from hal import hookspecs
from hal.backend import Availability, Backend
from hal.contract import CONTRACT_VERSION
from hal.errors import BackendUnavailable

ENTRY_POINT_GROUP = "hal.backends"
STATUSES = ("available", "unavailable", "broken", "incompatible")


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

    def __init__(self, *, discover_entry_points: bool = True):
        self._pm = pluggy.PluginManager("hal")
        self._pm.add_hookspecs(hookspecs)
        self._records: dict[str, BackendRecord] = {}
        self._lock = threading.RLock()
        self._discovered = not discover_entry_points

    # -- discovery --------------------------------------------------------------------------
    def _allowed(self, name: str) -> bool:
        only = os.environ.get("HAL_BACKENDS", "").strip()
        return not only or name in {n.strip() for n in only.split(",") if n.strip()}

    def _discover(self) -> None:
        with self._lock:
            if self._discovered:
                return
            self._discovered = True
            for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                if ep.name in self._records or not self._allowed(ep.name):
                    continue
                dist = getattr(ep, "dist", None)
                rec = BackendRecord(ep.name, "broken", "", source=ep.value,
                                    distribution=dist.metadata["Name"] if dist else "",
                                    distribution_version=dist.version if dist else "")
                try:
                    module = ep.load()
                except BaseException as exc:  # noqa: BLE001 - a plugin must never break the others
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    rec.reason = f"plugin failed to load: {type(exc).__name__}: {exc}"
                    rec.traceback = traceback.format_exc()
                    self._records[ep.name] = rec
                    continue
                self._add_plugin(module, ep.name, rec)

    def register(self, plugin, name: Optional[str] = None) -> BackendRecord:
        """Register a plugin object or module directly (no entry point): it must implement the
        ``hal_backend`` and ``hal_contract_version`` hooks. Returns its record."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        with self._lock:
            rec = BackendRecord(name, "broken", "", source="registered")
            return self._add_plugin(plugin, name, rec)

    def register_backend(self, backend: Backend, contract_version: str = CONTRACT_VERSION) -> BackendRecord:
        """Register a :class:`Backend` object directly (tests, notebooks, in-process plugins)."""

        class _Plugin:
            @hookspecs.hookimpl
            def hal_contract_version(self):
                return contract_version

            @hookspecs.hookimpl
            def hal_backend(self):
                return backend

        return self.register(_Plugin(), backend.name)

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
        try:
            av = rec.backend.probe()
            if not isinstance(av, Availability):
                raise TypeError(f"probe() returned {type(av).__name__}, expected hal.Availability")
            rec.availability = av
            rec.status = "available" if av.available else "unavailable"
            rec.reason = av.reason
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            rec.status = "broken"
            rec.reason = f"probe raised {type(exc).__name__}: {exc}"
            rec.traceback = traceback.format_exc()
        return rec

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


def reset_registry() -> None:
    """Forget every discovered backend and every cached runtime (re-discovered on next use)."""
    global _registry
    with _registry_lock:
        _registry = None
    mod = sys.modules.get("hal.ops")
    if mod is not None:
        mod._reset()
