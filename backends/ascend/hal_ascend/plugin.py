"""The ascend backend's plugin module (entry point ``ascend`` in group ``hal.backends``)."""
from __future__ import annotations

import os
import re

import hal
from hal.backend import Availability, Backend, OpCapability, distribution_version
from hal_ascend.npu import emulating

EMULATED_SOCS = ("A2", "A3", "950")
FP8_OPS = ("fp8_quantize", "fp8_quantize_weight", "fp8_gemm", "fp8_linear")
EMULATE_LABEL = "ascend (emulated torch_npu)"


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
        import torch
        version = torch.__version__.split("+")[0]
        return (f"torch_npu is not installed: pip install torch-npu=={version} (it must match this torch, "
                f"{torch.__version__}; hal-ascend does not install it, so that pip never replaces your torch)")
    return f"import torch_npu failed: {type(exc).__name__}: {msg}"


def emulated_soc() -> str:
    """The chip family the emulator stands in for: ``HAL_ASCEND_EMULATE_SOC`` (A2, A3 or 950;
    default A3). It selects the capability table (the limits, and which ops the chip has: e.g.
    npu_fused_causal_conv1d is documented for the 950 only); the emulated ops are the same."""
    return os.environ.get("HAL_ASCEND_EMULATE_SOC", "A3")


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


def capability_table(soc: str, emulated: bool = False) -> dict:
    """Per op: path and note for a chip family (the limits are those of Atlas A2/A3); ``emulated``:
    the table of the emulator standing in for that chip (the EP ops' path is then "emulated")."""
    import functools

    from hal_ascend.ep_mc2 import combine_supports
    from hal_ascend.ep_mc2 import dispatch_supports as ep_dispatch_supports
    from hal_ascend.kernels import (attention_supports, conv_supports, dispatch_supports, experts_supports,
                                    finalize_supports, forward_supports, gdr_supports, indexer_supports, route_supports)
    floats = ("float32", "bfloat16", "float16")
    caps = {
        "moe_route": OpCapability("native", floats, "npu_moe_gating_top_k (group score: max without a correction "
                                  "bias, top-2 sum with one) / npu_moe_gating_top_k_softmax", supports=route_supports),
        "moe_dispatch": OpCapability("native", floats, "npu_moe_init_routing_v2 (+ padding to align with torch ops)",
                                     supports=dispatch_supports),
        "moe_experts": OpCapability("native", floats, "npu_grouped_matmul + npu_swiglu, weights as laid out by "
                                    "prepare_weights (no per-call copy); FP8 weights: only the experts that got rows "
                                    "dequantized to fp32 (emulated)", supports=experts_supports),
        "moe_combine": (OpCapability("native", floats, "npu_moe_finalize_routing "
                                     "(HAL_ASCEND_COMBINE=finalize_routing)", supports=finalize_supports)
                        if combine_path() == "finalize_routing" else
                        OpCapability("native", floats, "torch ops on the NPU (fp32 weights; npu_moe_finalize_routing "
                                     "rounds them to the rows' dtype)")),
        "moe_forward": OpCapability("native", floats, "route -> init_routing_v2 -> grouped_matmul -> combine",
                                    supports=forward_supports),
        "lightning_indexer": OpCapability("native", floats + ("float8_e4m3fn",), "npu_lightning_indexer (bf16/fp16; BSND, rightDownCausal "
                                          "with actual_seq_lengths for q_offset / k_lengths; D < 128 zero-padded); fp32 / "
                                          "fp8: the contract's arithmetic as torch ops on the NPU",
                                          supports=indexer_supports),
        "sparse_attention": OpCapability("native", floats, "npu_sparse_flash_attention (bf16/fp16; attention_mode 2, "
                                         "MLA 512 + 64 rope, other shapes packed into it; lse = softmax_max + "
                                         "log(softmax_sum)); fp32: the contract's arithmetic as torch ops on the NPU",
                                         supports=attention_supports),
        "gated_delta_rule": OpCapability("native", ("bfloat16",), "npu_recurrent_gated_delta_rule (T <= 8) / "
                                         "npu_chunk_gated_delta_rule (packed TND, state [N, Hv, Dv, Dk], q/k l2norm "
                                         "outside the op, Dk/Dv < 128 zero-padded for the chunk op); per-channel g, "
                                         "fp16/fp32 and a bf16-only state declined",
                                         supports=functools.partial(gdr_supports, soc=soc)),
        "causal_conv1d": OpCapability("native", ("bfloat16", "float16"), "npu_fused_causal_conv1d (Ascend 950 only; "
                                      "packed with query_start_loc, weight [3, D], K < 3 and D % 128 zero-padded); "
                                      "bias and activation declined ('not supported yet')",
                                      supports=functools.partial(conv_supports, soc=soc)),
    }
    # under the emulator the MC2 pair runs over the gloo reference transport: a declared emulation
    mc2_path, via = ("emulated", " (emulated over gloo)") if emulated else ("native", "")
    caps["ep_dispatch"] = OpCapability(
        mc2_path, floats + ("float8_e4m3fn",),
        f"npu_moe_distribute_dispatch_v2{via} (MC2, Atlas A3; quant_mode 0): each row's bytes (and 1x128 scales), "
        "source and expert ids travel as bf16 words; batches padded to the group's largest with a [BS, K] "
        "x_active_mask for padding and -1 slots; expert_map by relabelling; one all-reduce per call (largest batch, "
        "duplicate ids); the one-process group: the reference's torch ops (MC2 takes 2 ranks or more)", supports=functools.partial(ep_dispatch_supports, soc=soc))
    caps["ep_combine"] = OpCapability(
        mc2_path, floats,
        f"npu_moe_distribute_combine_v2{via} (MC2, Atlas A3) on the handle of the group's last ep_dispatch, "
        "topk_weights as expert_scales (fp32); fp32 expert outputs: all_to_all_single over the group's process group "
        "and the fp32 weighting as torch ops (MC2 returns 16-bit sums, above the budget)",
        supports=functools.partial(combine_supports, soc=soc))
    fp8_note = ("Ascend 950 has FP8 units, but no FP8 GEMM mapping is certified yet: the reference arithmetic runs "
                "on the NPU" if soc == "950" else
                f"Atlas {soc} has no FP8 matrix unit: quantization arithmetic in fp32 and GEMMs on dequantized fp32 "
                "operands on the NPU (declared emulation)")
    for op in FP8_OPS:
        caps[op] = OpCapability("emulated", ("float8_e4m3fn",), fp8_note)
    return caps


