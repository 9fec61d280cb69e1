"""Hostile model folders and `hal run` inputs (issue 11 items 4-6): every one exits 4 with one
line, fast, reading nothing outside the folder and writing nothing; bad options exit 2; sizes are
bounded before anything is allocated. Plus the built-in models' tokenizer (issue 12)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch
from click.testing import CliRunner

import hal.models as M
from hal.cli import cli
from hal.models.builtin import random_checkpoint

safetensors_torch = pytest.importorskip("safetensors.torch")

SMALL = {"model_type": "glm4_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
         "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
         "max_position_embeddings": 64, "eos_token_id": 2, "use_qk_norm": True}
SMALL_MLA = {**SMALL, "model_type": "deepseek_v32", "num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16,
             "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "index_topk": 4, "index_head_dim": 16,
             "index_n_heads": 2, "n_group": 2, "topk_group": 1}
SMALL_MLA.pop("use_qk_norm")


def _write(folder, cfg=SMALL, shards=1):
    """A loadable model folder: config.json + model.safetensors (or `shards` shards with an index)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = random_checkpoint(cfg, seed=0)
    if shards == 1:
        safetensors_torch.save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        safetensors_torch.save_file(part, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("good") / "m", shards=2)


@pytest.fixture
def runner():
    return CliRunner()


