"""What tests/test_vllm_plugin.py runs inside the vLLM venv (vLLM cannot share the test process).

    python vllm_child.py models DIR             # write the tiny checkpoints into DIR
    python vllm_child.py run MODELS_DIR OUT.json

``models`` writes, with transformers and random weights: ``glm4_moe`` (GLM-4.5's architecture,
fp32: sigmoid routing with correction bias, 2 expert groups, a shared expert, routed scaling 2.5)
and ``glm4_moe_fp8`` (the same family in bf16 with every attention and MLP linear stored as 128x128
block FP8, ``weight_scale_inv`` from HAL's ``fp8_quantize_weight``, the routed experts left
unquantized). The test imports
:func:`make_models` into its own process (transformers is there already).

``run`` is one vLLM process. With the plugin active (HAL_VLLM_DISABLE unset; HAL_VLLM_PROFILE_OUT
set) it generates with both checkpoints, checks every FP8 layer inside the loaded model and runs
the DSA indexer at the op level; with HAL_VLLM_DISABLE=1 it generates with vLLM's own kernels
(the FP8 checkpoint's failure, where vLLM has no kernel for it, is recorded) and then checks the
plugin's version gate. Models share one process: importing vLLM is most of a run's time.
"""
from __future__ import annotations

import glob
import json
import os
import sys

PROMPTS = [[1, 5, 9, 33, 70, 2, 101, 250], [200, 3, 17], [42] * 5]
MAX_TOKENS = 10


