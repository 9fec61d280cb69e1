"""Every contract op as a torch.library custom op, ``torch.ops.hal.<op>``, generated from its spec.

The real implementation calls :mod:`hal.ops` (so it dispatches on the tensors' device); the fake
(meta) implementation is the spec's ``meta`` (output shapes and dtypes), so
``torch.compile(fullgraph=True)`` traces through HAL ops. torch's schema language forces two
differences from the Python API, both derived from the spec:

- a :class:`hal.DispatchPlan` travels as its fields: an argument ``plan`` becomes ``plan_hidden,
  plan_tokens_per_expert, plan_offsets, plan_source, plan_num_tokens, plan_top_k, plan_align``, and
  an op returning a plan returns ``(hidden, tokens_per_expert, offsets, source)`` (the row count N
  is data-dependent: an unbacked size in the fake);
- parameters in ``spec.torch_fixed`` are fixed (``sparse_attention`` always returns ``(out, lse)``).
Every parameter is positional-or-keyword in the schema, in the contract's order.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from hal.contract import CONTRACT, DispatchPlan, OpSpec, on_add_op

LIBRARY = "hal"
PLAN_FIELDS = (("hidden", "Tensor"), ("tokens_per_expert", "Tensor"), ("offsets", "Tensor"), ("source", "Tensor"),
               ("num_tokens", "int"), ("top_k", "int"), ("align", "int"))
_TYPES = {"torch.Tensor": "Tensor", "Tensor": "Tensor", "Optional[torch.Tensor]": "Optional[Tensor]",
          "int": "int", "float": "float", "bool": "bool", "str": "str", "torch.dtype": "torch.dtype"}

TORCH_OPS: dict[str, Any] = {}


def _is_plan(p: inspect.Parameter) -> bool:
    return "DispatchPlan" in str(p.annotation)


def flat_parameters(spec: OpSpec) -> list[tuple[str, str, Any]]:
    """``[(name, type, default)]`` of the torch.library op (``inspect.Parameter.empty``: none)."""
    out = []
    for p in spec.signature.parameters.values():
        if p.name in spec.torch_fixed:
            continue
        if _is_plan(p):
            out += [(f"{p.name}_{f}", t, inspect.Parameter.empty) for f, t in PLAN_FIELDS]
            continue
        kind = _TYPES.get(str(p.annotation))
        if kind is None:
            raise TypeError(f"{spec.name}: parameter {p.name}: no torch schema type for annotation {p.annotation!r}")
        out.append((p.name, kind, p.default))
    seen_default = False
    for name, _, default in out:
        if default is inspect.Parameter.empty and seen_default:
            raise TypeError(f"{spec.name}: parameter {name} without a default follows one with a default; "
                            "the torch.library schema keeps the contract's order, so reorder the contract's parameters")
        seen_default |= default is not inspect.Parameter.empty
    return out


def contract_call(spec: OpSpec, flat: dict) -> tuple[tuple, dict]:
    """The contract call ``(args, kwargs)`` for the torch op's flat arguments ``flat`` (by name)."""
    args, kwargs = [], {}
    for p in spec.signature.parameters.values():
        if p.name in spec.torch_fixed:
            value = spec.torch_fixed[p.name]
        elif _is_plan(p):
            value = DispatchPlan(*(flat[f"{p.name}_{f}"] for f, _ in PLAN_FIELDS))
        else:
            value = flat[p.name]
        if p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = value
        else:
            args.append(value)
    return tuple(args), kwargs


def torch_call(spec: OpSpec, args: tuple, kwargs: dict) -> tuple:
    """The torch op's positional arguments for the contract call ``(args, kwargs)`` (defaults
    applied, plans flattened, fixed parameters dropped): ``torch.ops.hal.<op>(*torch_call(...))``."""
    bound = spec.bind(*args, **kwargs).__dict__
    flat = []
    for p in spec.signature.parameters.values():
        if p.name in spec.torch_fixed:
            continue
        v = bound[p.name]
        if _is_plan(p):
            flat += [getattr(v, f) for f, _ in PLAN_FIELDS]
        else:
            flat.append(v)
    return tuple(flat)


def flatten_result(spec: OpSpec, out):
    """A contract op's result in the torch op's form (a plan as its four tensors)."""
    if isinstance(out, DispatchPlan):
        return out.tensors()
    return out


def _fake_outputs(spec: OpSpec, flat: dict):
    args, kwargs = contract_call(spec, flat)
    metas = spec.meta(spec.bind(*args, **kwargs))
    like = next(v for v in flat.values() if isinstance(v, torch.Tensor))
    dynamic = None
    outs = []
    for m in metas:
        shape = []
        for d in m.shape:
            if d is None:                       # one unbacked size per call: a plan's N rows
                dynamic = dynamic if dynamic is not None else torch.library.get_ctx().new_dynamic_size()
                d = dynamic
            shape.append(d)
        outs.append(like.new_empty(shape, dtype=m.dtype))
    return outs[0] if spec.returns == "tensor" else tuple(outs)


def register(spec: OpSpec) -> Any:
    """Define ``torch.ops.hal.<spec.name>`` (real implementation + fake) from ``spec``; returns the
    custom op. Called for every contract op at import and by :func:`hal.contract.add_op`."""
    params = flat_parameters(spec)
    n_out = len(spec.outputs) if spec.returns != "plan" else 4
    ret = "Tensor" if spec.returns == "tensor" else "tuple[" + ", ".join(["Tensor"] * n_out) + "]"
    env: dict[str, Any] = {"Tensor": torch.Tensor, "Optional": __import__("typing").Optional, "torch": torch,
                           "_impl": None}
    header = []
    for name, kind, default in params:
        if default is inspect.Parameter.empty:
            header.append(f"{name}: {kind}")
        else:
            env[f"_d_{name}"] = default
            header.append(f"{name}: {kind} = _d_{name}")
    names = ", ".join(f"{n!r}: {n}" for n, _, _ in params)
    src = f"def {spec.name}({', '.join(header)}) -> {ret}:\n    return _impl({{{names}}})\n"
    exec(compile(src, f"<hal torch op {spec.name}>", "exec"), env)  # noqa: S102 - generated from the spec
    fn: Callable = env[spec.name]

    def impl(flat: dict):
        from hal import ops
        args, kwargs = contract_call(spec, flat)
        out = flatten_result(spec, getattr(ops, spec.name)(*args, **kwargs))
        # a custom op may not return its own inputs (aliasing): an identity result is copied
        if isinstance(out, torch.Tensor):
            return out.clone() if any(out is v for v in flat.values()) else out
        return tuple(o.clone() if any(o is v for v in flat.values()) else o for o in out)

    env["_impl"] = impl
    op = torch.library.custom_op(f"{LIBRARY}::{spec.name}", fn, mutates_args=())
    op.register_fake(_make_fake(spec, [n for n, _, _ in params]))
    TORCH_OPS[spec.name] = op
    return op


def _make_fake(spec: OpSpec, names: list[str]):
    def fake(*args, **kwargs):
        flat = dict(zip(names, args))
        flat.update(kwargs)
        for n, _, default in flat_parameters(spec):
            flat.setdefault(n, default)
        return _fake_outputs(spec, flat)
    return fake


for _spec in CONTRACT.values():
    register(_spec)
on_add_op(register)

__all__ = ["TORCH_OPS", "register", "flat_parameters", "contract_call", "torch_call", "flatten_result"]
