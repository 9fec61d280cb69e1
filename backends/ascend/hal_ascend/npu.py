"""The seam: the torch_npu functions the backend calls, real or emulated.

``functions()`` returns an object with ``npu_moe_gating_top_k``, ``npu_moe_gating_top_k_softmax``,
``npu_moe_init_routing_v2``, ``npu_grouped_matmul``, ``npu_swiglu``, ``npu_lightning_indexer``,
``npu_sparse_flash_attention`` and ``npu_moe_finalize_routing``: ``torch_npu`` (and its ``custom``
namespace for the DSA ops) on real hardware; with ``HAL_ASCEND_EMULATE=1`` the
:mod:`hal_ascend.emulator` functions registered under the installed wheel's own schemas
(``torch.ops.hal_npu_emu.*``, see :mod:`hal_ascend.schema`), or, when the wheel is absent, the
plain functions (``binding().reason`` says so). The backend's kernels are the same code in all modes.
"""
from __future__ import annotations

import os
import types

NAMES = ("npu_moe_gating_top_k", "npu_moe_gating_top_k_softmax", "npu_moe_init_routing_v2", "npu_grouped_matmul",
         "npu_swiglu", "npu_lightning_indexer", "npu_sparse_flash_attention", "npu_moe_finalize_routing")


def emulating() -> bool:
    return os.environ.get("HAL_ASCEND_EMULATE", "") not in ("", "0")


_functions = None
_binding = None


def binding():
    """The emulator's :class:`hal_ascend.schema.SchemaBinding` (created once per process)."""
    global _binding
    if _binding is None:
        from hal_ascend import emulator, schema
        _binding = schema.bind({n: emulator.IMPLS[n] for n in NAMES})
    return _binding


def functions():
    global _functions
    if _functions is None:
        if emulating():
            b = binding()
            if b.bound:
                _functions = types.SimpleNamespace(**b.ops)
            else:
                from hal_ascend import emulator
                _functions = types.SimpleNamespace(**{n: emulator.IMPLS[n] for n in NAMES})
        else:
            import torch
            import torch_npu
            found, missing = {}, []
            for n in NAMES:
                fn = getattr(torch_npu, n, None)
                for ns in ("npu", "custom"):             # torch.ops.npu.* / torch.ops.custom.* (the DSA ops)
                    if fn is None:
                        try:
                            fn = getattr(getattr(torch.ops, ns), n)
                        except (AttributeError, RuntimeError):
                            fn = None
                if fn is None:
                    missing.append(n)
                found[n] = fn
            if missing:
                raise RuntimeError(f"torch_npu {getattr(torch_npu, '__version__', '?')} has no {', '.join(missing)} "
                                   "(neither torch_npu.<op> nor torch.ops.npu / torch.ops.custom)")
            _functions = types.SimpleNamespace(**found)
    return _functions


def format_cast_nz(t):
    """``torch_npu.npu_format_cast(t, FRACTAL_NZ)`` for a tensor on an NPU; any other tensor (the
    emulator's CPU tensors: no storage formats there) comes back as it is."""
    if t.device.type != "npu":
        return t
    import torch_npu
    from hal_ascend.limits import ACL_FORMAT_FRACTAL_NZ
    return torch_npu.npu_format_cast(t, ACL_FORMAT_FRACTAL_NZ)


def reset() -> None:
    """Forget the resolved ops and the emulator's binding (both are looked up again on next use)."""
    global _functions, _binding
    _functions = None
    _binding = None
