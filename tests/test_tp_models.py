"""Tensor parallelism of the built-in MLA / GQA models over gloo ranks: TP=2 on two ranks and
EP(4) x TP(2) on four give the single-process logits (within 1e-4 of their scale) and the same
greedy tokens; each rank holds only its heads; sizes that do not divide are one clear error;
``hal run --nproc-per-node 2 --tp 2`` prints the single-process tokens."""
from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

import hal.models as M
from hal.models.parallel import Sharding, TPGroup
from hal.spawn_ranks import run_ranks

MODELS = ("tiny-glm5", "tiny-deepseek-v32", "tiny-glm45")
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42]]
HEADS = {"tiny-glm5": 4, "tiny-deepseek-v32": 4, "tiny-glm45": 8}


def _generate(model):
    res = M.generate(model, PROMPTS, max_new_tokens=4)
    return res.prefill_logits, res.tokens


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
        attn = model.layers[0].attn
        experts = model.layers[-1].mlp.w_gate_up.shape[0]
        logits, tokens = _generate(model)
        out[name] = (logits, tokens, attn.n_heads, experts)
    if world == 4:          # bad sizes: tiny-glm45 has 2 KV heads; a TP size of 3 does not divide 4 ranks
        out["kv4"] = _errors(lambda: M.load("tiny-glm45", "cpu", tp_group=tp_group(4).name))
        out["tp3"] = _errors(lambda: tp_group(3))
        out["qwen"] = _errors(lambda: M.load("tiny-qwen35", "cpu", tp_group=tp.name))
    return out


@functools.lru_cache(maxsize=None)
def _single_process(name: str):
    return _generate(M.load(name, "cpu"))


def _check(got, world: int, tp_size: int, experts: int):
    for name in MODELS:
        want_logits, want_tokens = _single_process(name)
        scale = want_logits.abs().max()
        for rank in range(world):
            logits, tokens, heads, n_experts = got[rank][name]
            assert got[rank]["tp"] == (rank % tp_size, tp_size)
            assert heads == HEADS[name] // tp_size, (name, heads)
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
        assert got[rank]["tp3"] == ("tensor parallelism: the TP size 3 does not divide the world size 4 "
                                    "(TP groups are consecutive ranks)")
        assert "Qwen3.5) runs with a TP size of 1 only, got 2" in got[rank]["qwen"]


@pytest.mark.parametrize("n, tp_size, what", [(8, 3, "attention heads"), (512, 5, "intermediate_size")])
def test_a_split_that_does_not_divide_names_both_numbers(n, tp_size, what):
    sharding = Sharding(TPGroup("fake", 0, tp_size, None))
    with pytest.raises(ValueError, match=f"the model's {n} {what} do not divide over a TP group of {tp_size} ranks"):
        sharding.part(n, what)


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
