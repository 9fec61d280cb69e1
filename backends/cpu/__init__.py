"""The CPU reference backend: the executable definition of the HAL contract.

One ``op_<name>.py`` per contract op, each a few lines of torch that read like SPEC.md, computing
in fp32 (or fp64 inside :func:`float64_evaluation`), deterministic, ties toward the lower index.
Kernels assume arguments already validated by the contract (call them through a runtime or
``hal.ops``, which validate). Registered through the ``hal.backends`` entry point
(``cpu = hal.backends.cpu.plugin``), exactly like any third-party backend.
"""
from ._precision import float64_evaluation
from .op_fp8_gemm import fp8_gemm
from .op_fp8_linear import fp8_linear
from .op_fp8_quantize import fp8_quantize
from .op_fp8_quantize_weight import fp8_quantize_weight
from .op_lightning_indexer import lightning_indexer
from .op_moe_combine import moe_combine
from .op_moe_dispatch import moe_dispatch
from .op_moe_experts import moe_experts
from .op_moe_forward import moe_forward
from .op_moe_route import moe_route
from .op_sparse_attention import sparse_attention

KERNELS = {
    "moe_route": moe_route,
    "moe_dispatch": moe_dispatch,
    "moe_experts": moe_experts,
    "moe_combine": moe_combine,
    "moe_forward": moe_forward,
    "lightning_indexer": lightning_indexer,
    "sparse_attention": sparse_attention,
    "fp8_quantize": fp8_quantize,
    "fp8_quantize_weight": fp8_quantize_weight,
    "fp8_gemm": fp8_gemm,
    "fp8_linear": fp8_linear,
}

__all__ = ["KERNELS", "float64_evaluation", *KERNELS]
