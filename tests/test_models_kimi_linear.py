"""Kimi Linear (KDA + MLA without RoPE + sigmoid MoE) against transformers 5.24's own
KimiLinearForCausalLM on the CPU, in both weight layouts, plus its config, hostile configs and `hal run`."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import hal.models as M
from hal.cli import cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# KDA, KDA, MLA, KDA (1-indexed as the released linear_attn_config writes them); the first layer dense;
# 2 groups of 4 experts, 1 group kept; MLA without q LoRA, nope 8 + unrotated "rope" part 8
CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=12, num_local_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
           n_shared_experts=1, routed_scaling_factor=2.446, initializer_range=0.1, pad_token_id=0, bos_token_id=None,
           eos_token_id=None, first_k_dense_replace=1,
           linear_attn_config={"kda_layers": [1, 2, 4], "full_attn_layers": [3], "head_dim": 16, "num_heads": 2,
                               "short_conv_kernel_size": 4})
T_LONG = 75                                  # longer than transformers' (and FLA's) KDA chunk size of 64


def _prompt(n: int, seed: int) -> list:
    return torch.randint(3, CFG["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One random model saved as save_pretrained writes it (the released names: self_attn.f_a_proj,
    q/k/v_conv1d, block_sparse_moe.experts.{e}.w1/w2/w3) and once more as transformers' own module
    state dict (forget_gate.*, one conv1d, mlp.experts.gate_up_proj fused)."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("kimi")
    torch.manual_seed(0)
    theirs = transformers.KimiLinearForCausalLM(transformers.KimiLinearConfig(**CFG)).eval()
    with torch.no_grad():                    # away from the init values, so a mixed-up norm or bias shows
        for name, p in theirs.named_parameters():
            if name.endswith("norm.weight") or name.endswith("dt_bias"):
                p.add_(torch.randn_like(p) * 0.3)
        for name, buf in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    theirs.save_pretrained(root / "released")
    (root / "modules").mkdir()
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(root / "modules" / "model.safetensors"))
    (root / "modules" / "config.json").write_text((root / "released" / "config.json").read_text())
    return {"theirs": theirs, "released": root / "released", "modules": root / "modules"}


def _their_logits(models, ids: list) -> torch.Tensor:
    """transformers' fp32 prefill logits [T, vocab] for one prompt (computed once per prompt: its
    chunked KDA is slow in Python)."""
    cache = models.setdefault("logits", {})
    if tuple(ids) not in cache:
        with torch.no_grad():
            cache[tuple(ids)] = models["theirs"](torch.tensor([ids])).logits[0]
    return cache[tuple(ids)]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_prefill_logits_and_16_greedy_tokens_match_transformers(models):
    ours = M.load(models["released"], "cpu")
    assert ours.config.model_type == "kimi_linear" and ours.unused_tensors == []
    assert ours.config.layer_types == ("linear_attention", "linear_attention", "full_attention", "linear_attention")
    ids = _prompt(T_LONG, 1)
    want = _their_logits(models, ids)
    with torch.no_grad():
        theirs = models["theirs"].generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, T_LONG:]
    res = M.generate(ours, [ids], max_new_tokens=16, eos_token_id=[])
    assert _rel(res.prefill_logits[0], want) <= 1e-4
    assert res.tokens[0] == theirs.tolist()
    assert len(set(res.tokens[0])) > 3                   # not a degenerate repeat of one token
    plan = {p.op: p for p in ours.rt.plan()}
    # prefill + 15 decode steps through each of the 3 KDA layers and the 3 MoE layers
    assert plan["gated_delta_rule"].calls == plan["causal_conv1d"].calls == plan["moe_forward"].calls == 3 * 16
    assert plan["sparse_attention"].calls == plan["lightning_indexer"].calls == 0


def test_batched_prompts_of_different_lengths(models):
    """Right-padded prompts (seq_lens into the conv and the recurrence, per-sequence KV lengths in
    the MLA layer) give each prompt's own logits, equal to transformers' prompt by prompt, and its
    own tokens (those of the prompt alone, which the test above holds to transformers' generate)."""
    ours = M.load(models["released"], "cpu")
    prompts = [_prompt(9, 4), _prompt(T_LONG, 1), _prompt(40, 5)]
    res = M.generate(ours, prompts, max_new_tokens=6, eos_token_id=[])
    for b, p in enumerate(prompts):
        assert _rel(res.prefill_logits[b, :len(p)], _their_logits(models, p)) <= 1e-4
        assert res.tokens[b] == M.generate(ours, [p], max_new_tokens=6, eos_token_id=[]).tokens[0]


def test_transformers_module_names_load_the_same_model(models):
    """forget_gate.*, the fused conv1d [3HD, 1, K] and mlp.experts.gate_up_proj [E, 2I, H] / down_proj
    (transformers' state dict) give bit-identical results to the released names."""
    a, b = M.load(models["released"], "cpu"), M.load(models["modules"], "cpu")
    assert b.unused_tensors == []
    ids = [_prompt(20, 7), _prompt(12, 8)]
    ra, rb = (M.generate(m, ids, max_new_tokens=3, eos_token_id=[]) for m in (a, b))
    assert torch.equal(ra.prefill_logits, rb.prefill_logits) and ra.tokens == rb.tokens


def test_absorbed_and_expanded_mla_agree(models):
    ids = _prompt(30, 9)
    got = {form: M.generate(M.load(models["released"], "cpu", mla_form=form), [ids], max_new_tokens=4,
                            eos_token_id=[]) for form in ("absorbed", "expanded")}
    assert _rel(got["absorbed"].prefill_logits[0], got["expanded"].prefill_logits[0]) <= 1e-5
    assert got["absorbed"].tokens == got["expanded"].tokens


def test_bf16_is_as_close_to_fp32_as_transformers_own_bf16(models):
    ids = _prompt(T_LONG, 1)
    truth = _their_logits(models, ids)
    with torch.no_grad():
        theirs = transformers.KimiLinearForCausalLM.from_pretrained(models["released"], dtype=torch.bfloat16).eval()
        theirs_err = (theirs(torch.tensor([ids])).logits[0].float() - truth).abs().max()
    ours = M.generate(M.load(models["released"], "cpu", dtype="bfloat16"), [ids], max_new_tokens=1,
                      eos_token_id=[]).prefill_logits[0]
    assert (ours - truth).abs().max() <= 3 * theirs_err


def test_released_config_names_and_defaults_match_kimi_linear_config():
    """The released config.json's names (num_experts, num_experts_per_token, moe_renormalize,
    num_expert_group, num_shared_experts, model_max_length, linear_attn_config) and the omitted
    fields read as KimiLinearConfig reads them."""
    released = dict(num_hidden_layers=5, num_experts=6, num_experts_per_token=3, moe_renormalize=False,
                    num_expert_group=2, topk_group=1, num_shared_experts=2, model_max_length=77, first_k_dense_replace=2,
                    linear_attn_config={"full_attn_layers": [2, 5], "kda_layers": [1, 3, 4], "head_dim": 16,
                                        "num_heads": 3, "short_conv_kernel_size": 3})
    for d in (released, dict(num_hidden_layers=9)):
        ours = M.ModelConfig.from_dict({"model_type": "kimi_linear", **d})
        theirs = transformers.KimiLinearConfig(**d)
        assert list(ours.layer_types) == theirs.layer_types and list(ours.mlp_layer_types) == theirs.mlp_layer_types
        pairs = [("n_routed_experts", "num_local_experts"), ("linear_num_key_heads", "linear_num_heads"),
                 ("linear_key_head_dim", "linear_head_dim")]
        pairs += [(f, f) for f in ("num_experts_per_tok", "norm_topk_prob", "n_group", "topk_group", "n_shared_experts",
                                   "max_position_embeddings", "linear_conv_kernel_dim", "rms_norm_eps", "vocab_size",
                                   "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
                                   "num_key_value_heads", "routed_scaling_factor", "kv_lora_rank", "q_lora_rank",
                                   "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "tie_word_embeddings")]
        for f, g in pairs:
            assert getattr(ours, f) == getattr(theirs, g), f
    assert M.ModelConfig.from_dict({"model_type": "kimi_linear", **released}).layer_types == \
        ("linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention")


@pytest.mark.parametrize("change, message", [
    ({"linear_attn_config": [1]}, "linear_attn_config: expected a JSON object, got a JSON list"),
    ({"linear_attn_config": {"kda_layers": [1], "full_attn_layers": []}},
     "linear_attn_config: layer 2 is in neither full_attn_layers nor kda_layers"),
    ({"linear_attn_config": {"kda_layers": [1, 2], "full_attn_layers": [2]}}, "layer 2 is listed twice"),
    ({"linear_attn_config": {"kda_layers": [1, 0], "full_attn_layers": [2]}},
     "linear_attn_config.kda_layers: expected an integer in [1, 2]"),
    ({"linear_attn_config": {"kda_layers": "1", "full_attn_layers": [2]}},
     "linear_attn_config.kda_layers: expected a list of 1-indexed layer numbers"),
    ({"linear_attn_config": {"head_dim": 0}}, "linear_head_dim: expected an integer in [1, 4096]"),
    ({"linear_attn_config": {"kda_layers": [1], "full_attn_layers": [2], "num_heads": 1 << 20}},
     "linear_num_heads: expected an integer in [1, 1024]"),
    ({"linear_conv_kernel_dim": 65}, "linear_conv_kernel_dim: expected an integer in [1, 64]"),
    ({"layer_types": ["linear_attention", "mamba"]}, "layer_types must list 'linear_attention'/'full_attention'"),
    ({"num_key_value_heads": 2}, "num_key_value_heads: expected num_attention_heads=4"),
    ({"num_experts_per_token": 9}, "num_experts_per_tok: expected at most 4"),
])
def test_hostile_configs_exit_4_naming_the_field(tmp_path, change, message):
    cfg = {"model_type": "kimi_linear", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4, "num_experts_per_token": 2,
           "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
           "linear_attn_config": {"kda_layers": [1], "full_attn_layers": [2], "head_dim": 8, "num_heads": 2}, **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(cli, ["run", "-b", "cpu", "-m", str(tmp_path), "--prompt-ids", "1,2"])
    assert res.exit_code == 4, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_hal_run_tiny_kimi_linear_prints_tokens():
    res = CliRunner().invoke(cli, ["run", "-b", "cpu", "-m", "tiny-kimi-linear", "--prompt", "hello world",
                                   "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "kimi_linear" in res.output and "[0] output ids [" in res.output
    assert "gated_delta_rule" in res.output and "causal_conv1d" in res.output
