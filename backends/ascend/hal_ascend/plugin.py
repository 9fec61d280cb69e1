"""The ascend backend's plugin module (entry point ``ascend`` in group ``hal.backends``)."""
from __future__ import annotations

import os
import re

import hal
from hal.backend import Availability, Backend, OpCapability, distribution_version

FP8_OPS = ("fp8_quantize", "fp8_quantize_weight", "fp8_gemm", "fp8_linear")
EMULATE_LABEL = "ascend (emulated torch_npu)"


def emulating() -> bool:
    return os.environ.get("HAL_ASCEND_EMULATE", "") not in ("", "0")


def combine_path() -> str:
    """moe_combine's implementation: "torch" (default) or "finalize_routing" (HAL_ASCEND_COMBINE)."""
    return os.environ.get("HAL_ASCEND_COMBINE", "torch")


def import_failure_reason(exc: BaseException) -> str:
    """A precise sentence for a failed ``import torch_npu``."""
    msg = str(exc)
    lib = re.search(r"(lib[\w.+-]+\.so[\w.]*)", msg)
    if lib:
        return (f"torch_npu cannot load the CANN runtime: {lib.group(1)} was not found. The CANN toolkit is not "
                "installed or not on the library path (install CANN and `source "
                "/usr/local/Ascend/ascend-toolkit/set_env.sh`); set HAL_ASCEND_EMULATE=1 to run the backend's code "
                "on the CPU emulator instead")
    if isinstance(exc, ModuleNotFoundError):
        return "torch_npu is not installed (`pip install torch-npu` matching your torch version)"
    return f"import torch_npu failed: {type(exc).__name__}: {msg}"


def soc_family(name: str) -> str:
    """'A2', 'A3', '950' or 'unknown' from the device name torch_npu reports (e.g. Ascend910B3)."""
    n = name.replace(" ", "")
    if "910_93" in n or "910C" in n:
        return "A3"
    if "910B" in n:
        return "A2"
    if "950" in n:
        return "950"
    return "unknown"


def capability_table(soc: str) -> dict:
    """Per op: path and note for a chip family."""
    from hal_ascend.ops import (attention_supports, finalize_supports, forward_supports, indexer_supports,
                                route_supports)
    halves = ("bfloat16", "float16")
    caps = {
        "moe_route": OpCapability("native", ("float32", "bfloat16", "float16"), "npu_moe_gating_top_k (sigmoid) / "
                                  "npu_moe_gating_top_k_softmax", supports=route_supports),
        "moe_dispatch": OpCapability("native", ("float32", "bfloat16", "float16"), "npu_moe_init_routing_v2 "
                                     "(+ padding to align with torch ops)"),
        "moe_experts": OpCapability("native", ("float32", "bfloat16", "float16"), "npu_grouped_matmul + npu_swiglu"),
        "moe_combine": (OpCapability("native", ("float32", "bfloat16", "float16"), "npu_moe_finalize_routing "
                                     "(HAL_ASCEND_COMBINE=finalize_routing)", supports=finalize_supports)
                        if combine_path() == "finalize_routing" else
                        OpCapability("native", ("float32", "bfloat16", "float16"), "torch ops on the NPU (fp32 "
                                     "weights; npu_moe_finalize_routing rounds them to the rows' dtype)")),
        "moe_forward": OpCapability("native", ("float32", "bfloat16", "float16"), "route -> init_routing_v2 -> "
                                    "grouped_matmul -> combine", supports=forward_supports),
        "lightning_indexer": OpCapability("native", halves, "npu_lightning_indexer (BSND, sparse_mode 3/0)",
                                          supports=indexer_supports),
        "sparse_attention": OpCapability("native", halves, "npu_sparse_flash_attention (MLA: 512 + 64 rope split); "
                                         "the logsumexp, which it does not return, by torch ops",
                                         supports=attention_supports),
    }
    fp8_note = ("Ascend 950 has FP8 units, but no FP8 GEMM mapping is certified yet: the reference arithmetic runs "
                "on the NPU" if soc == "950" else
                f"Atlas {soc} has no FP8 matrix unit: quantization arithmetic in fp32 and GEMMs on dequantized fp32 "
                "operands on the NPU (declared emulation)")
    for op in FP8_OPS:
        caps[op] = OpCapability("emulated", ("float8_e4m3fn",), fp8_note)
    caps["moe_experts"] = OpCapability("native", caps["moe_experts"].dtypes, caps["moe_experts"].note + "; FP8 "
                                       "weights: dequantized to fp32 (emulated)")
    return caps


class AscendBackend(Backend):
    name = "ascend"
    priority = 20

    def __init__(self):
        super().__init__(version=distribution_version("hal-ascend"))
        self.device_type = "cpu" if emulating() else "npu"
        self.soc = "A3 (emulated)" if emulating() else "unknown"

    def probe(self) -> Availability:
        import torch
        versions = {"hal-ascend": self.version, "torch": torch.__version__}
        if emulating():
            return Availability(True, "emulated torch_npu (no NPU hardware): HAL_ASCEND_EMULATE=1 runs the backend on "
                                "CPU tensors through hal_ascend.emulator", device="CPU (torch_npu emulator)",
                                versions=versions, label=EMULATE_LABEL)
        try:
            import torch_npu
        except BaseException as exc:  # noqa: BLE001 - an ImportError from a C extension, or worse
            if isinstance(exc, KeyboardInterrupt):
                raise
            return Availability(False, import_failure_reason(exc), versions=versions)
        versions["torch_npu"] = getattr(torch_npu, "__version__", "?")
        tv, nv = torch.__version__.split("+")[0].split(".")[:2], versions["torch_npu"].split("+")[0].split(".")[:2]
        if tv != nv:
            return Availability(False, f"torch {torch.__version__} and torch_npu {versions['torch_npu']} do not "
                                "match (torch_npu must be built for the same torch minor version)", versions=versions)
        if not torch.npu.is_available() or torch.npu.device_count() == 0:
            return Availability(False, "torch_npu loaded but no NPU device is visible (driver, ASCEND_RT_VISIBLE_DEVICES)",
                                versions=versions)
        name = torch.npu.get_device_name(0)
        self.soc = soc_family(name)
        return Availability(True, f"ascend: {name} (Atlas {self.soc})", device=name, versions=versions,
                            label=f"ascend ({name})")

    def capabilities(self):
        return capability_table(self.soc.split()[0])

    def kernels(self):
        from hal.backends.cpu import KERNELS
        from hal_ascend import ops
        k = {name: getattr(ops, name) for name in ("moe_route", "moe_dispatch", "moe_experts", "moe_combine",
                                                   "moe_forward", "lightning_indexer", "sparse_attention")}
        if combine_path() == "finalize_routing":
            k["moe_combine"] = ops.moe_combine_finalize
        k.update({op: KERNELS[op] for op in FP8_OPS})          # the declared emulation (see capability_table)
        return k


@hal.hookimpl
def hal_contract_version() -> str:
    return "1.0"


@hal.hookimpl
def hal_backend() -> Backend:
    return AscendBackend()
