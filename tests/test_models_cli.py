"""`hal run` end to end, model-level conformance, and the bad inputs issue 6 names."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import hal.models as M
from hal.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.parametrize("model", list(M.BUILTIN))
def test_run_builtin_json(runner, model, tmp_path):
    out = tmp_path / "logits.npy"
    res = runner.invoke(cli, ["run", "--backend", "cpu", "--model", model, "--prompt-ids", "1,2,3,4,5,6,7,8,9,10,11,12;4,5",
                              "--max-new-tokens", "4", "--json", "--logits-out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["backend"] == "cpu" and [len(t) for t in data["tokens"]] == [4, 4]
    plan = {p["op"]: p for p in data["plan"]}
    assert plan["moe_forward"]["calls"] > 0 and plan["moe_forward"]["path"] == "native"
    if model in ("tiny-glm5", "tiny-deepseek-v32"):
        assert plan["lightning_indexer"]["calls"] > 0 and plan["sparse_attention"]["calls"] > 0
    if model == "tiny-qwen35":
        assert plan["gated_delta_rule"]["calls"] > 0 and plan["causal_conv1d"]["calls"] > 0
    logits = np.load(out)
    assert logits.shape == (2, 12, M.BUILTIN[model]["vocab_size"]) and np.isfinite(logits).all()


def test_run_default_is_tiny_glm5_human_output():
    out = subprocess.run([sys.executable, "-m", "hal.cli", "run"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tiny-glm5" in out.stdout and "output ids" in out.stdout and "output text" in out.stdout and "tok/s" in out.stdout
    assert "runtime plan" in out.stdout and "lightning_indexer" in out.stdout


def test_run_fp8_quantized(runner):
    res = runner.invoke(cli, ["run", "--backend", "cpu", "--quantize", "fp8", "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    plan = {p["op"]: p for p in json.loads(res.output)["plan"]}
    assert plan["fp8_linear"]["calls"] > 0 and plan["fp8_quantize_weight"]["calls"] > 0


def test_sampling_is_seeded():
    m = M.load("tiny-glm45", "cpu")
    a = M.generate(m, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, eos_token_id=[]).tokens
    b = M.generate(m, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, eos_token_id=[]).tokens
    c = M.generate(m, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8, eos_token_id=[]).tokens
    assert a == b and a != c


def test_stops_at_eos():
    m = M.load("tiny-glm45", "cpu")
    first = M.generate(m, [[1, 2, 3]], max_new_tokens=1, eos_token_id=[]).tokens[0][0]
    assert M.generate(m, [[1, 2, 3]], max_new_tokens=10, eos_token_id=[first]).tokens[0] == [first]


def test_model_conformance_cli(runner, tmp_path):
    res = runner.invoke(cli, ["conformance", "--model", "tiny-deepseek-v32", "--backend", "cpu", "--json",
                              "--report-dir", str(tmp_path), "--format", "json,md,junit,html"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.output)["models"][0]
    assert m["top1_agreement"] == 1.0 and m["kl_max"] == 0 and m["passed"]
    reports = [p.read_text() for p in tmp_path.rglob("*.md")]         # the report set's layout is conformance's
    assert reports and any("Model tiny-deepseek-v32" in r for r in reports)


# ---- bad inputs: clear errors, non-zero exit codes, no traceback ------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("sharded")
    cfg = transformers.Glm4MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    transformers.Glm4MoeForCausalLM(cfg).save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    return d


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _assert_clean_error(res, code, fragment):
    assert res.exit_code == code, res.output
    assert fragment in res.output and "Traceback" not in res.output


def test_missing_shard(runner, sharded, tmp_path):
    d = _copy(sharded, tmp_path / "m")
    victim = sorted(d.glob("*.safetensors"))[-1]
    victim.unlink()
    _assert_clean_error(runner.invoke(cli, ["run", "-b", "cpu", "-m", str(d)]), 4, f"shard {victim.name}")


def test_tensor_of_wrong_shape(runner, sharded, tmp_path):
    from safetensors.torch import load_file, save_file
    d = _copy(sharded, tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_proj.weight"
    f = d / index[name]
    tensors = load_file(str(f))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(f))
    _assert_clean_error(runner.invoke(cli, ["run", "-b", "cpu", "-m", str(d)]), 4,
                        f"tensor {name} has shape (3, 3), expected (32, 32)")


def test_unsupported_model_type(runner, sharded, tmp_path):
    d = _copy(sharded, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_clean_error(runner.invoke(cli, ["run", "-b", "cpu", "-m", str(d)]), 4, "unsupported model_type 'llama'")


def test_prompt_longer_than_the_model_maximum(runner, sharded):
    ids = ",".join(["1"] * 40)
    _assert_clean_error(runner.invoke(cli, ["run", "-b", "cpu", "-m", str(sharded), "--prompt-ids", ids]), 4,
                        "exceeds the model's maximum of 32 positions")


def test_other_bad_inputs(runner, tmp_path):
    _assert_clean_error(runner.invoke(cli, ["run", "-b", "nosuch"]), 3, "backend 'nosuch' is unknown")
    _assert_clean_error(runner.invoke(cli, ["run", "-b", "cpu", "-m", str(tmp_path / "nothing")]), 4, "not a directory")
    _assert_clean_error(runner.invoke(cli, ["run", "-b", "cpu", "--prompt-ids", "1,99999"]), 4, "outside the vocabulary")
    assert runner.invoke(cli, ["run", "-b", "cpu", "--prompt-ids", "a,b"]).exit_code == 2


def test_text_prompt_without_tokenizer_json(runner, sharded):
    _assert_clean_error(runner.invoke(cli, ["run", "-b", "cpu", "-m", str(sharded), "--prompt", "hello"]), 4,
                        "cannot encode --prompt: it has no tokenizer.json; use --prompt-ids")


def test_text_prompt_with_tokenizer_json(runner, sharded, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = _copy(sharded, tmp_path / "m")
    vocab = {f"w{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    res = runner.invoke(cli, ["run", "-b", "cpu", "-m", str(d), "--prompt", "w3 w5 w7", "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["prompts"] == [[3, 5, 7]]
    assert data["text"][0] == " ".join(f"w{t}" for t in data["tokens"][0])


# ---- hal run on the other backends' CPU stand-ins ------------------------------------------------

def _cli(*args, **env):
    import os
    e = {k: v for k, v in os.environ.items() if k not in ("HAL_ASCEND_EMULATE", "HAL_CUDA_INTERPRET", "TRITON_INTERPRET")}
    e.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    e.update(env)
    return subprocess.run([sys.executable, "-m", "hal.cli", *args], capture_output=True, text=True, env=e, timeout=600)


def _native(plan, ops):
    return all(plan[op]["calls"] > 0 and plan[op]["fallback_calls"] == 0 and plan[op]["path"] != "fallback"
               for op in ops)


def test_run_on_the_ascend_emulator_is_native_and_matches_the_reference():
    """DeepSeek-V3.2-shaped MLA (nope + rope != v) in the absorbed form is the 576/512 MQA shape
    npu_sparse_flash_attention takes; an unpadded prompt lets npu_lightning_indexer's causal mode run."""
    pytest.importorskip("hal_ascend")
    cmd = ("run", "--model", "tiny-deepseek-v32", "--dtype", "bfloat16", "--mla-form", "absorbed",
           "--prompt-ids", ",".join(map(str, M.DEFAULT_PROMPT_IDS)), "--max-new-tokens", "3", "--json")
    ref = _cli(*cmd, "--backend", "cpu")
    out = _cli(*cmd, "--backend", "ascend", HAL_ASCEND_EMULATE="1")
    assert ref.returncode == 0 and out.returncode == 0, ref.stderr[-2000:] + out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["label"] == "ascend (emulated torch_npu)"
    assert _native({p["op"]: p for p in got["plan"]}, ("moe_forward", "lightning_indexer", "sparse_attention"))
    assert got["tokens"] == json.loads(ref.stdout)["tokens"]