def _run(runner, folder, *extra):
    t0 = time.perf_counter()
    res = runner.invoke(cli, ["run", "-b", "cpu", "-m", str(folder), "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                              *extra])
    return res, time.perf_counter() - t0


def _assert_exit4(runner, folder, fragment, *extra):
    """exit 4, one line (no traceback) naming `fragment`, in under 5 s, and nothing written."""
    before = sorted(os.listdir(folder)) if folder.is_dir() else None
    res, seconds = _run(runner, folder, *extra)
    assert res.exit_code == 4, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hal: error: "), res.output
    assert fragment in lines[0], lines[0]
    assert seconds < 5
    if before is not None:
        assert sorted(os.listdir(folder)) == before


def test_the_good_folder_runs(runner, good):
    """The baseline every hostile folder below is one edit away from."""
    res, _ = _run(runner, good, "--json")
    assert res.exit_code == 0, res.output
    assert [len(t) for t in json.loads(res.output)["tokens"]] == [2]


def _copy(good, tmp_path, name="m"):
    return shutil.copytree(good, tmp_path / name, symlinks=True)


def _edit_index(folder, edit):
    p = folder / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    edit(index)
    p.write_text(json.dumps(index))


def _edit_config(folder, **change):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(change)
    p.write_text(json.dumps(cfg))


# ---- reads stay inside the folder ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["dotdot", "absolute", "dotdot_inside"])
def test_index_entries_outside_the_folder_are_refused(runner, good, tmp_path, how):
    """A weight_map entry with '..' or an absolute path is refused even when it names a valid shard."""
    d = _copy(good, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = sorted(d.glob("*.safetensors"))[0]
    shutil.copy(victim, outside / victim.name)
    target = {"dotdot": f"../outside/{victim.name}", "absolute": str(outside / victim.name),
              "dotdot_inside": f"./sub/../{victim.name}"}[how]

    def point_outside(index):
        wm = index["weight_map"]
        for n in [n for n, f in wm.items() if f == victim.name]:
            wm[n] = target
    _edit_index(d, point_outside)
    _assert_exit4(runner, d, f"-> shard {target!r} is outside the model folder")


def test_a_shard_symlink_leading_outside_is_refused(runner, good, tmp_path):
    d = _copy(good, tmp_path)
    victim = sorted(d.glob("*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(victim, outside)
    victim.symlink_to(outside)
    _assert_exit4(runner, d, "is a symlink leading outside the model folder")


def test_symlinks_inside_the_folder_and_into_a_hub_cache_blobs_folder_are_followed(runner, good, tmp_path):
    """Links that stay inside are fine; so are a Hugging Face hub snapshot's links into ../../blobs."""
    d = _copy(good, tmp_path)
    victim = sorted(d.glob("*.safetensors"))[0]
    (d / "store").mkdir()
    shutil.move(victim, d / "store" / "data.bin")
    victim.symlink_to(d / "store" / "data.bin")
    assert _run(runner, d)[0].exit_code == 0

    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in good.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    assert _run(runner, snap)[0].exit_code == 0
    # the same layout outside a snapshots/ folder is a link leading outside
    other = tmp_path / "plain"
    shutil.copytree(snap, other, symlinks=True)
    _assert_exit4(runner, other, "is a symlink leading outside the model folder")


def test_a_subfolder_shard_is_read(runner, good, tmp_path):
    d = _copy(good, tmp_path)
    victim = sorted(d.glob("*.safetensors"))[0]
    (d / "shards").mkdir()
    shutil.move(victim, d / "shards" / victim.name)

    def into_subfolder(index):
        wm = index["weight_map"]
        for n in [n for n, f in wm.items() if f == victim.name]:
            wm[n] = f"shards/{victim.name}"
    _edit_index(d, into_subfolder)
    assert _run(runner, d)[0].exit_code == 0


# ---- regular files only; never hangs ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                  "tokenizer.json"])
@pytest.mark.parametrize("kind", ["fifo", "directory", "dev_zero"])
def test_non_regular_files_are_refused_before_reading(runner, good, tmp_path, name, kind):
    d = _copy(good, tmp_path)
    p = d / name
    if p.exists():
        p.unlink()
    if kind == "fifo":
        os.mkfifo(p)
        fragment = "is a FIFO, not a regular file"
    elif kind == "directory":
        p.mkdir()
        fragment = "is a directory, not a regular file"
    else:
        p.symlink_to("/dev/zero")
        fragment = "is a symlink leading outside the model folder (to /dev/zero)"
    _assert_exit4(runner, d, fragment)


def test_dev_zero_inside_the_folder_is_still_not_a_regular_file(tmp_path):
    """The regular-file test holds even where the location test passes (a device node inside)."""
    from pathlib import Path
    from hal.models.loader import ModelFolder
    folder = ModelFolder(tmp_path)
    folder.roots.append(Path("/dev"))                 # as if /dev/zero lay inside the folder
    (tmp_path / "config.json").symlink_to("/dev/zero")
    with pytest.raises(M.CheckpointError, match="config.json is a character device, not a regular file"):
        folder.read_text("config.json", "config.json", 1 << 20)


def test_a_fifo_config_exits_4_in_a_real_process(good, tmp_path):
    """End to end in a subprocess: the FIFO would block a plain open() forever."""
    d = _copy(good, tmp_path)
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    out = subprocess.run([sys.executable, "-m", "hal.cli", "run", "-b", "cpu", "-m", str(d)], capture_output=True,
                         text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 4, out.stderr
    want = f"hal: error: {d / 'config.json'}: config.json is a FIFO, not a regular file"
    assert out.stderr.strip().splitlines() == [want]
    assert out.stdout == ""


def test_oversized_json_files_are_refused_by_size(runner, good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg) + " " * (1 << 20))
    _assert_exit4(runner, d, "config.json is 1048")
    assert "more than the limit of 1048576" in _run(runner, d)[0].output


# ---- malformed JSON files: exit 4, one line ---------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [
    ("{not json", "config.json: not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object of fields, got a JSON list"),
    ('"glm4_moe"', "expected a JSON object of fields, got a JSON string"),
    ("[" * 100000 + "]" * 100000, "config.json: not valid JSON"),
    ('{"vocab_size": ' + "9" * 5000 + "}", "config.json: not valid JSON"),
    ("\xff\xfe{}", "config.json is not UTF-8 text"),
    ('{"model_type": ["glm4_moe"]}', "unsupported model_type ['glm4_moe']"),
], ids=["not-json", "list", "string", "deep-nesting", "5000-digit-int", "not-utf8", "unhashable-model-type"])
def test_config_json_that_is_not_a_config(runner, good, tmp_path, text, fragment):
    d = _copy(good, tmp_path)
    (d / "config.json").write_bytes(text.encode("latin-1"))
    _assert_exit4(runner, d, fragment)


@pytest.mark.parametrize("change, fragment", [
    ({"quantization_config": "fp8"}, "quantization_config: expected a JSON object, got 'fp8'"),
    ({"rope_parameters": "yarn"}, "rope_parameters: expected a JSON object, got 'yarn'"),
    ({"rope_scaling": [1, 2]}, "rope_scaling: expected a JSON object"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": "128"}}, "is not the 128x128 e4m3 block"),
    ({"mlp_layer_types": "dense"}, "mlp_layer_types: expected a list, got a JSON string"),
    ({"eos_token_id": "2"}, "eos_token_id: expected a token id"),
    ({"use_qk_norm": "yes"}, "use_qk_norm: expected true or false, got 'yes'"),
])
def test_config_fields_of_the_wrong_kind(runner, good, tmp_path, change, fragment):
    d = _copy(good, tmp_path)
    _edit_config(d, **change)
    _assert_exit4(runner, d, fragment)


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "model.safetensors.index.json: not valid JSON"),
    ('{"metadata": {}}', "expected a JSON object with a weight_map object (tensor name -> shard file), "
                         "got no weight_map"),
    ('{"weight_map": ["a.safetensors"]}', "got a weight_map that is a JSON list"),
    ('[]', "got no weight_map"),
    ('{"weight_map": {"x": 3}}', "entry 'x' -> shard 3 is not a file name"),
    ('{"weight_map": {"x": ""}}', "entry 'x' -> shard '' is not a file name"),
])
def test_index_that_is_not_an_index(runner, good, tmp_path, text, fragment):
    d = _copy(good, tmp_path)
    (d / "model.safetensors.index.json").write_text(text)
    _assert_exit4(runner, d, fragment)


@pytest.mark.parametrize("text", ["garbage", "{}", '{"model": {"type": "BPE", "vocab": 3}}', "[1]"])
def test_a_garbage_tokenizer_is_a_clean_exit_4_even_with_prompt_ids(runner, good, tmp_path, text):
    d = _copy(good, tmp_path)
    (d / "tokenizer.json").write_text(text)
    _assert_exit4(runner, d, "tokenizer.json: not a tokenizer.json the tokenizers package can read")


# ---- configs the contract would refuse at run time: refused at load, naming the field -----------------

@pytest.mark.parametrize("cfg, change, fragment", [
    (SMALL, {"num_experts_per_tok": 99}, "num_experts_per_tok: expected at most 4"),
    (SMALL, {"num_experts_per_tok": 5}, "num_experts_per_tok: expected at most 4"),
    (SMALL, {"num_experts_per_tok": 0}, "num_experts_per_tok: expected an integer in [1, 4096]"),
    (SMALL, {"n_group": 3}, "n_group=3 must divide n_routed_experts=4"),
    (SMALL, {"n_group": 2, "topk_group": 3}, "topk_group=3 must not exceed it"),
    (SMALL_MLA, {"num_experts_per_tok": 3}, "num_experts_per_tok: expected at most 2 (the experts in topk_group=1 "
                                            "of n_group=2"),
    (SMALL_MLA, {"index_topk": 0}, "index_topk: expected an integer in [1, 16777216]"),
    (SMALL_MLA, {"qk_rope_head_dim": 7}, "qk_rope_head_dim: expected an even number"),
    (SMALL, {"num_key_value_heads": 3}, "num_key_value_heads: expected a divisor of num_attention_heads=4"),
    (SMALL, {"head_dim": 8, "partial_rotary_factor": 0.1}, "must give an even rotated width >= 2, got 0"),
])
def test_configs_the_contract_would_refuse_at_run_time(runner, tmp_path, cfg, change, fragment):
    d = _write(tmp_path / "m", cfg)
    assert _run(runner, d)[0].exit_code == 0           # the same folder before the edit runs
    _edit_config(d, **change)
    _assert_exit4(runner, d, fragment)


@pytest.mark.parametrize("change, fragment", [
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps: expected a finite number > 0, got nan"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps: expected a finite number > 0, got -1e-06"),
    ({"rms_norm_eps": 0}, "rms_norm_eps: expected a finite number > 0, got 0"),
    ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor: expected a finite number, got inf"),
    ({"rope_theta": float("nan")}, "rope_theta: expected a finite number > 1, got nan"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor: expected a finite number in (0, 1], got 1.5"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": float("-inf"), "original_max_position_embeddings": 32}},
     "rope_parameters.factor: expected a finite number > 0, got -inf"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32,
                          "mscale": float("nan")}}, "rope_parameters.mscale: expected a finite number, got nan"),
    ({"rope_parameters": {"rope_theta": 1e400}}, "rope_parameters.rope_theta: expected a finite number > 1, got inf"),
])
def test_non_finite_or_out_of_range_float_fields(runner, good, tmp_path, change, fragment):
    d = _copy(good, tmp_path)
    _edit_config(d, **change)                            # json.dumps writes NaN / Infinity, which json.loads reads
    _assert_exit4(runner, d, fragment)