EXPERT_WEIGHT_OPS = ("moe_experts", "moe_forward")


def prepare_expert_weights(op: str, weights: dict) -> dict:
    """Lay out expert weights once, at load: w_gate_up [E, 2I, H] and w_down [E, H, I] (bf16 /
    fp16 / fp32) get contiguous [E, K, N] storage (npu_grouped_matmul's operand, cast to FRACTAL_NZ
    on a real NPU), returned as its transposed view: the same shape, dtype and values as given,
    so the kernels' transpose is free (:func:`hal_ascend.kernels.gmm_weight`). FP8 weights, scales and
    every other op's tensors come back unchanged."""
    import torch

    from hal_ascend.npu import format_cast_nz
    out = dict(weights)
    if op not in EXPERT_WEIGHT_OPS:
        return out
    for name in ("w_gate_up", "w_down"):
        w = out.get(name)
        if isinstance(w, torch.Tensor) and w.dim() == 3 and w.dtype in (torch.float32, torch.bfloat16, torch.float16):
            out[name] = format_cast_nz(w.transpose(1, 2).contiguous()).transpose(1, 2)
    return out


class AscendBackend(Backend):
    name = "ascend"
    priority = 20

    def __init__(self, emulate: bool | None = None):
        super().__init__(version=distribution_version("hal-ascend"))
        self.emulate = emulating() if emulate is None else bool(emulate)
        self.device_type = "cpu" if self.emulate else "npu"
        self.soc = f"{emulated_soc()} (emulated)" if self.emulate else "unknown"

    def with_options(self, *, emulate: bool | None = None, **unknown) -> "AscendBackend":
        """This backend with ``emulate`` set for this instance only (``hal.runtime("ascend",
        options={"emulate": True})``); ``HAL_ASCEND_EMULATE`` only gives the default."""
        if unknown:
            raise TypeError(f"backend 'ascend' takes the option 'emulate', not {', '.join(sorted(unknown))}")
        return AscendBackend(emulate=emulate)

    def probe(self) -> Availability:
        import torch

        from hal_ascend.limits import gdr_state_dtype
        versions = {"hal-ascend": self.version, "torch": torch.__version__}
        try:
            gdr_state_dtype()
        except ValueError as exc:
            return Availability(False, str(exc), versions=versions)
        if self.emulate:
            from hal_ascend.npu import binding
            if self.soc.split()[0] not in EMULATED_SOCS:
                return Availability(False, f"HAL_ASCEND_EMULATE_SOC={self.soc.split()[0]!r}: the emulator stands in for "
                                    f"{', '.join(EMULATED_SOCS)}", versions=versions)
            from hal_ascend.schema import NpuSchemaError
            try:
                b = binding()
            except NpuSchemaError as exc:
                return Availability(False, f"the torch_npu emulator cannot bind to the installed wheel: {exc}",
                                    versions=versions)
            if b.bound:
                versions["torch_npu (schemas)"] = b.version
            return Availability(True, "emulated torch_npu (no NPU hardware): HAL_ASCEND_EMULATE=1 runs the backend on "
                                f"CPU tensors through hal_ascend.emulator with the capability table of the "
                                f"{self.soc.split()[0]} (HAL_ASCEND_EMULATE_SOC), {b.describe()}",
                                device="CPU (torch_npu emulator)", versions=versions, label=EMULATE_LABEL)
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
        return capability_table(self.soc.split()[0], emulated=self.emulate)

    def prepare_weights(self, op: str, weights: dict) -> dict:
        """The hal.Backend hook models call once at load: see :func:`prepare_expert_weights`."""
        return prepare_expert_weights(op, weights)

    def kernels(self):
        from hal.backends.cpu import KERNELS
        from hal_ascend import kernels as ops
        k = {name: getattr(ops, name) for name in ("moe_route", "moe_dispatch", "moe_experts", "moe_combine",
                                                   "moe_forward", "lightning_indexer", "sparse_attention",
                                                   "gated_delta_rule", "causal_conv1d", "ep_dispatch",
                                                   "ep_combine")}
        if combine_path() == "finalize_routing":
            k["moe_combine"] = ops.moe_combine_finalize
        k = {name: self._in_mode(fn) for name, fn in k.items()}
        k.update({op: KERNELS[op] for op in FP8_OPS})          # the declared emulation (see capability_table)
        return k

    def _in_mode(self, kernel):
        """``kernel`` running with this instance's seam (real torch_npu or the emulator)."""
        import functools

        from hal_ascend.npu import mode
        emulate = self.emulate

        @functools.wraps(kernel)
        def run(*args, **kwargs):
            with mode(emulate):
                return kernel(*args, **kwargs)
        return run


@hal.hookimpl
def hal_contract_version() -> str:
    return "1.0"


@hal.hookimpl
def hal_backend() -> Backend:
    return AscendBackend()
