"""The cuda backend's plugin module (entry point ``cuda`` in group ``hal.backends``)."""
from __future__ import annotations

import importlib
import os

import hal
from hal.backend import Availability, Backend, OpCapability, distribution_version

OPS = ("moe_route", "moe_dispatch", "moe_experts", "moe_combine", "moe_forward", "lightning_indexer",
       "sparse_attention", "fp8_quantize", "fp8_quantize_weight", "fp8_gemm", "fp8_linear", "gated_delta_rule",
       "causal_conv1d", "ep_dispatch", "ep_combine")
EP_OPS = ("ep_dispatch", "ep_combine")
FP8_OPS = ("fp8_quantize", "fp8_quantize_weight", "fp8_gemm", "fp8_linear")
FLOATS = ("float32", "bfloat16", "float16")


def interpret_default() -> bool:
    """The default of the backend's ``interpret`` option: ``HAL_CUDA_INTERPRET`` set (not "0")."""
    return os.environ.get("HAL_CUDA_INTERPRET", "") not in ("", "0")


INTERPRETER_LABEL = "cuda (Triton interpreter, no GPU)"


class CudaBackend(Backend):
    """NVIDIA GPUs through Triton kernels (and cuBLAS block-scaled FP8 on SM90); compute
    capability 8.0 or newer, the FP8 ops from 8.9 (see :func:`fp8_unavailable_reason`).

    ``interpret``: run the same Triton kernels on CPU tensors under the Triton interpreter (this
    instance only; device_type "cpu"); None takes the default from ``HAL_CUDA_INTERPRET``. A
    process can hold an interpreted instance (``hal.runtime("cuda", options={"interpret": True})``)
    next to a real one: the kernels are defined once and each launch picks its mode
    (:mod:`hal_cuda._triton`)."""

    name = "cuda"
    priority = 30

    def __init__(self, interpret: "bool | None" = None):
        super().__init__(version=distribution_version("hal-cuda"))
        self.interpret_from_env = interpret is None
        self.interpret = interpret_default() if interpret is None else bool(interpret)
        self.device_type = "cpu" if self.interpret else "cuda"

    def with_options(self, *, interpret: "bool | None" = None, **unknown) -> "CudaBackend":
        """This backend with ``interpret`` set for this instance only (``hal.runtime("cuda",
        options={"interpret": True})``); ``HAL_CUDA_INTERPRET`` only gives the default."""
        if unknown:
            raise TypeError(f"backend 'cuda' takes the option 'interpret', not {', '.join(sorted(unknown))}")
        return CudaBackend(interpret=interpret)

    def probe(self) -> Availability:
        import torch
        versions = {"hal-cuda": self.version, "torch": torch.__version__}
        try:
            import triton
            versions["triton"] = triton.__version__
        except Exception as exc:  # noqa: BLE001
            return Availability(False, f"triton is not importable ({type(exc).__name__}: {exc}); "
                                "`pip install triton`", versions=versions)
        if self.interpret:
            how = "HAL_CUDA_INTERPRET=1" if self.interpret_from_env else "the interpret option"
            return Availability(True, f"{INTERPRETER_LABEL}: {how} runs the Triton kernels on CPU tensors",
                                device="CPU via the Triton interpreter", versions=versions, label=INTERPRETER_LABEL)
        if torch.version.cuda is None:
            return Availability(False, f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build "
                                "of torch (or set HAL_CUDA_INTERPRET=1, or options={'interpret': True}, to run "
                                "the kernels under the Triton interpreter)", versions=versions)
        versions["cuda"] = torch.version.cuda
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return Availability(False, "torch sees no CUDA device (driver missing, no GPU, or CUDA_VISIBLE_DEVICES "
                                "hides it)", versions=versions)
        cc = torch.cuda.get_device_capability(0)
        if cc < (8, 0):
            return Availability(False, f"compute capability {cc[0]}.{cc[1]} is below 8.0 (the Triton kernels need "
                                "Ampere or newer)", versions=versions)
        fp8 = fp8_unavailable_reason(cc)
        fp8_note = f"; FP8 ops unavailable: {fp8}" if fp8 else ""
        return Availability(True, f"cuda: {torch.cuda.get_device_name(0)} (sm_{cc[0]}{cc[1]}){fp8_note}",
                            device=f"{torch.cuda.get_device_name(0)} (compute capability {cc[0]}.{cc[1]})",
                            versions=versions, label=f"cuda ({torch.cuda.get_device_name(0)})")

    def capabilities(self):
        return capability_table(None if self.interpret else _capability())

    def kernels(self):
        """Every op, bound to this instance's mode: its launches run under the Triton interpreter
        when ``interpret`` is set, compiled for the GPU otherwise (:func:`hal_cuda._triton.mode`)."""
        from hal_cuda._triton import in_mode
        return {op: in_mode(getattr(importlib.import_module(f"hal_cuda.op_{op}"), op), self.interpret) for op in OPS}

    def benchmarks(self):
        from hal_cuda.bench import benchmarks
        return benchmarks()


def _capability():
    import torch
    return torch.cuda.get_device_capability(0)


FP8_MIN_CAPABILITY = (8, 9)


