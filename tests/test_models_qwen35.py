"""Qwen3.5 MoE (Gated DeltaNet + gated attention + softmax MoE) against transformers 5.24's own
Qwen3_5Moe code on the CPU, in both folder layouts, plus its config, hostile configs and `hal run`."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

import hal.models as M
from hal.cli import cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# 3 linear + 1 full layer; 2 key heads serve 4 value heads (GVA); partial RoPE 0.25 of head_dim 16
TEXT = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_experts_per_tok=2, num_experts=8, max_position_embeddings=512,
            initializer_range=0.1, eos_token_id=None)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2)
T_LONG = 75                                  # longer than transformers' (and FLA's) chunk size of 64


def _prompt(n: int, seed: int) -> list:
    return torch.randint(3, TEXT["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One random text model saved twice: as Qwen3_5MoeForCausalLM saves it ("model.layers.*",
    model_type qwen3_5_moe_text) and inside Qwen3_5MoeForConditionalGeneration, the released
    layout ("model.language_model.*" next to "model.visual.*", nested text_config)."""
    root = tmp_path_factory.mktemp("qwen35")
    torch.manual_seed(0)
    text = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**TEXT)).eval()
    with torch.no_grad():                    # away from the init values, so a mixed-up norm shows
        for name, p in text.named_parameters():
            if name.endswith("norm.weight") or name.endswith("dt_bias"):
                p.add_(torch.randn_like(p) * 0.3)
    text.save_pretrained(root / "text")
    vl = transformers.Qwen3_5MoeForConditionalGeneration(
        transformers.Qwen3_5MoeConfig(text_config=TEXT, vision_config=VISION)).eval()
    vl.model.language_model.load_state_dict(text.model.state_dict())
    with torch.no_grad():
        vl.lm_head.weight.copy_(text.lm_head.weight)
    vl.save_pretrained(root / "released")
    return {"text": text, "vl": vl, "text_dir": root / "text", "released_dir": root / "released"}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_prefill_logits_and_16_greedy_tokens_match_transformers(models):
    ours = M.load(models["text_dir"], "cpu")
    assert ours.config.model_type == "qwen3_5_moe_text" and ours.unused_tensors == []
    ids = _prompt(T_LONG, 1)
    with torch.no_grad():
        want = models["text"](torch.tensor([ids])).logits[0]
        theirs = models["text"].generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, T_LONG:]
    res = M.generate(ours, [ids], max_new_tokens=16, eos_token_id=[])
    assert _rel(res.prefill_logits[0], want) <= 1e-4
    assert res.tokens[0] == theirs.tolist()
    assert len(set(res.tokens[0])) > 3                   # not a degenerate repeat of one token
    plan = {p.op: p for p in ours.rt.plan()}
    # prefill + 15 decode steps through each of the 3 linear layers
    assert plan["gated_delta_rule"].calls == plan["causal_conv1d"].calls == 3 * 16


def test_the_released_layout_loads_the_same_text_model(models):
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # vision tower skipped without a warning
        ours = M.load(models["released_dir"], "cpu")
    assert ours.config.model_type == "qwen3_5_moe"
    assert ours.unused_tensors and all(n.startswith("model.visual.") for n in ours.unused_tensors)
    text = M.load(models["text_dir"], "cpu")
    ids = _prompt(T_LONG, 2)
    with torch.no_grad():
        want = models["vl"](input_ids=torch.tensor([ids])).logits[0]   # transformers' VL model, text only
    got = M.generate(ours, [ids], max_new_tokens=1, eos_token_id=[]).prefill_logits[0]
    assert _rel(got, want) <= 1e-4
    assert torch.equal(got, M.generate(text, [ids], max_new_tokens=1, eos_token_id=[]).prefill_logits[0])


