"""Tensor parallelism of every built-in model over gloo ranks (MLA, GQA, and the linear-attention
models: Qwen3.5's Gated DeltaNet + gated attention, Kimi Linear's KDA + MLA): TP=2 on two ranks
and EP(4) x TP(2) on four give the single-process logits (within 1e-4 of their scale) and the same
greedy tokens; each rank holds only its heads, and its linear-attention caches only theirs; a
saved Qwen3.5 / Kimi Linear checkpoint loads sharded (each rank reads only its slices, and its
parameters are the full model's slices); sizes that do not divide are one clear error;
``hal run --nproc-per-node 2 --tp 2`` prints the single-process tokens."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hal
import hal.models as M
from hal.models.builtin import CONFIGS
from hal.models.parallel import Sharding, TPGroup
from hal.spawn_ranks import run_ranks
from test_sharded_loading import _Recording, save_checkpoint

MODELS = tuple(M.BUILTIN)                  # all five: tiny-glm5, -deepseek-v32, -glm45, -qwen35, -kimi-linear
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42]]
HEAD_FIELDS = ("n_heads", "n_kv", "n_k", "n_v")      # MLA / GQA query and KV heads, Gated DeltaNet key / value heads


def _generate(model):
    """Prefill logits, greedy tokens, every layer's head counts and the linear-attention states'
    shapes ((layer, "conv" | "recurrent") -> shape) of a 4-token generation."""
    caches = []
    new_cache = model.new_cache
    model.new_cache = lambda *a: caches.append(new_cache(*a)) or caches[-1]
    res = M.generate(model, PROMPTS, max_new_tokens=4)
    heads = [tuple(getattr(layer.attn, f) for f in HEAD_FIELDS if hasattr(layer.attn, f)) for layer in model.layers]
    states = {k: tuple(v.shape) for k, v in caches[0].store.items() if k[1] in ("conv", "recurrent")}
    return res.prefill_logits, res.tokens, heads, states


def _errors(call):
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return None


def _rank(rank: int, world: int, tp_size: int, with_ep: bool):
    from hal import distributed
    from hal.models.parallel import tp_group
    tp = tp_group(tp_size)
    ep = distributed.ep_group().name if with_ep else None
    out = {"tp": (tp.rank, tp.size)}
    for name in MODELS:
        model = M.load(name, "cpu", tp_group=tp.name, ep_group=ep)
        experts = model.layers[-1].mlp.w_gate_up.shape[0]
        out[name] = (*_generate(model), experts)
    if world == 4:          # bad sizes: tiny-glm45 / tiny-qwen35 have 2 KV / key heads; 3 does not divide 4 ranks
        tp4 = tp_group(4).name
        out["kv4"] = _errors(lambda: M.load("tiny-glm45", "cpu", tp_group=tp4))
        out["linear4"] = _errors(lambda: M.load("tiny-qwen35", "cpu", tp_group=tp4))
        out["tp3"] = _errors(lambda: tp_group(3))
    return out


@functools.lru_cache(maxsize=None)
def _single_process(name: str):
    return _generate(M.load(name, "cpu"))


def _local_states(states: dict, tp_size: int) -> dict:
    """The single-process linear-attention state shapes with only a TP rank's heads: the conv
    window [B, K-1, channels / T], the recurrent state [B, Hv / T, Dk, Dv]."""
    return {k: (*s[:-1], s[-1] // tp_size) if k[1] == "conv" else (s[0], s[1] // tp_size, *s[2:])
            for k, s in states.items()}


def _check(got, world: int, tp_size: int, experts: int):
    for name in MODELS:
        want_logits, want_tokens, want_heads, want_states = _single_process(name)
        scale = want_logits.abs().max()
        assert bool(want_states) == (name in ("tiny-qwen35", "tiny-kimi-linear")), name
        for rank in range(world):
            logits, tokens, heads, states, n_experts = got[rank][name]
            assert got[rank]["tp"] == (rank % tp_size, tp_size)
            assert heads == [tuple(h // tp_size for h in layer) for layer in want_heads], (name, heads)
            assert states == _local_states(want_states, tp_size), (name, states)
            assert n_experts == experts, (name, n_experts)
            assert tokens == want_tokens, (name, rank)
            assert (logits - want_logits).abs().max() <= 1e-4 * scale, name


def test_tp2_on_two_ranks_matches_the_single_process_run():
    got = run_ranks(_rank, 2, 2, False, timeout_s=300)
    _check(got, 2, 2, 16)                                          # no EP: every rank keeps all 16 experts


def test_ep4_by_tp2_on_four_ranks_matches_and_bad_sizes_are_clear_errors():
    got = run_ranks(_rank, 4, 2, True, timeout_s=300)
    _check(got, 4, 2, 4)                                           # 16 experts over 4 ranks
    for rank in range(4):
        assert got[rank]["kv4"] == ("tensor parallelism: the model's 2 KV heads (num_key_value_heads) do not divide "
                                    "over a TP group of 4 ranks (choose a TP size that divides 2)")
        assert got[rank]["linear4"] == ("tensor parallelism: the model's 2 linear-attention key heads "
                                        "(linear_num_key_heads) do not divide over a TP group of 4 ranks "
                                        "(choose a TP size that divides 2)")
        assert got[rank]["tp3"] == ("tensor parallelism: the TP size 3 does not divide the world size 4 "
                                    "(TP groups are consecutive ranks)")


@pytest.mark.parametrize("name, tp_size, message", [
    ("tiny-qwen35", 3, "the model's 2 linear-attention key heads (linear_num_key_heads) do not divide over a TP "
                       "group of 3 ranks (choose a TP size that divides 2)"),
    ("tiny-kimi-linear", 3, "the model's 4 KDA heads (linear_attn_config num_heads) do not divide over a TP group "
                            "of 3 ranks (choose a TP size that divides 4)")])
def test_linear_attention_heads_that_do_not_divide_are_one_clear_error(name, tp_size, message):
    """Checked before any tensor is read (so a group with no process group behind it is enough)."""
    from hal.models.config import ModelConfig
    from hal.models.loader import TensorSource, build_model
    with pytest.raises(ValueError) as err:
        build_model(ModelConfig.from_dict(CONFIGS[name]), TensorSource.from_dict({}), hal.runtime("cpu"),
                    sharding=Sharding(TPGroup("fake", 0, tp_size, None)))
    assert str(err.value) == f"tensor parallelism: {message}"


@pytest.mark.parametrize("n, tp_size, what", [(8, 3, "attention heads"), (512, 5, "intermediate_size")])
def test_a_split_that_does_not_divide_names_both_numbers(n, tp_size, what):
    sharding = Sharding(TPGroup("fake", 0, tp_size, None))
    with pytest.raises(ValueError, match=f"the model's {n} {what} do not divide over a TP group of {tp_size} ranks"):
        sharding.part(n, what)


# ---- sharded loading of the linear-attention families: a saved checkpoint folder under EP 2 x TP 2 ----

REPLICATED = ("norm", "embed_tokens", "lm_head", ".gate.weight", "e_score_correction_bias", "f_a_proj", "g_a_proj",
              "kv_a_proj", "shared_expert_gate", ".experts.")     # read whole (own experts: whole, by EP)


def _kimi_module_names(folder: Path) -> None:
    """Rewrite a saved Kimi Linear folder in transformers' module names for its KDA layers: one
    fused ``conv1d`` [3HD, 1, K] (q, k, v) and ``forget_gate.{f_a_proj, f_b_proj, dt_bias, A_log}``."""
    from safetensors.torch import load_file, save_file
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        t = load_file(str(folder / shard))
        for name in [n for n in t if n.endswith("q_conv1d.weight")]:
            a = name[:-len(".q_conv1d.weight")]
            t[f"{a}.conv1d.weight"] = torch.cat([t.pop(f"{a}.{n}_conv1d.weight") for n in "qkv"])
            for n in ("f_a_proj.weight", "f_b_proj.weight", "dt_bias", "A_log"):
                t[f"{a}.forget_gate.{n}"] = t.pop(f"{a}.{n}")
        save_file(t, str(folder / shard))
        index["weight_map"] = {**{n: v for n, v in index["weight_map"].items() if v != shard}, **{n: shard for n in t}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _rows(*blocks):
    return 0, blocks


def _cols(*blocks):
    return 1, blocks


def _split(cfg: dict) -> dict:
    """Model path ("<layer>.<attributes>") -> (dim, blocks) for a linear-attention layer, a full
    attention layer and an MLP of a tiny Qwen3.5 / Kimi Linear: under TP a rank keeps, of each
    consecutive block of rows (dim 0) or columns (dim 1) of these sizes, its own 1/T; None: whole."""
    from hal.models.config import ModelConfig
    c = ModelConfig.from_dict(cfg)
    lin, full = c.layer_types.index("linear_attention"), c.layer_types.index("full_attention")
    if c.is_qwen35:
        nv = c.linear_num_value_heads
        kd, vd = c.linear_num_key_heads * c.linear_key_head_dim, nv * c.linear_value_head_dim
        Hq, Hkv, D, Is = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.shared_expert_intermediate_size
        mixer = {"in_qkv.weight": _rows(kd, kd, vd), "conv_weight": _rows(kd, kd, vd), "in_z.weight": _rows(vd),
                 "in_b.weight": _rows(nv), "in_a.weight": _rows(nv), "dt_bias": _rows(nv), "a_log": _rows(nv),
                 "out.weight": _cols(vd), "norm_weight": None}
        attn = {"q.weight": _rows(2 * Hq * D), "k.weight": _rows(Hkv * D), "v.weight": _rows(Hkv * D),
                "o.weight": _cols(Hq * D), "q_norm": None}
        mlp = {f"{full}.mlp.shared.up.weight": _rows(Is), f"{full}.mlp.shared.down.weight": _cols(Is),
               f"{full}.mlp.gate_weight": None}
    else:
        H, HD, Ha = c.linear_num_key_heads, c.linear_num_key_heads * c.linear_key_head_dim, c.num_attention_heads
        qk, kvd, inter = c.qk_nope_head_dim + c.qk_rope_head_dim, c.qk_nope_head_dim + c.v_head_dim, c.intermediate_size
        mixer = {"q.weight": _rows(HD), "k.weight": _rows(HD), "v.weight": _rows(HD), "conv_weight": _rows(HD, HD, HD),
                 "f_a.weight": None, "f_b.weight": _rows(HD), "dt_bias": _rows(HD), "a_log": _rows(H),
                 "b.weight": _rows(H), "g_a.weight": None, "g_b.weight": _rows(HD), "o_norm": None,
                 "o.weight": _cols(HD)}
        attn = {"q.weight": _rows(Ha * qk), "kv_b.weight": _rows(Ha * kvd), "o.weight": _cols(Ha * c.v_head_dim),
                "w_uk": _rows(Ha), "kv_a.weight": None}
        dense = c.mlp_layer_types.index("dense")
        mlp = {f"{dense}.mlp.gate.weight": _rows(inter), f"{dense}.mlp.down.weight": _cols(inter),
               f"{full}.mlp.shared.up.weight": _rows(c.moe_intermediate_size)}
    return {**{f"{lin}.attn.{k}": v for k, v in mixer.items()}, **{f"{full}.attn.{k}": v for k, v in attn.items()},
            **mlp}


def _param(model, path: str) -> torch.Tensor:
    layer, *attrs = path.split(".")
    obj = model.layers[int(layer)]
    for a in attrs:
        obj = getattr(obj, a)
    return obj


def _tp_slice(full: torch.Tensor, split, rank: int, T: int = 2) -> torch.Tensor:
    """What TP rank ``rank`` of T keeps of ``full`` under ``split`` (see :func:`_split`)."""
    if split is None:
        return full
    dim, blocks = split
    parts, start = [], 0
    for n in blocks:
        parts.append(full.narrow(dim, start + rank * n // T, n // T))
        start += n
    return torch.cat(parts, dim)


def _load_folders(rank: int, world: int, folders: dict):
    """Rank ``rank`` of EP 2 x TP 2 loads each folder, recording every read; returns per folder the
    prefill logits, tokens, reads, unused tensors, the in_qkv / q type and its parameters of :func:`_split`."""
    import safetensors

    from hal import distributed
    from hal.models.parallel import tp_group
    opened = safetensors.safe_open
    log: list = []
    safetensors.safe_open = lambda path, framework: _Recording(opened(path, framework=framework), log)
    tp, ep = tp_group(2), distributed.ep_group()
    out = {}
    for folder, (cfg, fp8) in folders.items():
        del log[:]
        model = M.load(folder, "cpu", tp_group=tp.name, ep_group=ep.name)
        res = M.generate(model, PROMPTS, max_new_tokens=3)
        attn = model.layers[0].attn
        fused = type(attn.in_qkv if hasattr(attn, "in_qkv") else attn.q).__name__
        params = {} if fp8 else {p: _param(model, p).clone() for p in _split(cfg)}
        out[folder] = (res.prefill_logits, res.tokens, list(log), model.unused_tensors, fused, params)
    return out


def _check_linear_reads(reads: list, rank: int, cfg: dict):
    """Replicated tensors read whole, every other one as slices; the fused q / k / v projection,
    its conv and A_log exactly at this rank's heads."""
    by_name: dict = {}
    for name, index in reads:
        by_name.setdefault(name, []).append(None if index is None else [(s.start, s.stop) for s in index])
        assert (index is None) == any(p in name for p in REPLICATED), (name, index)
    r = rank
    if cfg["model_type"].startswith("qwen3_5"):                           # Qwen3.5: Hk 2 x 64, Hv 4 x 64
        a = "model.layers.0.linear_attn"
        qkv = [[(64 * r, 64 * r + 64)], [(128 + 64 * r, 192 + 64 * r)], [(256 + 128 * r, 384 + 128 * r)]]
        assert by_name[f"{a}.in_proj_qkv.weight"] == qkv and by_name[f"{a}.conv1d.weight"] == qkv
        assert by_name[f"{a}.A_log"] == by_name[f"{a}.in_proj_b.weight"] == [[(2 * r, 2 * r + 2)]]
        assert by_name[f"{a}.out_proj.weight"] == [[(None, None), (128 * r, 128 * r + 128)]]
        return
    a, mine = "model.layers.0.self_attn", (128 * r, 128 * r + 128)      # Kimi Linear: H D = 4 x 64
    if f"{a}.conv1d.weight" in by_name:                                    # transformers' module names
        assert by_name[f"{a}.conv1d.weight"] == [[(j * 256 + mine[0], j * 256 + mine[1])] for j in range(3)]
        a += ".forget_gate"
    else:
        assert all(by_name[f"{a}.{q}_conv1d.weight"] == [[mine]] for q in "qkv")
    assert by_name[f"{a}.A_log"] == [[(None, None), (None, None), (2 * r, 2 * r + 2)]]


