"""The installed torch_npu wheel's own op schemas and meta functions, for the emulator.

The emulator stands in for torch_npu ops; it must be called exactly as the real ops are. This
module reads, at run time and never from a copy, the wheel's
``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`` (one ``func:`` schema line per op) and
``torch_npu/op_plugin/meta/_meta_registrations.py`` (the output shapes and dtypes the wheel
declares), and registers each emulated op under its exact schema as a ``torch.library`` op in the
``hal_npu_emu`` namespace. A call then binds its arguments as the real op would (positional vs.
keyword-only from the schema's ``*``, defaults from the schema, types checked by the dispatcher),
and the emulator's outputs are checked against the schema's return arity and against the
wheel's meta function for the same call.

The wheel is found (without importing torch_npu, which needs CANN) at ``HAL_ASCEND_TORCH_NPU_DIR``
(a folder holding ``torch_npu/``; when set, the only place looked at), else the first of
``HAL_TEST_TORCH_NPU_PATH`` (ci/test.sh), an installed ``torch_npu`` package, the repository's
``.hal-test-deps/torch-npu``.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
from typing import Callable, Optional

import torch

NAMESPACE = "hal_npu_emu"
YAML_PATH = os.path.join("csrc", "aten", "npu_native_functions_by_codegen.yaml")
META_PATH = os.path.join("op_plugin", "meta", "_meta_registrations.py")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class NpuSchemaError(RuntimeError):
    """An emulated call or result that disagrees with the installed torch_npu's schema or meta function."""


def _candidates() -> list[str]:
    if "HAL_ASCEND_TORCH_NPU_DIR" in os.environ:          # when set, the only place looked at
        return [os.path.join(os.environ["HAL_ASCEND_TORCH_NPU_DIR"], "torch_npu")]
    out = []
    if os.environ.get("HAL_TEST_TORCH_NPU_PATH"):
        out.append(os.path.join(os.environ["HAL_TEST_TORCH_NPU_PATH"], "torch_npu"))
    try:
        spec = importlib.util.find_spec("torch_npu")       # locates the package without running it
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        out.extend(spec.submodule_search_locations)
    out.append(os.path.join(_REPO, ".hal-test-deps", "torch-npu", "torch_npu"))
    return out


def torch_npu_dir() -> Optional[str]:
    """The installed torch_npu package folder whose schema yaml exists, or None."""
    for d in _candidates():
        if os.path.isfile(os.path.join(d, YAML_PATH)):
            return d
    return None


def wheel_version(pkg_dir: str) -> str:
    """torch_npu's version from its dist-info next to the package folder ('?' if none)."""
    parent = os.path.dirname(pkg_dir)
    for name in sorted(os.listdir(parent)):
        m = re.match(r"torch_npu-([^-]+)\.dist-info$", name)
        if m:
            return m.group(1)
    return "?"


