"""The bound ops' memory of validated calls: a call is validated once per call signature.

A call signature is every non-tensor argument's value and type (``1 == 1.0 == True``), which
optional tensors are absent, and, for every tensor present, its Python type, shape, strides,
dtype, device and requires_grad (TensorGuards also compares its dispatch keys). Only calls
whose validation does not read tensor data are remembered (device tensors outside checked mode:
see :func:`hal.contract.data_checks`), so a remembered signature is exactly as valid as the call
that was checked.

The tensor half is compared in one C call: by HAL's compiled check where ``hal build-checks``
has built it for this torch (:mod:`hal.compiled_check`, about 0.04 µs per tensor on the CI CPU),
else by ``torch._C._dynamo.guards.TensorGuards`` (what ``torch.compile`` uses to decide whether a
compiled graph still applies; 0.2-0.45 µs per tensor, still about 4 times cheaper than building a
Python tuple of ``(t.shape, t.dtype, t.device)`` per tensor and hashing it). Where that class is
missing or does not behave as expected (checked once, at import), :class:`PythonTensorGuard` does
the same comparison in Python.

A bound op tries the last signature that matched first (:func:`last_signature`: its non-tensor
parts compared by identity, which needs no key tuple and no dict lookup), then the signatures
remembered for the call's non-tensor key (:func:`key_source`). ``hal bench overhead`` shows the
tensor comparison's share (columns ``tensors`` and ``guard``).
"""
from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch

MAX_SIGNATURES = 4096          # per bound op: distinct non-tensor argument tuples remembered
MAX_GUARDS_PER_KEY = 8         # per non-tensor argument tuple: tensor signatures remembered



class PythonTensorGuard:
    """The tensors' type, shape, strides, dtype, device and requires_grad, compared in Python."""

    def __init__(self, *tensors: torch.Tensor):
        self._sig = self._signature(tensors)

    @staticmethod
    def _signature(tensors) -> Optional[tuple]:
        try:
            return tuple((type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in tensors)
        except AttributeError:
            return None

    def check(self, *tensors) -> bool:
        return self._sig is not None and len(tensors) == len(self._sig) and self._signature(tensors) == self._sig


def _torch_guard_class():
    """``TensorGuards`` when it is importable and compares what this module needs, else None."""
    try:
        from torch._C._dynamo.guards import TensorGuards
        a, b = torch.empty(2, 3), torch.empty(4)
        g = TensorGuards(a, b, dynamic_dims_sizes=[[2, 3], [4]], dynamic_dims_strides=[[3, 1], [1]])
        same = g.check(torch.empty(2, 3), torch.empty(4))
        refused = [torch.empty(3, 2), b], [torch.empty(3, 2).t(), b], [a.double(), b], [a, None], \
                  [a.to("meta"), b], [torch.nn.Parameter(a), b]
        if same and not any(g.check(*args) for args in refused):
            return TensorGuards
    except Exception:  # noqa: BLE001 - any surprise: use the Python comparison
        pass
    return None


_TensorGuards = _torch_guard_class()


class CompiledGuard:
    """A guard whose ``check`` is :mod:`hal.compiled_check`'s C function bound to the signature."""

    __slots__ = ("check",)

    def __init__(self, check):
        self.check = check


_compiled_guard = None        # hal.compiled_check's signature_guard, once looked up
_compiled_looked_up = False


def _compiled():
    """The compiled ``signature_guard`` when ``hal build-checks`` built it for this torch, else None
    (looked up once per process; :func:`hal.compiled_check.load`)."""
    global _compiled_guard, _compiled_looked_up
    if not _compiled_looked_up:
        from hal import compiled_check
        module = compiled_check.load()           # never raises: an unusable build is None, with a reason
        _compiled_guard = module.signature_guard if module is not None else None
        _compiled_looked_up = True
    return _compiled_guard


def forget_compiled() -> None:
    """Look the compiled check up again at the next guard (after a build)."""
    global _compiled_looked_up
    _compiled_looked_up = False


def tensor_guard(tensors: Sequence[torch.Tensor]):
    """An object whose ``check(*tensors)`` is True for tensors with the same type, shape, strides,
    dtype, device and requires_grad as ``tensors`` (False for anything else, never raising for a
    non-tensor). The compiled check (:mod:`hal.compiled_check`) where it is built and takes these
    tensors; else ``TensorGuards``, which also compares dispatch keys and refuses one tensor
    object passed twice (``k is v`` in MLA attention), so such calls get the Python comparison,
    which ignores aliasing as validation does."""
    signature_guard = _compiled()
    if signature_guard is not None:
        check = signature_guard(*tensors)
        if check is not None:
            return CompiledGuard(check)
    if _TensorGuards is None or len({id(t) for t in tensors}) < len(tensors):
        return PythonTensorGuard(*tensors)
    return _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                         dynamic_dims_strides=[list(t.stride()) for t in tensors])


def guard_kind() -> str:
    """Which comparison this process uses (shown by ``hal bench overhead``)."""
    if _compiled() is not None:
        return "HAL's compiled check (C++, hal build-checks)"
    return ("TensorGuards (C++; `hal build-checks` builds HAL's cheaper compiled check)" if _TensorGuards is not None
            else "Python tuples")


