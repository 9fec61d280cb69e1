"""HAL's compiled call-signature check: an optional C++ extension (``hal/csrc/signature_check.cpp``)
that compares a call's tensors with a remembered signature several times faster than torch's
``TensorGuards`` (about 0.05 µs per tensor instead of 0.2-0.45 on the CI CPU; docs/perf.md).

It is built on request, never at import: ``hal build-checks`` (or :func:`build`) compiles it with
the installed torch's headers, which needs a C++ compiler and about a minute. The build is kept in
a cache folder (``HAL_EXTENSIONS_DIR``, default ``$XDG_CACHE_HOME/hal/extensions`` or
``~/.cache/hal/extensions``) under a name keyed by the source, torch's version and build, and
Python's, so a process with another torch simply finds no build and uses ``TensorGuards``.
``HAL_COMPILED_CHECK=0`` turns it off. Loading checks the module's answers on known cases first;
a module that answers wrongly is not used (:func:`status` says why).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("csrc") / "signature_check.cpp"
DIR_ENV = "HAL_EXTENSIONS_DIR"
SWITCH_ENV = "HAL_COMPILED_CHECK"

_loaded: dict = {}          # "module" / "reason": the outcome of the first load() in this process


def cache_dir() -> Path:
    """Where builds are kept (``HAL_EXTENSIONS_DIR`` overrides)."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hal" / "extensions"


def module_name() -> str:
    """The build's module name: the source and the torch / Python it is built for, hashed."""
    import torch
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    for part in (torch.__version__, str(getattr(torch.version, "git_version", "")), sys.implementation.cache_tag,
                 platform.machine(), platform.system()):
        key.update(b"\0" + part.encode())
    return f"hal_signature_check_{key.hexdigest()[:16]}"


def built_path() -> Path:
    """The shared library a build of this source for this torch leaves (torch's cpp_extension
    names it ``<module>.so``, ``.pyd`` on Windows)."""
    name = module_name()
    return cache_dir() / name / (name + (".pyd" if sys.platform == "win32" else ".so"))


def _self_test(module) -> Optional[str]:
    """None when the module answers as a guard must on known cases, else what it got wrong."""
    import torch
    a, b = torch.empty(2, 3), torch.empty(4, dtype=torch.int32)
    check = module.signature_guard(a, b)
    if check is None or not check(torch.empty(2, 3), torch.empty(4, dtype=torch.int32)):
        return "it refused tensors equal to the recorded ones"
    refused = {"another shape": (torch.empty(3, 2), b), "other strides": (torch.empty(3, 2).t(), b),
               "another dtype": (a.double(), b), "a non-tensor": (a, None), "another device": (a.to("meta"), b),
               "a Parameter": (torch.nn.Parameter(a), b), "requires_grad": (a.clone().requires_grad_(), b),
               "fewer tensors": (a,), "more tensors": (a, b, b)}
    wrong = [what for what, args in refused.items() if check(*args)]
    return f"it accepted {', '.join(wrong)}" if wrong else None


def load():
    """The built module (its ``signature_guard``), or None: not built for this torch, switched off
    with ``HAL_COMPILED_CHECK=0``, unloadable or answering wrongly. Never compiles; the outcome is
    remembered for the process (:func:`status` says it)."""
    if "module" in _loaded:
        return _loaded["module"]
    module, reason = None, ""
    if os.environ.get(SWITCH_ENV, "").strip() == "0":
        reason = f"switched off ({SWITCH_ENV}=0)"
    else:
        try:
            path = built_path()
            if not path.is_file():
                reason = f"not built for this torch (run `hal build-checks`; it would be {path})"
            else:
                spec = importlib.util.spec_from_file_location(module_name(), path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                wrong = _self_test(module)
                reason = f"{path} answers wrongly: {wrong}" if wrong else f"loaded from {path}"
                module = None if wrong else module
        except Exception as e:  # noqa: BLE001 - an unusable build means TensorGuards, with the reason
            module, reason = None, f"unusable: {type(e).__name__}: {e}"
    _loaded.update(module=module, reason=reason)
    return module


def build(verbose: bool = False):
    """Compile the extension for the torch in use (about a minute; needs a C++ compiler and
    ninja, which torch's ``cpp_extension`` drives) and load it. Returns the module; raises
    RuntimeError naming the cause when it cannot be built or answers wrongly."""
    from torch.utils import cpp_extension
    name = module_name()
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(folder), extra_cflags=["-O2"],
                           verbose=verbose)
    except Exception as e:  # noqa: BLE001 - the compiler's own message is the cause
        raise RuntimeError(f"hal build-checks: compiling {SOURCE.name} failed: {type(e).__name__}: {e}") from e
    _loaded.clear()
    module = load()
    if module is None:
        raise RuntimeError(f"hal build-checks: {_loaded['reason']}")
    return module


def status() -> dict:
    """``{"active": bool, "path": str, "reason": str}`` for this process (loads, never builds)."""
    module = load()
    try:
        path = str(built_path())
    except Exception as e:  # noqa: BLE001 - e.g. the source file missing from an old install
        path = f"unknown ({type(e).__name__}: {e})"
    return {"active": module is not None, "path": path, "reason": _loaded["reason"]}