# ---- sizes bounded before anything is allocated -----------------------------------------------------

@pytest.mark.parametrize("field, value, fragment", [
    ("num_hidden_layers", 10 ** 9, "num_hidden_layers: expected an integer in [1, 1024] (this package's limit), "
                                   "got 1000000000"),
    ("num_hidden_layers", 1e9, "num_hidden_layers: expected an integer in [1, 1024], got 1000000000.0 (a JSON number)"),
    ("vocab_size", 2 ** 40, "vocab_size: expected an integer in [1, 1048576]"),
    ("hidden_size", 2 ** 31 - 1, "hidden_size: expected an integer in [1, 65536]"),
    ("max_position_embeddings", 2 ** 40, "max_position_embeddings: expected an integer in [1, 16777216]"),
    ("n_routed_experts", 2 ** 40, "n_routed_experts: expected an integer in [1, 4096]"),
    ("num_attention_heads", 10 ** 6, "num_attention_heads: expected an integer in [1, 1024]"),
    ("intermediate_size", -1, "intermediate_size: expected an integer in [1, 262144]"),
    ("moe_intermediate_size", True, "moe_intermediate_size: expected an integer in [1, 65536], got True"),
    ("head_dim", 10 ** 5, "head_dim: expected an integer in [1, 4096]"),
    ("eos_token_id", list(range(2000)), "eos_token_id: expected a token id >= 0 or a list of at most 1024"),
])
def test_sizes_past_the_limits_exit_4_fast_with_small_memory(runner, good, tmp_path, field, value, fragment):
    d = _copy(good, tmp_path)
    _edit_config(d, **{field: value})
    tracemalloc.start()
    try:
        _assert_exit4(runner, d, fragment)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20          # a billion-entry layer list alone would be 8 GB


