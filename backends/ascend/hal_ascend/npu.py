"""The seam: the torch_npu functions the backend calls, real or emulated.

``ops()`` returns an object with ``npu_moe_gating_top_k``, ``npu_moe_gating_top_k_softmax``,
``npu_moe_init_routing_v2``, ``npu_grouped_matmul``, ``npu_swiglu``, ``npu_lightning_indexer``,
``npu_sparse_flash_attention`` and ``npu_moe_finalize_routing``: ``torch_npu`` (and its ``custom`` namespace for the DSA ops) on
real hardware, :mod:`hal_ascend.emulator` when ``HAL_ASCEND_EMULATE=1``. The backend's kernels are
the same code in both modes.
"""
from __future__ import annotations

import os
import types

NAMES = ("npu_moe_gating_top_k", "npu_moe_gating_top_k_softmax", "npu_moe_init_routing_v2", "npu_grouped_matmul",
         "npu_swiglu", "npu_lightning_indexer", "npu_sparse_flash_attention", "npu_moe_finalize_routing")


def emulating() -> bool:
    return os.environ.get("HAL_ASCEND_EMULATE", "") not in ("", "0")


_ops = None


def ops():
    global _ops
    if _ops is None:
        if emulating():
            from hal_ascend import emulator as impl
            _ops = types.SimpleNamespace(**{n: getattr(impl, n) for n in NAMES})
        else:
            import torch
            import torch_npu
            custom = getattr(torch.ops, "custom", None)
            found = {}
            for n in NAMES:
                fn = getattr(torch_npu, n, None)
                if fn is None and custom is not None:
                    fn = getattr(custom, n, None)
                found[n] = fn
            _ops = types.SimpleNamespace(**found)
    return _ops


def reset() -> None:
    global _ops
    _ops = None
