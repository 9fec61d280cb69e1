"""The one HAL runtime a vLLM process uses, and the call-count file the tests read.

The runtime is built on first use with ``hal.runtime("auto")``: ``HAL_BACKEND`` names the backend,
otherwise HAL picks the best available one. With ``HAL_VLLM_PROFILE_OUT=DIR`` it counts and times
every call, and after each call the plugin makes (at most every 0.2 s, and at exit) writes
``DIR/hal-profile-<pid>.json``: ``{"pid", "backend", "label", "ops": {op: {calls, path,
fallback_calls}}}``. vLLM may run the model in a child process, so the file is what a caller reads.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time

import hal

_lock = threading.Lock()
_runtime = None
_last_write = 0.0


def profile_dir() -> str | None:
    """``HAL_VLLM_PROFILE_OUT`` or None."""
    return os.environ.get("HAL_VLLM_PROFILE_OUT") or None


def get() -> "hal.Runtime":
    """The process's HAL runtime (built once; profiling on when ``HAL_VLLM_PROFILE_OUT`` is set)."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                rt = hal.runtime("auto", profile=profile_dir() is not None)
                logging.getLogger("vllm.hal_vllm").info(
                    "hal-vllm: HAL runtime on backend %r (%s)%s", rt.backend_name, rt.label,
                    f"; call counts -> {profile_dir()}" if profile_dir() else "")
                if profile_dir() is not None:
                    atexit.register(write_profile, True)
                _runtime = rt
    return _runtime


def profile_dict() -> dict:
    """The runtime's plan with call counts, as written to the profile file."""
    rt = get()
    return {"pid": os.getpid(), "backend": rt.backend_name, "label": rt.label,
            "ops": {e.op: {"calls": e.calls, "path": e.path, "fallback_calls": e.fallback_calls}
                    for e in rt.plan()}}


def write_profile(force: bool = False) -> None:
    """Write ``hal-profile-<pid>.json`` into ``HAL_VLLM_PROFILE_OUT`` (atomically; throttled to one
    write per 0.2 s unless ``force``). No-op when the variable is unset."""
    global _last_write
    out = profile_dir()
    if out is None or _runtime is None:
        return
    now = time.monotonic()
    if not force and now - _last_write < 0.2:
        return
    _last_write = now
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"hal-profile-{os.getpid()}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(profile_dict(), f)
    os.replace(tmp, path)


def after_call() -> None:
    """Called by the plugin after each HAL call it makes (writes the profile when asked to)."""
    if _runtime is not None and _runtime.profile:
        write_profile(False)
