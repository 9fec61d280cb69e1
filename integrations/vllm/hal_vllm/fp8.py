"""Block-scaled FP8 linears through HAL ``fp8_linear``: the ``hal_fp8`` quantization method.

vLLM's FP8 linear has no ``CustomOp`` to replace; its public extension point is the quantization
config registry. ``hal_fp8`` (:class:`HalFp8Config`) is vLLM's ``fp8`` config whose
``override_quantization_method`` claims every checkpoint vLLM would load as ``fp8`` with 128x128
weight blocks and fp32 ``weight_scale_inv`` (DeepSeek-V3 / V3.2, GLM-4.5 / GLM-5 FP8 releases), so
those load as ``hal_fp8`` with no flag. Its linear layers keep the checkpoint's [N, K] e4m3 weight
and [ceil(N/128), ceil(K/128)] fp32 scales and compute ``y = fp8_linear(x, w, scale, bias)`` (x
quantized per token per 128 channels, fp32 accumulation), which is the recipe vLLM's own block-FP8
kernels implement. Everything else (layers listed as ignored, the FP8 MoE experts, the KV cache)
is exactly what vLLM's ``fp8`` config gives.
"""
from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod
from vllm.model_executor.layers.quantization.utils.fp8_utils import (
    create_fp8_scale_parameter,
    create_fp8_weight_parameter,
    validate_fp8_block_shape,
)
from vllm.model_executor.parameter import BlockQuantScaleParameter

import hal_vllm.ops  # noqa: F401 - registers torch.ops.hal_vllm
from hal_vllm import runtime

logger = logging.getLogger("vllm.hal_vllm")

NAME = "hal_fp8"
BLOCK = [128, 128]


def checkpoint_problem(hf_quant_cfg: dict) -> str | None:
    """Why a checkpoint's ``quantization_config`` is not block FP8 as HAL defines it, or None."""
    if hf_quant_cfg.get("quant_method") != "fp8":
        return f"quant_method {hf_quant_cfg.get('quant_method')!r} is not 'fp8'"
    if list(hf_quant_cfg.get("weight_block_size") or []) != BLOCK:
        return f"weight_block_size {hf_quant_cfg.get('weight_block_size')!r} is not {BLOCK}"
    if hf_quant_cfg.get("activation_scheme", "dynamic") != "dynamic":
        return "static activation scales"
    if str(hf_quant_cfg.get("scale_fmt") or hf_quant_cfg.get("weight_scale_fmt") or "").lower() == "ue8m0":
        return "ue8m0 weight scales (HAL's fp8_linear takes fp32 scales)"
    if hf_quant_cfg.get("store_dtype") is not None:
        return f"store_dtype {hf_quant_cfg.get('store_dtype')!r}"
    return None


class HalFp8LinearMethod(Fp8LinearMethod):
    """vLLM's block-FP8 linear method with the product computed by HAL ``fp8_linear``."""

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        # the parameters vLLM's method registers for a block-FP8 layer (same names, loaders and
        # shape checks), without selecting one of vLLM's FP8 GEMM kernels: HAL computes the product,
        # so a machine where vLLM has none (e.g. a CPU without AMX) still runs
        weight_loader = extra_weight_attrs.get("weight_loader")
        layer.logical_widths = output_partition_sizes
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = sum(output_partition_sizes)
        layer.orig_dtype = params_dtype
        layer.weight_block_size = self.weight_block_size
        validate_fp8_block_shape(layer, input_size, output_size, input_size_per_partition, output_partition_sizes,
                                 self.weight_block_size)
        layer.register_parameter("weight", create_fp8_weight_parameter(
            layer.output_size_per_partition, input_size_per_partition, weight_loader))
        layer.register_parameter("weight_scale_inv", create_fp8_scale_parameter(
            BlockQuantScaleParameter, output_partition_sizes, input_size_per_partition, self.weight_block_size,
            weight_loader))
        self.fp8_linear = None
        self.use_marlin = False

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # the checkpoint layout is HAL's: weight [N, K] e4m3, weight_scale_inv fp32 per 128x128
        # block; vLLM's CPU/GPU kernels would repack both here
        layer.input_scale = None
        scale = layer.weight_scale_inv
        if scale.dtype != torch.float32:
            raise ValueError(f"hal_fp8: {getattr(layer, 'prefix', 'a linear')}: weight_scale_inv: "
                             f"expected float32, got {scale.dtype}")
        runtime.get()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.hal_vllm.fp8_linear(x, layer.weight.data, layer.weight_scale_inv.data, bias)


class HalFp8Config(Fp8Config):
    """vLLM's ``fp8`` config whose block-FP8 linear layers run HAL ``fp8_linear``."""

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.half]

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        if user_quant not in (None, "fp8", NAME):
            return None
        problem = checkpoint_problem(hf_quant_cfg)
        if problem is not None:
            logger.info("hal-vllm: FP8 checkpoint stays on vLLM's fp8 method: %s", problem)
            return None
        return NAME

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        method = super().get_quant_method(layer, prefix)
        if isinstance(layer, LinearBase) and type(method) is Fp8LinearMethod and method.block_quant \
                and not method.is_scale_e8m0:
            hal_method = HalFp8LinearMethod(self)
            hal_method.marlin_input_dtype = method.marlin_input_dtype
            return hal_method
        return method


def register() -> str:
    """Register :class:`HalFp8Config` as the ``hal_fp8`` quantization method."""
    register_quantization_config(NAME)(HalFp8Config)
    return "fp8 checkpoints with 128x128 blocks -> hal_fp8 (HAL fp8_linear)"