def test_huge_layer_schedules_are_refused_by_length_before_being_expanded():
    d = {**SMALL_MLA, "model_type": "glm_moe_dsa", "index_topk_pattern": "F" * 100000}
    with pytest.raises(M.ModelConfigError, match="index_topk_pattern: expected one entry for each of the "
                                                 "num_hidden_layers=2 layers, got 100000"):
        M.ModelConfig.from_dict(d)


REAL_CONFIGS = {   # the released models' sizes (config.json of each): the limits must admit them
    "GLM-5": {"model_type": "glm_moe_dsa", "vocab_size": 154880, "hidden_size": 6144, "intermediate_size": 12288,
              "moe_intermediate_size": 2048, "num_hidden_layers": 78, "num_attention_heads": 64,
              "num_key_value_heads": 64, "n_routed_experts": 256, "num_experts_per_tok": 8, "q_lora_rank": 2048,
              "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 192, "v_head_dim": 256,
              "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 32, "max_position_embeddings": 202752,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    "DeepSeek-V3.2": {"model_type": "deepseek_v32", "vocab_size": 129280, "hidden_size": 7168,
                      "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                      "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
                      "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "q_lora_rank": 1536,
                      "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
                      "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 64,
                      "max_position_embeddings": 163840,
                      "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "GLM-4.5": {"model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 5120, "intermediate_size": 12288,
                "moe_intermediate_size": 1536, "num_hidden_layers": 92, "num_attention_heads": 96,
                "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 160, "num_experts_per_tok": 8,
                "partial_rotary_factor": 0.5, "max_position_embeddings": 131072, "rope_theta": 1000000,
                "use_qk_norm": True, "attention_bias": True, "eos_token_id": [151329, 151336, 151338]},
    "Kimi-K2-sized": {"model_type": "deepseek_v32", "vocab_size": 163840, "hidden_size": 7168,
                      "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                      "num_attention_heads": 64, "num_key_value_heads": 64, "n_routed_experts": 384,
                      "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "q_lora_rank": 1536,
                      "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
                      "max_position_embeddings": 131072},
    "Qwen3.5-397B-A17B-sized": {"model_type": "qwen3_5_moe", "tie_word_embeddings": False, "text_config": {
        "vocab_size": 248320, "hidden_size": 4096, "num_hidden_layers": 60, "num_attention_heads": 32,
        "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 64,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 512,
        "num_experts_per_tok": 10, "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024,
        "full_attention_interval": 4, "max_position_embeddings": 262144,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True}}},
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_the_limits_admit_the_released_model_sizes(name):
    c = M.ModelConfig.from_dict(REAL_CONFIGS[name])
    fields = REAL_CONFIGS[name].get("text_config", REAL_CONFIGS[name])
    assert c.num_hidden_layers == fields["num_hidden_layers"]
    assert c.vocab_size == fields["vocab_size"]