def fp8_unavailable_reason(cc) -> "str | None":
    """Why the FP8 kernels cannot run on compute capability ``cc`` (a (major, minor) pair), or
    None from sm_89 (Ada, Hopper and newer). Below 8.9 Triton has no e4m3 type
    ("fp8e4nv not supported"), so the FP8 kernels do not compile: the ops are declined."""
    if cc is None or tuple(cc) >= FP8_MIN_CAPABILITY:
        return None
    return (f"compute capability {cc[0]}.{cc[1]} < 8.9: no float8_e4m3fn support in Triton on this GPU "
            "(the FP8 kernels do not compile for it)")


def _decline(reason):
    def supports(*args, **kwargs):
        return reason
    return supports


def _decline_fp8_weights(reason):
    def supports(*args, w_gate_up_scale=None, **kwargs):
        return reason if w_gate_up_scale is not None else None
    return supports


def _decline_fp8_indexer(reason):
    def supports(q, *args, **kwargs):
        return reason if q.dtype == _float8() else None
    return supports


def _gdr_supports(q, *args, **kwargs):
    """Decline key dims whose state tile would not fit in registers (a GPU limit only)."""
    from hal_cuda.op_gated_delta_rule import unsupported_reason
    return unsupported_reason(q.shape[-1])


def ep_note(device_type: str = "cuda") -> str:
    """How hal-cuda runs the expert-parallel ops: DeepEP's low-latency kernels where they fit
    (:mod:`hal_cuda.ep_deepep`), else torch.distributed."""
    from hal_cuda.ep_deepep import deepep_note
    return ("torch.distributed all_to_all_single over the tensors' device (NCCL on GPUs, gloo under the "
            "interpreter), bookkeeping on the device, one host read of the row counts per call; "
            + deepep_note(device_type))


def _float8():
    import torch
    return torch.float8_e4m3fn


def capability_table(cc) -> dict:
    """Per op: how it runs on compute capability ``cc`` (None: the Triton interpreter).

    From sm_89 every op is native. Below it the FP8 ops are declined on every call, and
    moe_experts / moe_forward with FP8 weights and lightning_indexer with float8 q/k are declined
    per call (their ``supports`` gives :func:`fp8_unavailable_reason`), so the runtime's fallback
    policy applies and says why; their bf16/fp16/fp32 calls stay native."""
    caps = {op: OpCapability("native", FLOATS, "Triton kernel") for op in OPS}
    for op in ("moe_dispatch", "moe_combine"):
        caps[op] = OpCapability("native", FLOATS, "device-side torch ops (histogram, prefix sum, permutation)")
    caps["moe_forward"] = OpCapability("native", FLOATS + ("float8_e4m3fn",), "fused route kernel, sync-free dispatch, "
                                       "grouped GEMMs, combine")
    caps["fp8_gemm"] = OpCapability("native", ("float8_e4m3fn",), "cuBLAS block-scaled FP8 on SM90, Triton elsewhere")
    for op in EP_OPS:
        caps[op] = OpCapability("native", FLOATS + ("float8_e4m3fn",), ep_note("cpu" if cc is None else "cuda"))
    caps["fp8_linear"] = OpCapability("native", FLOATS, "fused Triton quantize + FP8 GEMM")
    caps["moe_experts"] = OpCapability("native", FLOATS + ("float8_e4m3fn",),
                                       "torch._grouped_mm (bf16, SM90) or the Triton grouped GEMM")
    caps["lightning_indexer"] = OpCapability("native", FLOATS + ("float8_e4m3fn",),
                                             "Triton kernel (tensor-core dots), running top-k per key chunk")
    caps["sparse_attention"] = OpCapability("native", FLOATS, "Triton sparse flash attention (tensor-core dots "
                                            "from 16 query heads per key head)")
    caps["gated_delta_rule"] = OpCapability(
        "native", FLOATS, "Triton chunked WY form (chunks of 64, tf32x3 tensor-core dots, state in registers) for "
        "per-head g and more than 8 tokens; Triton recurrence for decode and per-channel g (KDA)"
        + ("" if cc is None else "; Dk > 256 declined"), supports=None if cc is None else _gdr_supports)
    caps["causal_conv1d"] = OpCapability("native", FLOATS, "Triton kernel (window read in place, fp32 taps)")
    reason = fp8_unavailable_reason(cc)
    if reason is not None:
        for op in FP8_OPS:
            caps[op] = OpCapability("native", (), f"unavailable: {reason}", supports=_decline(reason))
        for op in ("moe_experts", "moe_forward"):
            caps[op] = OpCapability("native", FLOATS, f"{caps[op].note}; FP8 weights declined: {reason}",
                                    supports=_decline_fp8_weights(reason))
        caps["lightning_indexer"] = OpCapability("native", FLOATS, f"{caps['lightning_indexer'].note}; float8 q/k "
                                                 f"declined: {reason}", supports=_decline_fp8_indexer(reason))
    return caps


@hal.hookimpl
def hal_contract_version() -> str:
    return "1.0"


@hal.hookimpl
def hal_backend() -> Backend:
    return CudaBackend()