def read_schemas(names, yaml_path: str) -> dict[str, tuple[str, int]]:
    """op name -> (schema text without namespace, 1-based line in the yaml) for each name's
    default overload (``func: name(...)``, not ``name.overload(...)``). Missing names are absent."""
    found = {}
    pattern = re.compile(r"^\s*(?:-\s*)?func:\s*([A-Za-z0-9_]+)\((.*)$")
    with open(yaml_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            m = pattern.match(line.rstrip("\n"))
            if m and m.group(1) in names and m.group(1) not in found:
                found[m.group(1)] = (f"{m.group(1)}({m.group(2)}".strip(), lineno)
    return found


# --- the wheel's meta functions ---------------------------------------------------------------

class _Anything:
    """Stands in for torch_npu helpers the meta functions reference (error codes, exotic dtypes)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return _Anything(f"{self._name}.{attr}")

    def __call__(self, *a, **k):
        return ""

    def __repr__(self):
        return self._name


def _decorated_op(fn: ast.FunctionDef) -> list[str]:
    ops = []
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "impl" and len(d.args) >= 2 \
                and isinstance(d.args[1], ast.Constant):
            ops.append(d.args[1].value)
    return ops


def load_meta_functions(names, meta_path: str) -> dict[str, Callable]:
    """op name -> the wheel's meta function for it, executed from the wheel's source with stubs for
    what needs CANN (error-code strings, the CANN version, torch_npu's own dtypes). Only the
    functions for ``names``, the module-level helper functions they call and the module's
    upper-case constants are executed."""
    with open(meta_path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), meta_path)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    by_op = {}
    for fn in funcs.values():
        for op in _decorated_op(fn):
            if op in names and op not in by_op:
                by_op[op] = fn.name
    wanted, todo = set(), list(by_op.values())
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        for node in ast.walk(funcs[name]):
            if isinstance(node, ast.Name) and node.id in funcs and node.id not in wanted:
                todo.append(node.id)
    body = [n for n in tree.body if isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper()
                                                                    for t in n.targets)]
    for name in sorted(wanted):
        fn = funcs[name]
        fn.decorator_list = []
        body.append(fn)
    stub_npu = _Anything("torch_npu")
    env = {"torch": torch, "math": math, "os": os, "torch_npu": stub_npu, "ErrCode": _Anything("ErrCode"),
           "ops_error": lambda *a, **k: "", "get_cann_version": lambda: "0", "get_soc_version": lambda: 0,
           "warnings": __import__("warnings")}
    exec(compile(ast.Module(body=body, type_ignores=[]), meta_path, "exec"), env)   # noqa: S102 - the wheel's code
    return {op: env[fn] for op, fn in by_op.items()}


# --- binding ------------------------------------------------------------------------------------

def _bind(name, schema, args, kwargs) -> dict:
    """Every schema argument by name: the call's values, else the schema's default."""
    params = list(schema.arguments)
    full = {}
    for a, v in zip(params, args):
        full[a.name] = v
    for k, v in kwargs.items():
        full[k] = v
    for a in params:
        if a.name not in full:
            if a.default_value is None and not str(a.type).startswith("Optional"):
                raise NpuSchemaError(f"{name}: missing required argument {a.name!r}")
            full[a.name] = a.default_value
    return full


def _check_returns(name, schema, result):
    n = len(schema.returns)
    if n == 1:
        kind = str(schema.returns[0].type)
        ok = isinstance(result, torch.Tensor) if kind == "Tensor" else (
            isinstance(result, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in result))
        if not ok:
            raise NpuSchemaError(f"{name}: the schema returns {kind}, the emulator returned {type(result).__name__}")
        return
    if not isinstance(result, tuple) or len(result) != n:
        got = len(result) if isinstance(result, tuple) else type(result).__name__
        raise NpuSchemaError(f"{name}: the schema returns {n} tensors, the emulator returned {got}")


def _check_meta(name, schema, meta, full, result):
    positional = [full[a.name] for a in schema.arguments if not a.kwarg_only]     # the meta functions' own names
    expected = meta(*positional, **{a.name: full[a.name] for a in schema.arguments if a.kwarg_only})
    exp = expected if isinstance(expected, (list, tuple)) else (expected,)
    got = result if isinstance(result, (list, tuple)) else (result,)
    if len(exp) != len(got):
        raise NpuSchemaError(f"{name}: the wheel's meta function returns {len(exp)} outputs, the emulator {len(got)}")
    for i, (e, g) in enumerate(zip(exp, got)):
        if e is None or g is None:
            if e is not g:
                raise NpuSchemaError(f"{name}: output {i}: meta {e!r}, emulator {g!r}")
            continue
        if tuple(e.shape) != tuple(g.shape) or e.dtype != g.dtype:
            raise NpuSchemaError(f"{name}: output {i}: the wheel's meta function gives {tuple(e.shape)} {e.dtype}, "
                                 f"the emulator {tuple(g.shape)} {g.dtype}")


class SchemaBinding:
    """The emulated ops bound to the installed wheel's schemas (or the reason they could not be)."""

    def __init__(self, impls: dict[str, Callable]):
        self.impls = impls
        self.ops: dict[str, Callable] = {}
        self.schemas: dict[str, tuple[str, int]] = {}
        self.meta: dict[str, Callable] = {}
        self.pkg_dir = torch_npu_dir()
        self.version = wheel_version(self.pkg_dir) if self.pkg_dir else None
        self.reason = None
        self.meta_reason = None
        if self.pkg_dir is None:
            self.reason = ("torch_npu's npu_native_functions_by_codegen.yaml was not found (set HAL_ASCEND_TORCH_NPU_DIR "
                           "or HAL_TEST_TORCH_NPU_PATH to a folder holding the wheel's torch_npu/): the emulator runs "
                           "UNBOUND, its Python signatures unchecked against the real ops")
            return
        self.schemas = read_schemas(set(impls), os.path.join(self.pkg_dir, YAML_PATH))
        missing = sorted(set(impls) - set(self.schemas))
        if missing:
            raise NpuSchemaError(f"the torch_npu {self.version} schema yaml has no op {', '.join(missing)}")
        meta_path = os.path.join(self.pkg_dir, META_PATH)
        try:
            self.meta = load_meta_functions(set(impls), meta_path)
        except Exception as exc:  # noqa: BLE001 - another wheel's meta module: bind the schemas all the same
            self.meta_reason = f"its meta functions could not be loaded ({type(exc).__name__}: {exc})"
        self._register()

    @property
    def bound(self) -> bool:
        return self.reason is None

    def describe(self) -> str:
        if not self.bound:
            return self.reason
        meta = self.meta_reason or f"outputs checked against its meta functions for {len(self.meta)} of {len(self.impls)} ops"
        return f"bound to torch_npu {self.version} schemas ({os.path.join(self.pkg_dir, YAML_PATH)}), {meta}"

    def _register(self):
        lib = _library()
        packet = getattr(torch.ops, NAMESPACE)
        for name in self.impls:
            text = self.schemas[name][0]
            if not hasattr(packet, name):
                lib.define(text)
                lib.impl(name, _Kernel(name, self), "CompositeExplicitAutograd")
            elif str(getattr(packet, name).default._schema).split("::", 1)[1] != str(
                    torch._C.parse_schema(f"{NAMESPACE}::{text}")).split("::", 1)[1]:
                raise NpuSchemaError(f"{NAMESPACE}::{name} is already registered under another schema in this process")
            self.ops[name] = getattr(packet, name)

    def call_impl(self, name, args, kwargs):
        schema = getattr(torch.ops, NAMESPACE).__getattr__(name).default._schema
        full = _bind(name, schema, args, kwargs)
        result = self.impls[name](**full)
        _check_returns(name, schema, result)
        if name in self.meta:
            _check_meta(name, schema, self.meta[name], full, result)
        return result


class _Kernel:
    """The torch.library kernel of one emulated op: binds by schema, runs, checks the outputs.
    The binding in use is looked up per call, so a rebinding (tests) takes effect."""

    def __init__(self, name, binding):
        self.name = name
        _ACTIVE[0] = binding

    def __call__(self, *args, **kwargs):
        return _ACTIVE[0].call_impl(self.name, args, kwargs)


_ACTIVE: list = [None]
_LIB: list = []


def _library():
    if not _LIB:
        _LIB.append(torch.library.Library(NAMESPACE, "DEF"))
    return _LIB[0]


def activate(binding: SchemaBinding) -> SchemaBinding:
    """Make ``binding`` the one the registered ``hal_npu_emu`` ops run; returns the previous one."""
    previous, _ACTIVE[0] = _ACTIVE[0], binding
    return previous


def bind(impls: dict[str, Callable]) -> SchemaBinding:
    """Bind the emulator's implementations (op name -> function taking every schema argument by
    keyword) to the installed wheel's schemas. ``.ops`` holds the callables to use: the
    ``torch.ops.hal_npu_emu`` ops when bound, else ``.reason`` says why not and ``.ops`` is empty."""
    b = SchemaBinding(impls)
    if b.bound:
        _ACTIVE[0] = b
    return b
