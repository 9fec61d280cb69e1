"""The built-in models with their routed experts expert-parallel over gloo ranks (EP=2 and EP=4):
logits and greedy tokens equal the single-process run's; ``hal run --nproc-per-node`` gives the
single-process tokens; a world size that does not divide the experts is one clear error per rank."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import hal.models as M
from hal.spawn_ranks import run_ranks

MODELS = tuple(M.BUILTIN)                  # all five: tiny-glm5, -deepseek-v32, -glm45, -qwen35, -kimi-linear
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42]]


def _generate(model):
    res = M.generate(model, PROMPTS, max_new_tokens=4)
    return res.prefill_logits, res.tokens


def _rank(rank: int, world: int):
    """On 4 ranks: every model with EP over all 4, then over the pairs (0, 1) and (2, 3) (EP=2):
    (ep size, name) -> (prefill logits, tokens, experts per MoE layer)."""
    import torch.distributed as dist

    from hal import distributed
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]        # every rank creates both, in order
    out = {}
    for group in (distributed.ep_group(), distributed.ep_group(pairs[rank // 2])):
        for name in MODELS:
            model = M.load(name, "cpu", ep_group=group.name)
            experts = [layer.mlp.w_gate_up.shape[0] for layer in model.layers
                       if hasattr(getattr(layer, "mlp", None), "ep_group")]
            out[group.world_size, name] = (*_generate(model), experts)
    return out


def test_every_builtin_model_under_ep2_and_ep4_matches_the_single_process_run():
    got = run_ranks(_rank, 4, timeout_s=300)
    for name in MODELS:
        want_logits, want_tokens = _generate(M.load(name, "cpu"))
        scale = want_logits.abs().max()
        for ep_size in (2, 4):
            for rank in range(4):
                logits, tokens, experts = got[rank][ep_size, name]
                assert experts and set(experts) == {16 // ep_size}, (name, ep_size, experts)   # of 16 experts
                assert tokens == want_tokens, (name, ep_size, rank)
                assert (logits - want_logits).abs().max() <= 1e-4 * scale, (name, ep_size)


def _hal_run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "hal.cli", "run", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_hal_run_on_four_ranks_gives_the_single_process_tokens():
    ids = "1,2,3,4,5,6,7;30,31"
    one = _hal_run("-m", "tiny-glm5", "--prompt-ids", ids, "--max-new-tokens", "5", "--json")
    four = _hal_run("--nproc-per-node", "4", "-m", "tiny-glm5", "--prompt-ids", ids, "--max-new-tokens", "5", "--json")
    assert one.returncode == 0 and four.returncode == 0, four.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(four.stdout)          # only rank 0 printed: one JSON document
    assert b["world_size"] == 4 and a["world_size"] == 1
    assert a["tokens"] == b["tokens"]
    ops = {e["op"]: e for e in b["plan"]}
    assert ops["ep_dispatch"]["calls"] > 0 and ops["ep_combine"]["calls"] > 0 and ops["moe_forward"]["calls"] == 0


def test_a_world_size_that_does_not_divide_the_experts_is_an_error_on_every_rank():
    res = _hal_run("--nproc-per-node", "3", "-m", "tiny-glm45", "--max-new-tokens", "1", timeout=300)
    assert res.returncode != 0
    for rank in range(3):
        assert f"rank {rank}: expert parallelism: the model's 16 routed experts do not divide over 3 ranks" in res.stderr


def test_ep_group_must_exist():
    with pytest.raises(ValueError, match="no expert-parallel group named 'nope'"):
        M.load("tiny-glm45", "cpu", ep_group="nope")
    assert torch.is_tensor(M.load("tiny-glm45", "cpu", ep_group="local").layers[-1].mlp.w_gate_up)


def test_model_conformance_on_ranks_ep_x_tp():
    out = subprocess.run([sys.executable, "-m", "hal.cli", "conformance", "--model", "tiny-glm45", "-b", "cpu",
                          "--world-size", "2", "--tp", "2", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout)["models"][0]
    assert (m["world_size"], m["tp"], m["passed"]) == (2, 2, True) and m["top1_agreement"] == 1.0
    assert {e["op"]: e["calls"] for e in m["plan"]}["ep_dispatch"] > 0
    bad = subprocess.run([sys.executable, "-m", "hal.cli", "conformance", "--model", "tiny-glm45", "-b", "cpu",
                          "--tp", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--tp needs --model and --world-size" in bad.stderr