def test_model_conformance_on_the_ascend_emulator(tmp_path):
    pytest.importorskip("hal_ascend")
    out = _cli("conformance", "--model", "tiny-glm5", "--backend", "ascend", "--json", "--report-dir", str(tmp_path),
               HAL_ASCEND_EMULATE="1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    m = json.loads(out.stdout)["models"][0]
    # hal-ascend runs every op the model uses in fp32 too (the DSA ops' fp32 path is torch ops on the
    # device), so the model is compared in fp32, where the budget is the floors
    assert m["dtype"] == "float32" and m["passed"] and m["label"] == "ascend (emulated torch_npu)"
    assert _native({p["op"]: p for p in m["plan"]}, ("moe_forward", "lightning_indexer", "sparse_attention"))
    assert m["kl_mean"] <= 2 * m["reference_at_dtype"]["kl_mean"] + 1e-4


def test_run_on_the_triton_interpreter_matches_the_reference():
    """GLM-5 (DSA) on hal-cuda's Triton kernels (indexer, sparse attention in both MLA forms, fused
    MoE), two prompts of different lengths: right padding, so the indexer's q_offset matters."""
    pytest.importorskip("hal_cuda")
    pytest.importorskip("triton")
    cmd = ("run", "--model", "tiny-glm5", "--prompt-ids", "1,2,3,4,5,6,7,8,9,10,11;40,41,42,43", "--max-new-tokens", "2",
           "--json")
    ref = _cli(*cmd, "--backend", "cpu")
    out = _cli(*cmd, "--backend", "cuda", HAL_CUDA_INTERPRET="1")
    assert ref.returncode == 0 and out.returncode == 0, ref.stderr[-2000:] + out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["label"] == "cuda (Triton interpreter, no GPU)"
    assert _native({p["op"]: p for p in got["plan"]}, ("moe_forward", "lightning_indexer", "sparse_attention"))
    assert got["tokens"] == json.loads(ref.stdout)["tokens"]