def test_linear_attention_checkpoints_load_sharded_and_match(tmp_path):
    """Qwen3.5 (fp32; FP8 with its 64-row q / k parts inside 128-row scale blocks) and Kimi Linear
    (released names; transformers' fused conv1d) saved to folders and loaded on EP 2 x TP 2: each
    rank reads only its slices, holds exactly the full model's slices, and gives its logits."""
    qwen, kimi = dict(CONFIGS["tiny-qwen35"]), dict(CONFIGS["tiny-kimi-linear"])
    folders = {str(tmp_path / "qwen35-fp32"): (qwen, False), str(tmp_path / "qwen35-fp8"): (qwen, True),
               str(tmp_path / "kimi-released"): (kimi, False), str(tmp_path / "kimi-modules"): (kimi, False)}
    for folder, (cfg, fp8) in folders.items():
        save_checkpoint(cfg, Path(folder), fp8=fp8)
    _kimi_module_names(tmp_path / "kimi-modules")
    got = run_ranks(_load_folders, 2, folders, timeout_s=300)
    for folder, (cfg, fp8) in folders.items():
        full = M.load(folder, "cpu")
        want = M.generate(full, PROMPTS, max_new_tokens=3)
        scale = want.prefill_logits.abs().max()
        for rank in range(2):
            logits, tokens, reads, unused, fused, params = got[rank][folder]
            assert tokens == want.tokens, (folder, rank)
            assert (logits - want.prefill_logits).abs().max() <= 1e-4 * scale, folder
            assert unused == []
            _check_linear_reads(reads, rank, cfg)
            if fp8:                # the rank's q, k, v rows are three FP8 slices with their own scale blocks
                assert fused == "FusedColumns", folder
                continue
            for path, split in _split(cfg).items():
                assert torch.equal(params[path], _tp_slice(_param(full, path), split, rank)), (folder, path)


def test_tp_group_must_exist():
    with pytest.raises(ValueError, match="no tensor-parallel group named 'nope'"):
        M.load("tiny-glm45", "cpu", tp_group="nope")


def _hal_run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hal.cli", "run", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_hal_run_tp2_on_two_ranks_gives_the_single_process_tokens():
    two = _hal_run("--nproc-per-node", "2", "--tp", "2", "-m", "tiny-glm45", "--prompt-ids", "1,2,3,4,5,6,7;30,31",
                   "--max-new-tokens", "5", "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    b = json.loads(two.stdout)                                       # only rank 0 printed: one JSON document
    want = M.generate(M.load("tiny-glm45", "cpu"), [[1, 2, 3, 4, 5, 6, 7], [30, 31]], max_new_tokens=5)
    assert (b["world_size"], b["tp_size"]) == (2, 2)
    assert b["tokens"] == want.tokens


def test_hal_run_tp_must_divide_the_ranks():
    from click.testing import CliRunner

    from hal.cli import cli
    res = CliRunner().invoke(cli, ["run", "--tp", "2", "-m", "tiny-glm45", "--max-new-tokens", "1"])
    assert res.exit_code == 2 and "--tp 2 must divide the number of ranks (1" in res.output