def make_models(root: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    import hal

    def build(path, dtype, **dims):
        torch.manual_seed(0)
        cfg = Glm4MoeConfig(vocab_size=256, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2,
                            n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                            routed_scaling_factor=2.5, max_position_embeddings=256, num_nextn_predict_layers=0,
                            partial_rotary_factor=0.5, initializer_range=0.08, eos_token_id=None,
                            bos_token_id=None, pad_token_id=None, **dims)
        cfg.architectures = ["Glm4MoeForCausalLM"]
        model = Glm4MoeForCausalLM(cfg).to(dtype)
        with torch.no_grad():
            for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
                if name.endswith("e_score_correction_bias"):
                    tensor.normal_(0.0, 0.05)         # the bias only selects: make it matter
        model.save_pretrained(path)
        return cfg

    build(os.path.join(root, "glm4_moe"), torch.float32, hidden_size=128, intermediate_size=256,
          moe_intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=64)

    fp8_dir = os.path.join(root, "glm4_moe_fp8")
    build(fp8_dir, torch.bfloat16, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
          num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    weights_file = os.path.join(fp8_dir, "model.safetensors")
    tensors = load_file(weights_file)
    quantized = {}
    for name, w in tensors.items():
        is_linear = name.endswith("_proj.weight") and ".experts." not in name
        if is_linear:
            q, scale = hal.ops.fp8_quantize_weight(w.float())
            quantized[name] = q
            quantized[name[:-len("weight")] + "weight_scale_inv"] = scale
        else:
            quantized[name] = w
    save_file(quantized, weights_file, metadata={"format": "pt"})
    with open(os.path.join(fp8_dir, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [128, 128],
                                     "modules_to_not_convert": ["model.layers.1.mlp.experts"]}
    with open(os.path.join(fp8_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def generate(model: str) -> dict:
    """Greedy generation of :data:`PROMPTS` with vLLM's ``LLM`` API; with the plugin active, also
    the FP8 layer checks and the HAL call counts the plugin wrote for this model (reset before)."""
    import gc

    from vllm import LLM, SamplingParams

    import hal_vllm
    from hal_vllm import runtime

    active = bool(hal_vllm.registered())
    dtype = "bfloat16" if model.rstrip("/").endswith("_fp8") else "float32"
    llm = LLM(model=model, skip_tokenizer_init=True, dtype=dtype, enforce_eager=True, max_model_len=128,
              max_num_seqs=4, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    if active:                         # count this generation only (not loading and warm-up)
        runtime.get().reset_stats()
        runtime.write_profile(True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    tokens, logprobs = [], []
    for o in outputs:
        seq = o.outputs[0]
        tokens.append(list(seq.token_ids))
        logprobs.append([float(step[t].logprob) for t, step in zip(seq.token_ids, seq.logprobs)])
    layer_checks = llm.apply_model(fp8_layer_checks)[0] if active else []
    moe_checks = llm.apply_model(moe_layer_checks)[0] if active else []
    profile = {}
    if active:
        runtime.write_profile(True)
        for path in glob.glob(os.path.join(runtime.profile_dir(), f"hal-profile-{os.getpid()}.json")):
            with open(path) as f:
                profile = {op: entry["calls"] for op, entry in json.load(f)["ops"].items()}
    del llm
    gc.collect()
    return {"tokens": tokens, "logprobs": logprobs, "registered": hal_vllm.registered(), "profile": profile,
            "fp8_layers": layer_checks, "moe_layers": moe_checks}


def version_gate() -> dict:
    """register() under a vLLM version the plugin does not know: what it registers and logs."""
    import logging

    import vllm
    from vllm.model_executor.custom_op import op_registry_oot

    import hal_vllm

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("vllm.hal_vllm").addHandler(handler)
    real_version, vllm.__version__ = vllm.__version__, "0.31.2"
    disabled = os.environ.pop("HAL_VLLM_DISABLE", None)
    try:
        registered = hal_vllm.register()
    finally:
        vllm.__version__ = real_version
        if disabled is not None:
            os.environ["HAL_VLLM_DISABLE"] = disabled
    return {"registered": registered, "oot": sorted(op_registry_oot), "log": seen}


def run(models: str, out: str) -> None:
    """Everything one vLLM process does for the test, by whether the plugin is active
    (HAL_VLLM_DISABLE unset) or not; results into ``out`` as JSON."""
    import hal_vllm
    hal_vllm.register()                # what vLLM's plugin loader calls (again, a no-op) in LLM()
    result = {"glm4_moe": generate(os.path.join(models, "glm4_moe"))}
    if hal_vllm.registered():
        result["glm4_moe_fp8"] = generate(os.path.join(models, "glm4_moe_fp8"))
        result["indexer"] = indexer()
    else:
        try:
            result["glm4_moe_fp8"] = generate(os.path.join(models, "glm4_moe_fp8"))
        except Exception as exc:  # noqa: BLE001 - vLLM's own reason, reported by the test
            result["glm4_moe_fp8"] = {"error": f"{type(exc).__name__}: {exc}"}
        result["gate"] = version_gate()
    with open(out, "w") as f:
        json.dump(result, f)


def fp8_layer_checks(model) -> list[dict]:
    """Inside the loaded vLLM model: every linear layer running HAL's FP8 method, called on random
    activations, against the block-FP8 recipe evaluated in float64 from the layer's own weight and
    scales (activation quantized per token per 128 channels to e4m3 with scale amax / 448)."""
    import torch

    from hal_vllm.fp8 import HalFp8LinearMethod

    gen = torch.Generator().manual_seed(1)
    checks = []
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "quant_method", None), HalFp8LinearMethod):
            continue
        w, scale = module.weight.data, module.weight_scale_inv.data
        n, k = w.shape
        x = torch.randn(5, k, generator=gen).to(torch.bfloat16)
        out = module(x)
        y = (out[0] if isinstance(out, tuple) else out).double()
        xg = x.double().reshape(5, -1, 128)
        s = (xg.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448).float().double()
        xq = ((xg / s).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s).reshape(5, k)
        wd = w.double() * scale.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        ref = xq @ wd.T
        checks.append({"layer": name, "class": type(module).__name__, "shape": [n, k],
                       "rel_err": float((y - ref).abs().max() / ref.abs().max())})
    return checks


def moe_layer_checks(model) -> list[dict]:
    """Inside the loaded vLLM model: every MoE layer running HAL's method, called on random
    hidden states and router logits through both of its entry points (``apply_monolithic``: HAL
    routes; ``forward_native`` / ``forward_cpu``: a given top-k), against the layer's routing and
    SwiGLU experts evaluated in float64 from its own weights and settings (sigmoid or softmax
    scores; the correction bias selects, groups scored by their two best biased scores)."""
    import torch

    from hal_vllm.moe import HalUnquantizedFusedMoEMethod

    gen = torch.Generator().manual_seed(2)
    checks = []
    for name, layer in model.named_modules():
        method = getattr(layer, "quant_method", None)
        if not isinstance(method, HalUnquantizedFusedMoEMethod):
            continue
        w13, w2 = layer.w13_weight.data.double(), layer.w2_weight.data.double()
        experts, _, hidden = w13.shape
        tokens, k = 6, layer.top_k
        x = torch.randn(tokens, hidden, generator=gen).to(layer.w13_weight.dtype)
        logits = torch.randn(tokens, experts, generator=gen)
        scores = logits.double().sigmoid() if layer.scoring_func == "sigmoid" else logits.double().softmax(-1)
        bias = layer.e_score_correction_bias
        choice = scores + (bias.double() if bias is not None else 0.0)
        groups = layer.num_expert_group if layer.use_grouped_topk and layer.num_expert_group else 1
        if groups > 1:
            per_group = choice.view(tokens, groups, -1)
            group_score = per_group.topk(2, -1).values.sum(-1) if bias is not None else per_group.amax(-1)
            keep = torch.zeros(tokens, groups, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(layer.topk_group, -1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(experts // groups, 1), float("-inf"))
        ids = choice.topk(k, -1).indices
        weights = scores.gather(1, ids)
        if layer.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * layer.routed_scaling_factor
        ref = torch.zeros(tokens, hidden, dtype=torch.float64)
        for t in range(tokens):
            for j in range(k):
                gate, up = (w13[ids[t, j]] @ x[t].double()).chunk(2)
                ref[t] += weights[t, j] * (w2[ids[t, j]] @ (torch.nn.functional.silu(gate) * up))
        scale = float(ref.abs().max())
        got = {"apply_monolithic": method.apply_monolithic(layer, x, logits),
               "forward_native": method.forward_native(layer, x, weights.float(), ids.int(), None, None),
               "forward_cpu": method.forward_cpu(layer, x, weights.float(), ids.int(), None, None)}
        checks.append({"layer": name, "class": type(layer).__name__, "method": type(method).__name__,
                       "monolithic": bool(method.is_monolithic),
                       "rel_err": {path: float((y.double() - ref).abs().max()) / scale for path, y in got.items()}})
    return checks


def indexer() -> dict:
    """The DSA indexer at the op level, inside vLLM's own classes: ``SparseAttnIndexer(...)`` (which
    the plugin's register_oot turns into HalSparseAttnIndexer) called under a forward context that
    holds a hand-built ``DeepseekV32IndexerMetadata`` (2 decode tokens, then 2 prefill requests of 7
    and 5 tokens) over a paged FP8 key cache, compared with vLLM's own Python evaluation of the
    paged indexer logits (``fp8_paged_mqa_logits_torch``) followed by a top-k, and with vLLM's
    C++ CPU kernel when this vLLM build has it."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.mla.indexer import (
        DeepseekV32IndexerMetadata,
        DeepseekV32IndexerPrefillChunkMetadata,
        DeepseekV32IndexerPrefillMetadata,
        DeepSeekV32IndexerDecodeMetadata,
    )
    from vllm.v1.attention.ops.rocm_aiter_mla_sparse import fp8_paged_mqa_logits_torch

    import hal_vllm

    hal_vllm.register()
    current_platform.import_kernels()
    gen = torch.Generator().manual_seed(0)
    heads, dim, block, blocks, top_k = 4, 128, 16, 24, 12
    # key cache: per block, 16 e4m3 keys then their 16 fp32 scales (vLLM's indexer cache layout)
    keys = (torch.randn(blocks * block, dim, generator=gen) * 2).to(torch.float8_e4m3fn)
    key_scale = torch.rand(blocks * block, generator=gen) + 0.25
    cache = torch.empty(blocks, block, 1, dim + 4, dtype=torch.uint8)
    flat = cache.view(blocks, -1)
    for b in range(blocks):
        flat[b, :block * dim] = keys[b * block:(b + 1) * block].reshape(-1).view(torch.uint8)
        flat[b, block * dim:] = key_scale[b * block:(b + 1) * block].view(torch.uint8)
    perm = torch.randperm(blocks, generator=gen).to(torch.int32)
    # requests: two decodes with contexts of 40 and 9 keys; prefills of 7 and 5 new tokens whose
    # contexts end at 30 and 5 keys (causal: token i of a prefill sees context_start + i + 1 keys)
    tables = perm[:20].reshape(4, 5)
    decode_lens = torch.tensor([40, 9], dtype=torch.int32)
    prefill_ctx, prefill_new = [30, 5], [7, 5]
    per_token_len = torch.cat([torch.arange(c - n + 1, c + 1) for c, n in zip(prefill_ctx, prefill_new)])
    n_decode, n_prefill = 2, sum(prefill_new)
    tokens = n_decode + n_prefill
    q = (torch.randn(tokens, heads, dim, generator=gen) * 2).to(torch.float8_e4m3fn)
    weights = torch.randn(tokens, heads, generator=gen)
    cu_seq_lens = torch.tensor([0, prefill_ctx[0], sum(prefill_ctx)], dtype=torch.int32)
    owner = torch.tensor([0] * prefill_new[0] + [1] * prefill_new[1])
    cu_ks = cu_seq_lens[owner]
    cu_ke = (cu_ks + per_token_len).to(torch.int32)
    chunk = DeepseekV32IndexerPrefillChunkMetadata(
        block_table=tables[2:], cu_seqlen_ks=cu_ks, cu_seqlen_ke=cu_ke, cu_seq_lens=cu_seq_lens,
        token_to_seq=owner.to(torch.int32), total_seq_lens=sum(prefill_ctx), token_start=n_decode, token_end=tokens,
        num_reqs=2, local_cu_seq_lens=cu_seq_lens, local_total_seq_lens=sum(prefill_ctx),
        max_local_total_seq_lens=sum(prefill_ctx))
    decode = DeepSeekV32IndexerDecodeMetadata(block_table=tables[:2], seq_lens=decode_lens,
                                              decode_lens=torch.ones(2, dtype=torch.int32), requires_padding=False,
                                              schedule_metadata=torch.empty(0))
    metadata = DeepseekV32IndexerMetadata(
        seq_lens=torch.cat([decode_lens, torch.tensor(prefill_ctx, dtype=torch.int32)]), max_seq_len=40,
        slot_mapping=torch.zeros(tokens, dtype=torch.int64), num_decodes=2, num_decode_tokens=n_decode,
        num_prefills=2, num_prefill_tokens=n_prefill, decode=decode,
        prefill=DeepseekV32IndexerPrefillMetadata(chunks=[chunk]))

    class KCache:                      # what the indexer reads of vLLM's DeepseekV32IndexerCache
        prefix = "model.layers.0.self_attn.indexer.k_cache"
        kv_cache = cache

    config = VllmConfig()
    result = {"registered": hal_vllm.registered()}
    with set_current_vllm_config(config):
        buffer = torch.full((tokens, top_k), 7, dtype=torch.int32)
        layer = SparseAttnIndexer(KCache(), 128, "ue8m0", top_k, dim, 128, 128, buffer, skip_k_cache_insert=True)
        result["class"] = type(layer).__name__
        with set_forward_context({KCache.prefix: metadata}, config):
            got = layer(torch.zeros(tokens, 8), q, None, weights).clone()
            buffer.fill_(7)
            got_native = layer.forward_native(torch.zeros(tokens, 8), q, None, weights).clone()
    # vLLM's Python evaluation of the same logits, row by row (decode rows, then prefill rows)
    all_lens = torch.cat([decode_lens, per_token_len.to(torch.int32)])
    all_tables = torch.cat([tables[:2], tables[2:][owner]])
    logits = fp8_paged_mqa_logits_torch(q.unsqueeze(1), cache, weights, all_lens, all_tables, 64)
    rows = []
    for t in range(tokens):
        n = int(all_lens[t])
        want = torch.topk(logits[t, :n], min(top_k, n)).indices.sort().values.tolist()
        mine = got[t][got[t] >= 0]
        rows.append({"len": n, "want": want, "got": mine.sort().values.tolist(), "tail": got[t][len(mine):].tolist(),
                     "got_scores": logits[t, mine.clamp(0, n - 1).long()].tolist(),
                     "kth_score": float(torch.topk(logits[t, :n], min(top_k, n)).values[-1]),
                     "max_abs_score": float(logits[t, :n].abs().max()),
                     "descending": bool((logits[t, mine.long()].diff() <= 0).all()),
                     "native_equal": bool(torch.equal(got[t], got_native[t]))})
    result["rows"] = rows
    result["vllm_cpu_kernel"] = hasattr(torch.ops._C, "fp8_paged_mqa_logits_cpu")
    return result


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "models":
        make_models(argv[1])
    elif len(argv) == 3 and argv[0] == "run":
        run(argv[1], argv[2])
    else:
        raise SystemExit(f"usage: vllm_child.py models DIR | run MODELS_DIR OUT.json (got {argv})")


if __name__ == "__main__":
    main(sys.argv[1:])
