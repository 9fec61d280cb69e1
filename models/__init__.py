"""Backend-agnostic models: GLM-5 (``glm_moe_dsa``), DeepSeek-V3.2 (``deepseek_v32``), GLM-4.5
(``glm4_moe``) and Qwen3.5 MoE (``qwen3_5_moe`` / ``qwen3_5_moe_text``), written once against the
HAL contract.

Every MoE, sparse-attention, linear-attention and FP8 op goes through a :class:`hal.Runtime`;
norms, RoPE, embeddings and the GQA attention are plain torch. Nothing here names a device vendor.

    model = hal.models.load("tiny-glm5", backend="auto")        # or a Hugging Face model folder
    result = hal.models.generate(model, [[1, 2, 3]], max_new_tokens=8)
"""
from __future__ import annotations

from typing import Optional

import torch

from hal.models.builtin import CONFIGS as BUILTIN, DEFAULT_PROMPT_IDS
from hal.models.config import ModelConfig, ModelConfigError, SUPPORTED
from hal.models.generate import GenerationResult, PromptError, generate
from hal.models.loader import CheckpointError, TensorSource, build_model, load_directory
from hal.models.model import CausalLM
from hal.models.parallel import Sharding, get_tp_group

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


MLA_FORMS = ("auto", "absorbed", "expanded")


def load(name_or_path, backend="auto", *, dtype=torch.float32, quantize=None, runtime=None,
         show_progress: bool = False, mla_form: str = "auto", ep_group: Optional[str] = None,
         tp_group: Optional[str] = None) -> CausalLM:
    """Load a built-in model (``tiny-glm5``, ``tiny-deepseek-v32``, ``tiny-glm45``, ``tiny-qwen35``, ``tiny-kimi-linear``)
    or a Hugging Face model directory, bound to ``backend`` (a name, or an existing ``runtime``).

    dtype: torch.float32 / torch.bfloat16 (or their names) for the non-FP8 weights and activations.
    quantize: None, or "fp8" to quantize every linear and expert weight to 128x128 block FP8 on load.
    mla_form (MLA models): "auto" runs prefill in the expanded form (per-head keys, what transformers
    does) and decode steps in the absorbed form (MQA over the latent cache); "absorbed" /
    "expanded" force one form, e.g. "absorbed" for a backend whose sparse attention takes the MLA
    576/512 shape but not the expanded head dims.
    Built-in models come with the small byte-level BPE of ``hal.models.tokenizer_builtin`` (when the
    ``tokenizers`` package is installed); a folder's own ``tokenizer.json`` is used when present.
    ep_group: the name of a :func:`hal.distributed.ep_group` to run the routed experts expert-parallel
    over (each rank keeps E / W experts; see :meth:`CausalLM.shard_experts`); every rank of the group
    must load the same model and run the same batch. ValueError when W does not divide E.
    tp_group: the name of a :func:`hal.models.parallel.tp_group` (T consecutive ranks) to split the
    attention heads, dense-MLP and shared-expert intermediate rows over (column-parallel slices,
    row-parallel ones summed with an all-reduce); the DSA indexer, the MLA latent caches, norms,
    embeddings, router and LM head stay replicated. Every rank of the world runs the same batch.
    ValueError naming both numbers when T does not divide a split size (heads, KV heads,
    intermediate sizes, linear-attention heads). Qwen3.5 and Kimi Linear split their Gated
    DeltaNet / KDA layers by heads as well (each rank's conv and recurrent state hold its heads).
    With either group, each rank reads only its own slices and experts of a checkpoint folder
    (safetensors ``get_slice``; FP8 weights with the scale blocks covering the slice).
    Raises CheckpointError / ModelConfigError naming the file or tensor, hal.BackendUnavailable.
    """
    import hal
    if mla_form not in MLA_FORMS:
        raise ValueError(f"mla_form: expected one of {MLA_FORMS}, got {mla_form!r}")
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    rt = runtime or hal.runtime(backend, profile=True)
    sharding = Sharding(_group(tp_group, get_tp_group, "tensor-parallel", "hal.models.parallel.tp_group()")
                        if tp_group is not None else Sharding().tp,
                        _group(ep_group, _get_ep_group, "expert-parallel", "hal.distributed.ep_group()")
                        if ep_group is not None else None)
    if str(name_or_path) in BUILTIN:
        from hal.models.builtin import random_weights
        cfg = ModelConfig.from_dict(BUILTIN[str(name_or_path)])
        model = build_model(cfg, TensorSource.from_dict(random_weights(str(name_or_path)), str(name_or_path)), rt,
                            dtype=dtype, quantize=quantize, sharding=sharding)
        model.source = str(name_or_path)
        from hal.models.tokenizer_builtin import builtin_tokenizer
        model.tokenizer = builtin_tokenizer()
    else:
        model = load_directory(name_or_path, rt, dtype=dtype, quantize=quantize, show_progress=show_progress,
                               sharding=sharding)
    model.mla_form = mla_form
    return model


def _get_ep_group(name):
    from hal.distributed import get_ep_group
    return get_ep_group(name)


def _group(name, lookup, kind: str, maker: str):
    group = lookup(name)
    if group is None:
        raise ValueError(f"{'ep' if kind[0] == 'e' else 'tp'}_group: no {kind} group named {name!r} in this "
                         f"process ({maker} makes one)")
    return group


__all__ = ["load", "generate", "CausalLM", "GenerationResult", "ModelConfig", "ModelConfigError", "CheckpointError",
           "PromptError", "BUILTIN", "SUPPORTED", "DEFAULT_PROMPT_IDS", "MLA_FORMS"]
