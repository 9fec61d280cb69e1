"""hal.models: config.json reading against transformers' config classes, the decode cache path
against a full prefill, the absorbed MLA form, and checkpoint problems that name the tensor."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import hal.models as M
from hal.models.config import indexer_types

transformers = pytest.importorskip("transformers", reason="the config tests compare with transformers' classes")

SHAPES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=5,
              num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2)
MLA_SHAPES = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
CLASSES = {"glm_moe_dsa": "GlmMoeDsaConfig", "deepseek_v32": "DeepseekV32Config", "glm4_moe": "Glm4MoeConfig"}


@pytest.mark.parametrize("model_type", list(CLASSES))
def test_omitted_fields_take_transformers_defaults(model_type):
    """A config.json that omits optional fields means what transformers makes of it."""
    kw = dict(SHAPES, **(MLA_SHAPES if model_type != "glm4_moe" else {}))
    ours = M.ModelConfig.from_dict({"model_type": model_type, **kw})
    theirs = getattr(transformers, CLASSES[model_type])(**kw)
    rope = theirs.rope_parameters
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert list(ours.mlp_layer_types) == (getattr(theirs, "mlp_layer_types", None) or
                                          ["dense" if i < theirs.first_k_dense_replace else "sparse" for i in range(5)])
    assert (ours.n_group, ours.topk_group) == (theirs.n_group, theirs.topk_group)
    assert ours.routed_scaling_factor == theirs.routed_scaling_factor
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.partial_rotary_factor == rope.get("partial_rotary_factor", 1.0)
    assert ours.rope_theta == rope["rope_theta"] and ours.norm_topk_prob == theirs.norm_topk_prob
    eos = theirs.eos_token_id
    assert ours.eos_token_id == (() if eos is None else (eos,))
    if model_type != "glm4_moe":
        assert ours.q_lora_rank == theirs.q_lora_rank
        assert (ours.index_topk, ours.index_head_dim, ours.index_n_heads) == \
            (theirs.index_topk, theirs.index_head_dim, theirs.index_n_heads)
    if model_type == "glm_moe_dsa":
        assert list(ours.indexer_types) == theirs.indexer_types


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 10), freq=st.integers(1, 4), offset=st.integers(0, 4))
def test_glm5_indexer_schedule_follows_transformers(layers, freq, offset):
    theirs = transformers.GlmMoeDsaConfig(num_hidden_layers=layers, index_topk_freq=freq,
                                          index_skip_topk_offset=offset).indexer_types
    assert list(indexer_types({"index_topk_freq": freq, "index_skip_topk_offset": offset}, layers)) == theirs


def test_glm5_indexer_pattern_follows_transformers():
    theirs = transformers.GlmMoeDsaConfig(num_hidden_layers=6, index_topk_pattern="FSSFSF").indexer_types
    assert list(indexer_types({"index_topk_pattern": "FSSFSF"}, 6)) == theirs
    with pytest.raises(M.ModelConfigError, match="letters must be F or S"):
        indexer_types({"index_topk_pattern": "FX"}, 2)


@pytest.mark.parametrize("change, fragment", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_type 'llama3'"),
    ({"n_group": 3}, "n_group=3 must divide"),
    ({"indexer_types": ["shared"] * 5}, "indexer_types[0] must be 'full'"),
    ({"mlp_layer_types": ["dense"]}, "mlp_layer_types: expected one entry for each of the num_hidden_layers=5"),
    ({"kv_lora_rank": None}, "lacks the field 'kv_lora_rank'"),
])
def test_configs_we_cannot_run_are_refused_by_name(change, fragment):
    d = {"model_type": "glm_moe_dsa", **SHAPES, **MLA_SHAPES}
    d.update(change)
    if change.get("kv_lora_rank", 0) is None:
        del d["kv_lora_rank"]
    with pytest.raises(M.ModelConfigError) as exc:
        M.ModelConfig.from_dict(d)
    assert fragment in str(exc.value)


# ---- the cache path ------------------------------------------------------------------------------

def _decode_vs_prefill(model, prompt, n):
    """Logits of n greedy decode steps (cache path) and of one prefill over the same sequence."""
    cache = model.new_cache(1, len(prompt) + n)
    logits = model.forward(torch.tensor([prompt]), cache, torch.zeros(1, dtype=torch.long),
                           torch.tensor([len(prompt)]), unpadded=True)
    seq, steps = list(prompt), []
    nxt = int(logits[0, -1].argmax())
    for _ in range(n):
        seq.append(nxt)
        step = model.forward(torch.tensor([[nxt]]), cache, torch.tensor([len(seq) - 1]), torch.tensor([1]),
                             unpadded=True)[0, -1]
        steps.append(step)
        nxt = int(step.argmax())
    full = model.forward(torch.tensor([seq]), model.new_cache(1, len(seq)), torch.zeros(1, dtype=torch.long),
                         torch.tensor([len(seq)]), unpadded=True)[0, len(prompt):]
    return torch.stack(steps), full


@pytest.mark.parametrize("name", list(M.BUILTIN))
def test_decode_steps_equal_a_full_prefill_fp32(name):
    """Incremental decode (MLA absorbed over the latent cache + indexer key cache; GQA KV cache)
    gives the logits a prefill of the whole sequence gives (expanded MLA), in fp32."""
    model = M.load(name, "cpu")
    got, want = _decode_vs_prefill(model, M.DEFAULT_PROMPT_IDS, 5)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("name", ["tiny-glm5", "tiny-deepseek-v32"])
def test_absorbed_mla_equals_expanded_mla(name):
    model = M.load(name, "cpu")
    ids = torch.tensor([M.DEFAULT_PROMPT_IDS])
    run = [model.forward(ids, model.new_cache(1, ids.shape[1]), torch.zeros(1, dtype=torch.long),
                         torch.tensor([ids.shape[1]]), unpadded=True, absorb=a) for a in (False, True)]
    assert (run[0] - run[1]).abs().max() <= 1e-5 * run[0].abs().max()


def test_padded_batch_passes_explicit_q_offset_unpadded_takes_the_default():
    """A backend whose causal mode fixes q_offset = k_lengths - S gets None exactly when that holds."""
    model = M.load("tiny-glm5", "cpu")
    rt, seen = model.rt, []

    class Recorder:
        def __getattr__(self, op):
            return getattr(rt, op)

        def lightning_indexer(self, *args, **kw):
            seen.append(kw["q_offset"])
            return rt.lightning_indexer(*args, **kw)

    model.rt = Recorder()
    M.generate(model, [list(range(3, 15))], max_new_tokens=2)
    assert len(seen) == 4 and all(q is None for q in seen)           # 2 full indexer layers x 2 forwards
    seen.clear()
    M.generate(model, [list(range(3, 15)), [4, 5, 6]], max_new_tokens=2)
    prefill, decode = seen[:2], seen[2:]
    assert all(q is not None and q.tolist() == [0, 0] for q in prefill) and decode == [None, None]


# ---- checkpoint problems name the tensor -----------------------------------------------------------

@pytest.fixture(scope="module")
def small_dsa(tmp_path_factory):
    cfg = transformers.DeepseekV32Config(**SHAPES, **MLA_SHAPES, q_lora_rank=24, index_topk=4, index_head_dim=16,
                                         index_n_heads=2, n_group=2, topk_group=1, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("dsa")
    torch.manual_seed(0)
    transformers.DeepseekV32ForCausalLM(cfg).save_pretrained(d)
    return d


def _rewrite(src, dst, edit):
    from safetensors.torch import load_file, save_file
    import shutil
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_extra_tensors_warn_but_mtp_layers_do_not(small_dsa, tmp_path):
    def add(t):
        t["model.layers.5.eh_proj.weight"] = torch.zeros(2, 2)          # an MTP layer (past num_hidden_layers)
    d = _rewrite(small_dsa, tmp_path / "mtp", add)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = M.load(d, "cpu")
    assert model.unused_tensors == ["model.layers.5.eh_proj.weight"]

    def add_odd(t):
        t["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    d = _rewrite(small_dsa, tmp_path / "odd", add_odd)
    with pytest.warns(RuntimeWarning, match=r"1 checkpoint tensors are not used.*layers\.1\.self_attn\.q_proj"):
        M.load(d, "cpu")


def test_fp8_weight_without_its_scale_is_named(small_dsa, tmp_path):
    import hal
    name = "model.layers.2.self_attn.o_proj.weight"

    def quantize_one(t):
        t[name] = hal.ops.fp8_quantize_weight(t[name].float())[0]
    d = _rewrite(small_dsa, tmp_path / "noscale", quantize_one)
    with pytest.raises(M.CheckpointError, match=f"missing tensor {name}_scale_inv"):
        M.load(d, "cpu")


def test_fp8_norm_or_router_is_dequantized_with_its_scale(small_dsa, tmp_path):
    """A float8 router weight (not a linear the model runs in FP8) is dequantized on load."""
    import hal
    name = "model.layers.3.mlp.gate.weight"
    ref = M.load(small_dsa, "cpu").layers[3].mlp.gate_weight

    def quantize_router(t):
        t[name], t[name + "_scale_inv"] = hal.ops.fp8_quantize_weight(t[name].float())
    got = M.load(_rewrite(small_dsa, tmp_path / "router", quantize_router), "cpu").layers[3].mlp.gate_weight
    assert got.dtype == torch.float32 and float((got - ref).abs().max()) <= float(ref.abs().max()) / 16


def test_unreadable_config_is_named(small_dsa, tmp_path):
    import shutil
    d = tmp_path / "bad"
    shutil.copytree(small_dsa, d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(M.ModelConfigError, match="config.json: not valid JSON"):
        M.load(d, "cpu")
    cfg = json.loads((small_dsa / "config.json").read_text())
    del cfg["kv_lora_rank"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(M.ModelConfigError, match="lacks the field 'kv_lora_rank'"):
        M.load(d, "cpu")