def test_the_kv_cache_is_sized_by_the_prompts_not_max_position_embeddings():
    """A model allowing 2**24 positions still allocates prompt + new tokens of cache."""
    from hal.models.loader import TensorSource, build_model
    import hal
    cfg = {**SMALL, "max_position_embeddings": 1 << 24}
    model = build_model(M.ModelConfig.from_dict(cfg), TensorSource.from_dict(random_checkpoint(cfg, 0)),
                        hal.runtime("cpu"))
    made = []
    real_new_cache = model.new_cache

    def recording_new_cache(batch, capacity):
        made.append((batch, capacity))
        return real_new_cache(batch, capacity)
    model.new_cache = recording_new_cache
    M.generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=3, eos_token_id=[])
    assert made == [(2, 5 + 3)]


# ---- weights of an unsupported dtype are refused, not cast --------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool, torch.uint8, torch.float8_e5m2])
def test_weights_of_an_unsupported_dtype_are_refused_naming_the_tensor(runner, tmp_path, dtype):
    d = _write(tmp_path / "m")
    tensors = safetensors_torch.load_file(str(d / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name] = torch.ones_like(tensors[name]).to(dtype)
    safetensors_torch.save_file(tensors, str(d / "model.safetensors"))
    _assert_exit4(runner, d, f"tensor {name} has dtype {str(dtype).replace('torch.', '')}; weights must be")


def test_float16_and_bfloat16_weights_are_taken(runner, tmp_path):
    d = _write(tmp_path / "m")
    tensors = safetensors_torch.load_file(str(d / "model.safetensors"))
    ref = tensors["model.embed_tokens.weight"].clone()
    tensors = {k: v.to(torch.float16 if i % 2 else torch.bfloat16) for i, (k, v) in enumerate(tensors.items())}
    safetensors_torch.save_file(tensors, str(d / "model.safetensors"))
    model = M.load(d, "cpu")
    assert model.embed.dtype == torch.float32
    assert torch.allclose(model.embed, ref, rtol=1e-2, atol=1e-4)


# ---- hal run options: usage errors exit 2, checked before loading --------------------------------------

@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"),
                                           ("--temperature", "-1")])
def test_non_finite_sampling_options_are_usage_errors(runner, option, value):
    res = runner.invoke(cli, ["run", "-b", "cpu", option, value])
    assert res.exit_code == 2 and f"Invalid value for '{option}'" in res.output, res.output


