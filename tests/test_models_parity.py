"""hal.models against transformers' own modeling code (GLM-5, DeepSeek-V3.2, GLM-4.5)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the parity tests need transformers (ci/test.sh installs it)")

import hal.models as M  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
              n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=256)
# 16 index heads: with few heads an index score is exactly 0 (every head's relu clipped) often
# enough to tie at the top-k cut, where torch.topk's order is unspecified and ours is the contract's
MLA = dict(num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
           v_head_dim=16, qk_nope_head_dim=16, index_topk=6, index_head_dim=32, index_n_heads=16, head_dim=8)
FAMILIES = {
    # shared indexer layers (GLM-5), interleaved indexer RoPE
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
                    dict(**COMMON, **MLA, indexer_types=["full", "shared", "full", "shared"], routed_scaling_factor=2.5)),
    # group-limited routing n_group > 1 (DeepSeek-V3.2), half-split indexer RoPE
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                     dict(**COMMON, **MLA, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    # YaRN RoPE with mscale (the released DeepSeek-V3.2 / GLM-5 configs use it)
    "deepseek_v32_yarn": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                          dict(**COMMON, **MLA, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 64, "beta_fast": 32,
                                                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # GQA, partial RoPE, qk-norm, attention bias (GLM-4.5)
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_qk_norm=True,
                      attention_bias=True, n_group=2, topk_group=1)),
}
SEQ = 20                                   # longer than index_topk = 6: sparsity is exercised


def make_hf_model(family: str, seed: int = 0, std: float = 0.15):
    cfg_name, lm_name, kw = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**kw)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, lm_name)(cfg).eval()
    with torch.no_grad():                  # larger weights than the default init: non-degenerate logits
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" not in name:
                p.normal_(0, std)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    model = make_hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return request.param, model, d


def test_prefill_logits_match_transformers_fp32(saved):
    family, hf, d = saved
    ours = M.load(d, "cpu")
    assert ours.config.model_type == family.replace("_yarn", "")
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    got = M.generate(ours, ids.tolist(), max_new_tokens=1).prefill_logits
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale


def test_greedy_generation_matches_transformers(saved):
    family, hf, d = saved
    ours = M.load(d, "cpu")
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, SEQ:].tolist()
    got = M.generate(ours, ids.tolist(), max_new_tokens=16, eos_token_id=[]).tokens[0]
    assert got == want


def _calc_diff(x, y):
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def test_bf16_within_bf16_rounding(saved):
    """Our bf16 model is as close to the fp32 model as transformers' own bf16 model is."""
    import copy
    family, hf, d = saved
    ours = M.load(d, "cpu", dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp32 = hf(ids).logits.double()
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
        for m in hf_bf16.modules():                       # transformers keeps these in fp32 too
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
        theirs = hf_bf16(ids).logits.double()
    got = M.generate(ours, ids.tolist(), max_new_tokens=1).prefill_logits.double()
    assert _calc_diff(got, fp32) <= 3 * _calc_diff(theirs, fp32) + 1e-4


def test_batched_prompts_of_different_lengths_equal_one_by_one(saved):
    _, _, d = saved
    ours = M.load(d, "cpu")
    prompts = [list(range(3, 3 + SEQ)), [5, 9, 11], list(range(40, 52))]
    together = M.generate(ours, prompts, max_new_tokens=6, eos_token_id=[])
    for b, p in enumerate(prompts):
        alone = M.generate(ours, [p], max_new_tokens=6, eos_token_id=[])
        assert together.tokens[b] == alone.tokens[0]
        torch.testing.assert_close(together.prefill_logits[b, :len(p)], alone.prefill_logits[0], rtol=1e-5, atol=1e-5)


def _quantize_checkpoint(src, dst):
    """Re-save a checkpoint in the published FP8 block format (weight e4m3 + weight_scale_inv)."""
    from safetensors.torch import load_file, save_file
    import hal
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        quantizable = (name.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name
                       and ".gate.weight" not in name and "weights_proj" not in name)
        if quantizable:
            q, s = hal.ops.fp8_quantize_weight(t.float())
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return out


def _dequantized(tensors):
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        s = tensors.get(name + "_scale_inv")
        if s is not None:
            N, K = t.shape
            t = t.float() * s.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
        out[name] = t
    return out


def test_fp8_checkpoint_loads_and_matches_dequantized_model(saved, tmp_path):
    """A checkpoint in the published FP8 block format stays FP8 (fp8_linear, FP8 experts) and
    matches the model built from its dequantized weights within the FP8 budget."""
    import hal
    family, _, d = saved
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    tensors = _quantize_checkpoint(d, fp8_dir)
    fp8 = M.load(fp8_dir, "cpu")
    lin = fp8.layers[0].attn.o
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.scale is not None
    moe = fp8.layers[1].mlp
    assert moe.w_gate_up.dtype == torch.float8_e4m3fn and moe.w_gate_up_scale is not None
    # layer level, DeepGEMM's bar: one FP8 linear vs the same dequantized weight, calc_diff < 1e-3
    x = torch.randn(16, lin.weight.shape[1], generator=torch.Generator().manual_seed(4))
    deq_w = _dequantized({"w": lin.weight, "w_scale_inv": lin.scale})["w"]
    assert _calc_diff(lin(x, fp8.rt).double(), (x @ deq_w.T).double()) < 1e-3
    # model level: activation quantization perturbs the logits no more than weight quantization does
    cfg = M.ModelConfig.from_dict(json.loads((d / "config.json").read_text()))
    deq = M.build_model(cfg, M.TensorSource.from_dict(_dequantized(tensors)), hal.runtime("cpu"))
    orig = M.load(d, "cpu")
    ids = [list(range(7, 7 + SEQ))]
    calls = {e.op: e.calls for e in fp8.rt.plan()}
    got, want, full = (M.generate(m, ids, max_new_tokens=1).prefill_logits.double() for m in (fp8, deq, orig))
    assert _calc_diff(got, want) <= 1.5 * _calc_diff(want, full) + 1e-3
    after = {e.op: e.calls for e in fp8.rt.plan()}
    assert after["fp8_linear"] > calls["fp8_linear"] and after["moe_forward"] > calls["moe_forward"]