def remember(seen: dict, key, tensors: tuple):
    """Record that the call with non-tensor signature ``key`` and these tensors was valid; return
    the new guard."""
    guards = seen.get(key)
    if guards is None:
        if len(seen) >= MAX_SIGNATURES:
            seen.clear()
        guards = seen[key] = []
    try:
        guard = tensor_guard(tensors)
    except Exception:  # noqa: BLE001 - e.g. a tensor subclass TensorGuards cannot take
        guard = PythonTensorGuard(*tensors)
    guards.insert(0, guard)
    del guards[MAX_GUARDS_PER_KEY:]
    return guard


_IMMUTABLE = (int, float, bool, str, type(None), torch.dtype)


def never(*tensors) -> bool:
    """The last-signature check before any signature is remembered: never a hit."""
    return False


def all_immutable(*values) -> bool:
    """Whether every value is of a type whose objects cannot change, or is a class or an Enum
    member (so that being the same object as a validated call's argument implies being equal to
    it)."""
    return all(type(v) in _IMMUTABLE or isinstance(v, (type, enum.Enum)) for v in values)


def last_signature(spec) -> list[tuple[str, str]]:
    """``(global name, expression)`` for each non-tensor part of a call that the last-signature
    fast path compares by identity: every non-tensor argument, each DispatchPlan's class and
    integer fields, and each optional tensor's absence (``x is None``, a bool singleton)."""
    out = []
    for p in spec.signature.parameters.values():
        ann = str(p.annotation)
        if "DispatchPlan" in ann:
            out += [(f"_L_{p.name}_class", f"{p.name}.__class__")]
            out += [(f"_L_{p.name}_{f}", f"{p.name}.{f}") for f in ("num_tokens", "top_k", "align")]
        elif "Tensor" in ann:
            if "Optional" in ann or p.default is None:
                out.append((f"_L_{p.name}_absent", f"({p.name} is None)"))
        else:
            out.append((f"_L_{p.name}", p.name))
    return out


def key_source(spec) -> str:
    """Source of the expression for a call's non-tensor signature: every non-tensor argument's
    value and, unless it is a str, its class (``1``, ``1.0`` and ``True`` compare equal), each
    optional tensor's absence,
    each DispatchPlan's class and integer fields."""
    parts = []
    for p in spec.signature.parameters.values():
        ann = str(p.annotation)
        if "DispatchPlan" in ann:
            parts.append(f"{p.name}.__class__, {p.name}.num_tokens, {p.name}.top_k, {p.name}.align, "
                         f"{p.name}.num_tokens.__class__, {p.name}.top_k.__class__, {p.name}.align.__class__")
        elif "Tensor" in ann:
            if "Optional" in ann or p.default is None:
                parts.append(f"{p.name} is None")
        elif ann == "str":          # a str-valued Enum equal to an allowed string is as valid as the string
            parts.append(p.name)
        else:
            parts.append(f"{p.name}, {p.name}.__class__")
    return "(" + "".join(part + ", " for part in parts) + ")"


def _tensor_slots(spec) -> list[tuple[str, bool]]:
    """``(expression, optional)`` for each tensor a guard may compare, in parameter order."""
    slots = []
    for p in spec.signature.parameters.values():
        ann = str(p.annotation)
        if "DispatchPlan" in ann:
            slots += [(f"{p.name}.{f}", False) for f in ("hidden", "tokens_per_expert", "offsets", "source")]
        elif "Tensor" in ann:
            slots.append((p.name, "Optional" in ann or p.default is None))
    return slots


def guard_call_lines(spec, indent: str, check: str, result: str) -> list[str]:
    """Source lines that set ``result`` to ``check(<the call's present tensors>)`` with no tuple
    built: one branch per combination of present optional tensors (at most 2**4 here), each calling
    ``check`` with its tensors directly. Same tensors, same order as :func:`tensors_lines`."""
    slots = _tensor_slots(spec)

    def tree(i: int, present: list[str], pad: str) -> list[str]:
        if i == len(slots):
            return [f"{pad}{result} = {check}({', '.join(present)})"]
        expr, optional = slots[i]
        if not optional:
            return tree(i + 1, present + [expr], pad)
        return ([f"{pad}if {expr} is None:"] + tree(i + 1, present, pad + "    ") +
                [f"{pad}else:"] + tree(i + 1, present + [expr], pad + "    "))
    return tree(0, [], indent)


def tensors_lines(spec, indent: str) -> list[str]:
    """Source lines that set ``_ts`` to the tuple of the call's tensors a guard compares: every
    tensor argument in parameter order (a DispatchPlan as its four tensors), an optional tensor only
    when it is present. Absent ones need no guard entry: the non-tensor key (:func:`key_source`)
    records which are None, so one key always goes with one tensor count."""
    required, lines = [], []
    for expr, optional in _tensor_slots(spec):
        if optional:
            lines += [f"{indent}if {expr} is not None:", f"{indent}    _ts += ({expr},)"]
        elif lines:
            lines.append(f"{indent}_ts += ({expr},)")
        else:
            required.append(expr)
    return [f"{indent}_ts = ({''.join(r + ', ' for r in required)})"] + lines
