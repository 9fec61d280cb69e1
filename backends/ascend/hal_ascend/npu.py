"""The seam: the torch_npu functions the backend calls, real or emulated.

``functions()`` returns an object with ``npu_moe_gating_top_k``, ``npu_moe_gating_top_k_softmax``,
``npu_moe_init_routing_v2``, ``npu_grouped_matmul``, ``npu_swiglu``, ``npu_lightning_indexer``,
``npu_sparse_flash_attention``, ``npu_moe_finalize_routing``, ``npu_chunk_gated_delta_rule``,
``npu_recurrent_gated_delta_rule``, ``npu_fused_causal_conv1d`` and the MC2 pair
``npu_moe_distribute_dispatch_v2`` / ``npu_moe_distribute_combine_v2``: ``torch_npu`` (and its ``custom``
namespace for the DSA ops) on real hardware; with ``HAL_ASCEND_EMULATE=1`` the
:mod:`hal_ascend.emulator` functions registered under the installed wheel's own schemas
(``torch.ops.hal_npu_emu.*``, see :mod:`hal_ascend.schema`), or, when the wheel is absent, the
plain functions (``binding().reason`` says so). The backend's kernels are the same code in all modes.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import types

NAMES = ("npu_moe_gating_top_k", "npu_moe_gating_top_k_softmax", "npu_moe_init_routing_v2", "npu_grouped_matmul",
         "npu_swiglu", "npu_lightning_indexer", "npu_sparse_flash_attention", "npu_moe_finalize_routing",
         "npu_chunk_gated_delta_rule", "npu_recurrent_gated_delta_rule", "npu_fused_causal_conv1d",
         "npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2")


def emulating() -> bool:
    """The process default of the emulate mode: ``HAL_ASCEND_EMULATE``."""
    return os.environ.get("HAL_ASCEND_EMULATE", "") not in ("", "0")


# the mode of the backend instance whose kernel is running (AscendBackend wraps its kernels so),
# so one process can hold an emulated and a real hal-ascend runtime at once
_MODE: contextvars.ContextVar = contextvars.ContextVar("hal_ascend_emulate", default=None)
_functions: dict = {}
_binding = None


@contextlib.contextmanager
def mode(emulate: bool):
    """Within the block, :func:`functions` returns the emulated (True) or real (False) seam."""
    token = _MODE.set(bool(emulate))
    try:
        yield
    finally:
        _MODE.reset(token)


def binding():
    """The emulator's :class:`hal_ascend.schema.SchemaBinding` (created once per process)."""
    global _binding
    if _binding is None:
        from hal_ascend import emulator, schema
        _binding = schema.bind({n: emulator.IMPLS[n] for n in NAMES})
    return _binding


def is_emulating() -> bool:
    """Whether the running kernel's seam is the emulator (see :func:`mode`)."""
    emulate = _MODE.get()
    return emulating() if emulate is None else bool(emulate)


def functions():
    """The seam for the running kernel's mode (see :func:`mode`; default :func:`emulating`)."""
    emulate = _MODE.get()
    emulate = emulating() if emulate is None else emulate
    found = _functions.get(emulate)
    if found is None:
        found = _functions[emulate] = _emulated() if emulate else _real()
    return found


def _emulated():
    b = binding()
    if b.bound:
        return types.SimpleNamespace(**b.ops)
    from hal_ascend import emulator
    return types.SimpleNamespace(**{n: emulator.IMPLS[n] for n in NAMES})


def _real():
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
    return types.SimpleNamespace(**found)


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
    global _binding
    _functions.clear()
    _binding = None
