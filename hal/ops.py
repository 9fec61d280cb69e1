"""``hal.ops.<op>(...)``: contract ops that dispatch on the device of their tensor inputs.

CPU tensors run on the reference backend; tensors on another device type run on the best
available backend for that device type ("cuda" -> hal-cuda, "npu" -> hal-ascend). The runtime for
each device type is resolved once and cached; a device type no installed backend serves runs on
the CPU reference with a warning (the fallback is recorded in ``hal.ops.runtime_for(device).plan()``).
"""
from __future__ import annotations

import functools
import threading
import warnings

import torch

from hal.contract import CONTRACT, on_add_op
from hal.errors import BackendUnavailable
from hal.registry import on_reset

_runtimes: dict = {}
_lock = threading.Lock()


def runtime_for(device_type: str):
    """The cached :class:`hal.Runtime` that serves tensors of ``device_type``."""
    rt = _runtimes.get(device_type)
    if rt is not None:
        return rt
    from hal.registry import get_registry
    from hal.binding import Runtime
    with _lock:
        if device_type in _runtimes:
            return _runtimes[device_type]
        reg = get_registry()
        if device_type == "cpu":
            rec = reg.record("cpu")
            if rec.status != "available":
                raise BackendUnavailable("cpu", rec.status, rec.reason)
        else:
            try:
                rec = reg.best(device_type)
            except BackendUnavailable as exc:
                warnings.warn(f"hal.ops: no backend serves {device_type!r} tensors ({exc.reason}); "
                              "ops on them run on the CPU reference", RuntimeWarning, stacklevel=3)
                rec = reg.record("cpu")
        _runtimes[device_type] = Runtime(rec)
        return _runtimes[device_type]


def _reset() -> None:
    with _lock:
        _runtimes.clear()
        for table in _tables:
            table.clear()


def _bound_for(device_type: str, name: str):
    return getattr(runtime_for(device_type), name)


def _make(name: str):
    """``hal.ops.<name>``, generated with the op's exact signature (no ``*args``/``**kwargs``
    repacking per call): the device type of the first argument picks the runtime's bound op,
    looked up once per device type."""
    spec = CONTRACT[name]
    first = next(iter(spec.signature.parameters))
    is_plan = "DispatchPlan" in str(spec.signature.parameters[first].annotation)
    device = f"{first}.hidden.device.type" if is_plan else f"{first}.device.type"
    env = {"_by_device": {}, "_bound_for": _bound_for, "_op": name, **spec.defaults_env()}
    src = (f"def {name}{spec.header_source()}:\n"
           "    try:\n"
           f"        _dev = {device}\n"
           "    except AttributeError:\n"
           "        _dev = 'cpu'   # not a tensor: the bound op's validation names the argument\n"
           "    _f = _by_device.get(_dev)\n"
           "    if _f is None:\n"
           "        _f = _by_device[_dev] = _bound_for(_dev, _op)\n"
           f"    return _f({spec.call_source()})\n")
    exec(compile(src, f"<hal.ops.{name}>", "exec"), env)  # noqa: S102 - generated from the spec
    dispatch = env[name]
    _tables.append(env["_by_device"])
    # the module-level function carries the contract's signature and docstring
    functools.update_wrapper(dispatch, spec.validate)
    dispatch.__signature__ = spec.signature
    dispatch.__module__ = __name__
    return dispatch


_tables: list = []          # every generated op's device-type -> bound op table (cleared by _reset)


for _name in CONTRACT:
    globals()[_name] = _make(_name)


def _on_add(spec) -> None:
    globals()[spec.name] = _make(spec.name)
    __all__.append(spec.name)
    _reset()                      # runtimes bound before the op existed lack it


on_add_op(_on_add)
on_reset(_reset)

__all__ = ["runtime_for", *CONTRACT]