def test_fused_experts_and_an_mtp_module_in_the_released_layout(models, tmp_path):
    """Experts stored fused (``mlp.experts.gate_up_proj`` [E, 2I, H], gate rows first, and
    ``down_proj`` [E, H, I], as transformers holds them) load to the same model; the
    multi-token-prediction module (``mtp.*``) is left aside without a warning."""
    import re
    import shutil
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(models["released_dir"] / "model.safetensors"))
    fused, E = {}, TEXT["num_experts"]
    for name in list(tensors):
        m = re.fullmatch(r"(.*\.mlp\.experts)\.0\.gate_proj\.weight", name)
        if m:
            p = m.group(1)
            fused[f"{p}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}.{e}.gate_proj.weight"],
                                                                 tensors[f"{p}.{e}.up_proj.weight"]])
                                                      for e in range(E)])
            fused[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(E)])
    kept = {n: t for n, t in tensors.items() if ".mlp.experts." not in n}
    save_file({**kept, **fused, "mtp.fc.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    shutil.copy(models["released_dir"] / "config.json", tmp_path / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = M.load(tmp_path, "cpu")
    assert "mtp.fc.weight" in ours.unused_tensors
    ids = _prompt(20, 7)
    want = M.generate(M.load(models["released_dir"], "cpu"), [ids], max_new_tokens=3, eos_token_id=[])
    got = M.generate(ours, [ids], max_new_tokens=3, eos_token_id=[])
    assert torch.equal(got.prefill_logits, want.prefill_logits) and got.tokens == want.tokens


def test_batched_prompts_of_different_lengths(models):
    """Right-padded prompts (seq_lens into the conv and the recurrence, per-sequence KV lengths)
    give each prompt's own logits and tokens, equal to transformers' prompt by prompt."""
    ours = M.load(models["text_dir"], "cpu")
    prompts = [_prompt(T_LONG, 3), _prompt(9, 4), _prompt(40, 5)]
    res = M.generate(ours, prompts, max_new_tokens=6, eos_token_id=[])
    for b, p in enumerate(prompts):
        with torch.no_grad():
            want = models["text"](torch.tensor([p])).logits[0]
        assert _rel(res.prefill_logits[b, :len(p)], want) <= 1e-4
        alone = M.generate(ours, [p], max_new_tokens=6, eos_token_id=[])
        assert res.tokens[b] == alone.tokens[0]


def test_bf16_is_as_close_to_fp32_as_transformers_own_bf16(models):
    ids = _prompt(T_LONG, 6)
    with torch.no_grad():
        truth = models["text"](torch.tensor([ids])).logits[0]
        theirs = transformers.Qwen3_5MoeForCausalLM.from_pretrained(models["text_dir"], dtype=torch.bfloat16).eval()
        theirs_err = (theirs(torch.tensor([ids])).logits[0].float() - truth).abs().max()
    ours = M.generate(M.load(models["text_dir"], "cpu", dtype="bfloat16"), [ids], max_new_tokens=1,
                      eos_token_id=[]).prefill_logits[0]
    assert (ours - truth).abs().max() <= 3 * theirs_err


def test_omitted_fields_take_transformers_defaults():
    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 num_experts=4, num_experts_per_tok=2, full_attention_interval=3)
    ours = M.ModelConfig.from_dict({"model_type": "qwen3_5_moe_text", **small})
    theirs = transformers.Qwen3_5MoeTextConfig(**small)
    assert list(ours.layer_types) == theirs.layer_types == \
        ["linear_attention", "linear_attention", "full_attention"] * 2
    for f in ("head_dim", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
              "linear_num_key_heads", "linear_num_value_heads", "moe_intermediate_size",
              "shared_expert_intermediate_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(ours, f) == getattr(theirs, f), f
    assert ours.partial_rotary_factor == theirs.rope_parameters["partial_rotary_factor"] == 0.25
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.n_routed_experts == 4 and ours.norm_topk_prob and ours.mlp_layer_types == ("sparse",) * 6
    nested = M.ModelConfig.from_dict({"model_type": "qwen3_5_moe", "tie_word_embeddings": True, "eos_token_id": 7,
                                      "text_config": {**small, "model_type": "qwen3_5_moe_text"},
                                      "vision_config": {"depth": 27}})
    assert nested.model_type == "qwen3_5_moe" and nested.tie_word_embeddings and nested.eos_token_id == (7,)
    assert nested.layer_types == ours.layer_types


@pytest.mark.parametrize("change, message", [
    ({"text_config": None}, "text_config: expected a JSON object"),
    ({"text_config": [1]}, "text_config: expected a JSON object (model_type qwen3_5_moe nests the text model's "
                           "fields there), got a JSON list"),
    ({"linear_num_value_heads": 3}, "linear_num_value_heads: expected a multiple of linear_num_key_heads=2"),
    ({"layer_types": ["linear_attention", "mamba"]}, "layer_types must list 'linear_attention'/'full_attention'"),
    ({"layer_types": ["full_attention"]}, "layer_types: expected one entry for each of the num_hidden_layers=2"),
    ({"linear_conv_kernel_dim": 0}, "linear_conv_kernel_dim: expected an integer in [1, 64]"),
    ({"linear_key_head_dim": 1 << 20}, "linear_key_head_dim: expected an integer in [1, 4096]"),
    ({"full_attention_interval": 0}, "full_attention_interval: expected an integer in [1, 1024]"),
    ({"head_dim": 6}, "partial_rotary_factor: head_dim=6 x 0.25 must give an even rotated width >= 2, got 1"),
    ({"mlp_layer_types": ["dense", "sparse"]}, "'dense' is not supported"),
])
def test_hostile_configs_exit_4_naming_the_field(tmp_path, change, message):
    text = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
            "layer_types": ["linear_attention", "full_attention"]}
    if "text_config" in change:
        cfg = {"model_type": "qwen3_5_moe", **change}
    else:
        cfg = {"model_type": "qwen3_5_moe", "text_config": {**text, **change}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(cli, ["run", "-b", "cpu", "-m", str(tmp_path), "--prompt-ids", "1,2"])
    assert res.exit_code == 4, res.output
    assert message in res.output and "Traceback" not in res.output


def test_hal_run_tiny_qwen35_prints_tokens():
    res = CliRunner().invoke(cli, ["run", "-b", "cpu", "-m", "tiny-qwen35", "--prompt", "hello world",
                                   "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "qwen3_5_moe_text" in res.output and "[0] output ids [" in res.output
    assert "gated_delta_rule" in res.output and "causal_conv1d" in res.output


def test_a_backend_without_the_linear_attention_ops_falls_back_to_the_reference():
    """A backend with only moe_forward runs the model: the linear-attention ops go to the reference
    (path "fallback"), the tokens are the reference's."""
    from hal.backend import Backend, OpCapability
    from hal.backends.cpu import KERNELS
    from hal.registry import get_registry
    get_registry().register_backend(Backend("moe-only", priority=-50, kernels={"moe_forward": KERNELS["moe_forward"]},
                                            capabilities={"moe_forward": OpCapability()}))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)          # "does not implement ...: reference"
            model = M.load("tiny-qwen35", "moe-only")
        got = M.generate(model, [[1, 17, 42, 99, 5], [3, 88]], max_new_tokens=4, eos_token_id=[]).tokens
        plan = {p.op: p for p in model.rt.plan()}
    finally:
        get_registry().unregister("moe-only")
    assert plan["moe_forward"].path == "native" and plan["moe_forward"].calls > 0
    assert plan["gated_delta_rule"].path == plan["causal_conv1d"].path == "fallback"
    assert plan["gated_delta_rule"].calls > 0
    ref = M.generate(M.load("tiny-qwen35", "cpu"), [[1, 17, 42, 99, 5], [3, 88]], max_new_tokens=4,
                     eos_token_id=[]).tokens
    assert got == ref


def test_hal_run_on_the_ascend_emulator_gives_the_reference_tokens():
    """Whether hal-ascend runs the linear-attention ops natively or on the reference fallback, the
    tokens of two right-padded prompts are the reference's (fp32)."""
    pytest.importorskip("hal_ascend")
    import os
    import subprocess
    import sys
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41, 42, 43]]
    env = {k: v for k, v in os.environ.items() if k not in ("HAL_CUDA_INTERPRET", "TRITON_INTERPRET")}
    env.update(HAL_ASCEND_EMULATE="1", TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    out = subprocess.run([sys.executable, "-m", "hal.cli", "run", "-b", "ascend", "-m", "tiny-qwen35", "--prompt-ids",
                          ";".join(",".join(map(str, p)) for p in prompts), "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["label"] == "ascend (emulated torch_npu)"
    plan = {p["op"]: p for p in got["plan"]}
    assert all(plan[op]["calls"] > 0 for op in ("moe_forward", "gated_delta_rule", "causal_conv1d"))
    ref = M.generate(M.load("tiny-qwen35", "cpu"), prompts, max_new_tokens=4).tokens
    assert got["tokens"] == ref
