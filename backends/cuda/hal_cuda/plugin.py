"""The cuda backend's plugin module (entry point ``cuda`` in group ``hal.backends``)."""
from __future__ import annotations

import importlib
import os

import hal
from hal.backend import Availability, Backend, OpCapability, distribution_version

OPS = ("moe_route", "moe_dispatch", "moe_experts", "moe_combine", "moe_forward", "lightning_indexer",
       "sparse_attention", "fp8_quantize", "fp8_quantize_weight", "fp8_gemm", "fp8_linear")
FP8_OPS = ("fp8_quantize", "fp8_quantize_weight", "fp8_gemm", "fp8_linear")
FLOATS = ("float32", "bfloat16", "float16")


def interpreting() -> bool:
    return os.environ.get("HAL_CUDA_INTERPRET", "") not in ("", "0")


if interpreting():
    # before anything imports triton: the interpreter switch is read when kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"


class CudaBackend(Backend):
    """NVIDIA GPUs through Triton kernels (and cuBLAS block-scaled FP8 on SM90)."""

    name = "cuda"
    priority = 30

    def __init__(self):
        super().__init__(version=distribution_version("hal-cuda"))
        self.device_type = "cpu" if interpreting() else "cuda"

    def probe(self) -> Availability:
        import torch
        versions = {"hal-cuda": self.version, "torch": torch.__version__}
        try:
            import triton
            versions["triton"] = triton.__version__
        except Exception as exc:  # noqa: BLE001
            return Availability(False, f"triton is not importable ({type(exc).__name__}: {exc}); "
                                "`pip install triton`", versions=versions)
        if interpreting():
            return Availability(True, "cuda (Triton interpreter, no GPU): HAL_CUDA_INTERPRET=1 runs the Triton "
                                "kernels on CPU tensors", device="CPU via the Triton interpreter", versions=versions,
                                label="cuda (Triton interpreter, no GPU)")
        if torch.version.cuda is None:
            return Availability(False, f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build "
                                "of torch (or set HAL_CUDA_INTERPRET=1 to run the kernels under the Triton "
                                "interpreter)", versions=versions)
        versions["cuda"] = torch.version.cuda
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return Availability(False, "torch sees no CUDA device (driver missing, no GPU, or CUDA_VISIBLE_DEVICES "
                                "hides it)", versions=versions)
        cc = torch.cuda.get_device_capability(0)
        if cc < (8, 0):
            return Availability(False, f"compute capability {cc[0]}.{cc[1]} is below 8.0 (the Triton kernels need "
                                "Ampere or newer)", versions=versions)
        return Availability(True, f"cuda: {torch.cuda.get_device_name(0)} (sm_{cc[0]}{cc[1]})",
                            device=f"{torch.cuda.get_device_name(0)} (compute capability {cc[0]}.{cc[1]})",
                            versions=versions, label=f"cuda ({torch.cuda.get_device_name(0)})")

    def capabilities(self):
        return capability_table(None if interpreting() else _capability())

    def kernels(self):
        if interpreting():
            os.environ["TRITON_INTERPRET"] = "1"
        return {op: getattr(importlib.import_module(f"hal_cuda.op_{op}"), op) for op in OPS}

    def benchmarks(self):
        from hal_cuda.bench import benchmarks
        return benchmarks()


def _capability():
    import torch
    return torch.cuda.get_device_capability(0)


def capability_table(cc) -> dict:
    """Per op: native, or (FP8 below compute capability 8.9) emulated: the same Triton kernels
    compute the fp8 values in fp32 on GPUs without FP8 tensor cores."""
    caps = {op: OpCapability("native", FLOATS, "Triton kernel") for op in OPS}
    for op in ("moe_dispatch", "moe_combine"):
        caps[op] = OpCapability("native", FLOATS, "device-side torch ops (histogram, prefix sum, permutation)")
    caps["moe_forward"] = OpCapability("native", FLOATS + ("float8_e4m3fn",), "fused route kernel, sync-free dispatch, "
                                       "grouped GEMMs, combine")
    caps["fp8_gemm"] = OpCapability("native", ("float8_e4m3fn",), "cuBLAS block-scaled FP8 on SM90, Triton elsewhere")
    caps["fp8_linear"] = OpCapability("native", FLOATS, "fused Triton quantize + FP8 GEMM")
    caps["moe_experts"] = OpCapability("native", FLOATS + ("float8_e4m3fn",),
                                       "torch._grouped_mm (bf16, SM90) or the Triton grouped GEMM")
    if cc is not None and tuple(cc) < (8, 9):
        for op in FP8_OPS + ("moe_experts", "moe_forward"):
            caps[op] = OpCapability("emulated", caps[op].dtypes,
                                    f"compute capability {cc[0]}.{cc[1]} < 8.9 has no FP8 tensor cores: fp8 operands "
                                    "are converted to fp32/bf16 inside the Triton kernels")
    return caps


@hal.hookimpl
def hal_contract_version() -> str:
    return "1.0"


@hal.hookimpl
def hal_backend() -> Backend:
    return CudaBackend()