def test_generate_refuses_nan_temperature_itself():
    model = M.load("tiny-glm45", "cpu")
    with pytest.raises(ValueError, match="temperature: expected a finite number >= 0, got nan"):
        M.generate(model, [[1, 2]], temperature=math.nan)
    with pytest.raises(ValueError, match=r"top_p: expected a number in \(0, 1\], got nan"):
        M.generate(model, [[1, 2]], top_p=math.nan)
    with pytest.raises(M.PromptError, match="token ids must be integers, got 1.5"):
        M.generate(model, [[1, 1.5]])


def test_logits_out_into_a_missing_folder_is_refused_before_loading(runner, good, tmp_path):
    """Checked before the model is read: even a folder that would fail (exit 4) gets exit 2."""
    d = _copy(good, tmp_path)
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    target = tmp_path / "missing" / "logits.npy"
    res, seconds = _run(runner, d, "--logits-out", str(target))
    assert res.exit_code == 2 and "Invalid value for '--logits-out'" in res.output and "does not exist" in res.output
    assert not target.parent.exists() and seconds < 5


def test_a_failed_run_writes_no_logits(runner, good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_config(d, rms_norm_eps=float("nan"))
    target = tmp_path / "logits.npy"
    _assert_exit4(runner, d, "rms_norm_eps", "--logits-out", str(target))
    assert not target.exists()


def test_empty_prompt_ids_are_a_prompt_error_not_the_default_prompt(runner):
    res = runner.invoke(cli, ["run", "-b", "cpu", "--prompt-ids", ""])
    assert res.exit_code == 4 and "every prompt needs at least one token" in res.output


# ---- the built-in models' tokenizer (issue 12) ---------------------------------------------------------

def test_builtin_tokenizer_fits_the_builtin_vocabulary():
    from hal.models.tokenizer_builtin import SPECIAL_TOKENS, builtin_tokenizer
    tok = builtin_tokenizer()
    assert tok.get_vocab_size() <= min(c["vocab_size"] for c in M.BUILTIN.values())
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert all(c["eos_token_id"] == 2 for c in M.BUILTIN.values())            # <eos> is the models' EOS id
    for text in ["hello world", "Zürich, 日本語 and emoji \U0001F600!", "x" * 300, "  tabs\tand\nnewlines "]:
        ids = tok.encode(text).ids
        assert ids and max(ids) < 512 and tok.decode(ids) == text
    assert tok.encode("hello world").tokens == ["hello", "Ġworld"]             # merges learnt: one token per word


def test_the_committed_tokenizer_is_what_the_script_builds():
    """The shipped JSON is reproducible from the committed training script (no hand edits)."""
    from hal.models.tokenizer_builtin import BUILTIN_TOKENIZER_FILE, to_json, train
    assert BUILTIN_TOKENIZER_FILE.read_text(encoding="utf-8") == to_json(train())


@pytest.mark.parametrize("model", list(M.BUILTIN))
def test_hal_run_prompt_text_on_builtin_models(runner, model):
    from hal.models.tokenizer_builtin import builtin_tokenizer
    res = runner.invoke(cli, ["run", "-b", "cpu", "-m", model, "--prompt", "hello world", "--prompt", "a b c",
                              "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    tok = builtin_tokenizer()
    assert data["prompts"] == [tok.encode("hello world").ids, tok.encode("a b c").ids]
    assert data["text"] == [tok.decode(t) for t in data["tokens"]]


def test_hal_run_prompt_text_prints_text(runner):
    res = runner.invoke(cli, ["run", "-b", "cpu", "--prompt", "hello world", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "prompt ids [418, 421] = 'hello world'" in res.output and "[0] output text '" in res.output


def test_prompt_text_without_the_tokenizers_package_names_the_extra(runner, monkeypatch):
    import hal.models.tokenizer_builtin as tb
    monkeypatch.setattr(tb, "builtin_tokenizer", lambda: None)
    res = runner.invoke(cli, ["run", "-b", "cpu", "--prompt", "hello"])
    assert res.exit_code == 4
    assert "the tokenizers package is not installed (pip install 'hal[models]'); use --prompt-ids" in res.output
