"""vLLM's unquantized MoE method with the routed experts run by HAL.

``HalUnquantizedFusedMoEMethod`` replaces ``UnquantizedFusedMoEMethod`` (``CustomOp.register_oot``:
vLLM instantiates it wherever it would build its own). For a layer HAL can run (SiLU-gated experts
without biases, softmax or sigmoid routing with optional correction bias and expert groups, no
expert parallelism, no LoRA, no custom or hash routing) the method declares itself *monolithic*:
vLLM's MoE runner hands it the router logits and it runs HAL ``moe_forward`` (route, dispatch,
experts, combine) on the layer's unpacked weights. vLLM's shared experts, the gate, the routed
scaling the runner applies and tensor-parallel reduction stay vLLM's. Should vLLM call the
modular entry points instead (``apply`` -> ``forward_native`` / ``forward_cpu`` /
``forward_cuda`` with top-k it computed), they run HAL ``moe_dispatch`` -> ``moe_experts`` ->
``moe_combine`` on that routing. Any other layer keeps vLLM's own kernel, with the reason logged.
"""
from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

import hal_vllm.ops  # noqa: F401 - registers torch.ops.hal_vllm
from hal_vllm import runtime

logger = logging.getLogger("vllm.hal_vllm")

#: vLLM routing methods whose math HAL's moe_route defines (softmax / sigmoid, top-k, optional
#: correction bias and expert groups, optional renormalization, scaling).
HAL_ROUTING = {RoutingMethodType.Default, RoutingMethodType.Renormalize, RoutingMethodType.RenormalizeNaive,
               RoutingMethodType.DeepSeekV3, RoutingMethodType.SigmoidRenorm, RoutingMethodType.Sigmoid}


def config_problem(moe) -> str | None:
    """Why HAL cannot run the experts of a layer with FusedMoEConfig ``moe``, or None."""
    if moe.activation != MoEActivation.SILU:
        return f"activation {moe.activation.value!r} (HAL's experts are SiLU-gated)"
    if moe.has_bias:
        return "expert biases (HAL's expert FFN has none)"
    if moe.has_hash_routing:
        return "hash routing"
    if moe.use_ep:
        return "expert parallelism (HAL runs all experts of the layer)"
    if moe.is_lora_enabled:
        return "LoRA on the experts"
    if any(v is not None for v in (moe.swiglu_limit, moe.swiglu_alpha, moe.swiglu_beta)):
        return "clamped / scaled SwiGLU"
    if moe.routing_method not in HAL_ROUTING:
        return f"routing method {moe.routing_method.name}"
    return None


def layer_problem(layer) -> str | None:
    """Why HAL cannot run RoutedExperts ``layer`` (its routing settings), or None."""
    if layer.custom_routing_function is not None:
        return "a custom routing function"
    if layer.scoring_func not in ("softmax", "sigmoid"):
        return f"scoring function {layer.scoring_func!r}"
    if layer.apply_router_weight_on_input:
        return "router weights applied to the input"
    return None


class HalUnquantizedFusedMoEMethod(UnquantizedFusedMoEMethod):
    """``UnquantizedFusedMoEMethod`` whose expert computation is HAL's (see the module doc)."""

    def __init__(self, moe):
        super().__init__(moe)
        self.hal_problem = config_problem(moe)

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                               **extra_weight_attrs)
        if self.hal_problem is None:
            self.hal_problem = layer_problem(layer)
        if self.hal_problem is not None:
            logger.info("hal-vllm: MoE layer %s keeps vLLM's kernel: %s", layer.layer_name, self.hal_problem)

    @property
    def uses_hal(self) -> bool:
        return self.hal_problem is None

    @property
    def is_monolithic(self) -> bool:
        return True if self.uses_hal else super().is_monolithic

    def process_weights_after_loading(self, layer) -> None:
        if not self.uses_hal:
            return super().process_weights_after_loading(layer)
        # vLLM's CPU method would repack w13/w2 into its grouped-GEMM layout here; HAL keeps the
        # checkpoint layout [E, 2I, H] / [E, H, I] and lays it out its own way, once.
        FusedMoEMethodBase.process_weights_after_loading(self, layer)
        prepared = runtime.get().prepare_weights("moe_forward", w_gate_up=layer.w13_weight.data,
                                                 w_down=layer.w2_weight.data)
        layer.w13_weight.data = prepared["w_gate_up"]
        layer.w2_weight.data = prepared["w_down"]

    def apply_monolithic(self, layer, x: torch.Tensor, router_logits: torch.Tensor,
                         input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not self.uses_hal:
            return super().apply_monolithic(layer, x, router_logits, input_ids)
        grouped = bool(layer.use_grouped_topk) and layer.num_expert_group is not None
        return torch.ops.hal_vllm.moe_forward(
            x, router_logits, layer.w13_weight, layer.w2_weight, layer.e_score_correction_bias, layer.top_k,
            layer.scoring_func, int(layer.num_expert_group) if grouped else 1,
            int(layer.topk_group) if grouped and layer.topk_group is not None else 1,
            bool(layer.renormalize), float(layer.routed_scaling_factor))

    def _hal_modular(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input, vllm_path):
        if not self.uses_hal:
            return vllm_path(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        return torch.ops.hal_vllm.moe_experts_topk(x, topk_weights, topk_ids, layer.w13_weight, layer.w2_weight)

    def forward_native(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        return self._hal_modular(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input,
                                 super().forward_native)

    def forward_cpu(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        return self._hal_modular(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input,
                                 super().forward_cpu)

    def forward_cuda(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        return self._hal_modular(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input,
                                 super().forward_cuda)


def register() -> str:
    """Register :class:`HalUnquantizedFusedMoEMethod` in place of ``UnquantizedFusedMoEMethod``."""
    UnquantizedFusedMoEMethod.register_oot(HalUnquantizedFusedMoEMethod)
    return "UnquantizedFusedMoEMethod -> HAL moe_forward"
