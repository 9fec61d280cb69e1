"""The expert-parallel ops over real gloo process groups of 2 and 4 local ranks, against an
independent single-process expectation built from every rank's inputs: received rows compared
in the contract's order (local expert, source rank, token, slot), combine inputs built from the
source index, uneven tokens per rank, a rank with no tokens, experts with no rows, -1 slots,
an explicit expert map and an FP8 payload travelling bit-exact."""
from __future__ import annotations

import pytest
import torch

import hal
from hal.spawn_ranks import RanksFailed, run_ranks

E = 8
H = 256


def _inputs(rank: int, world: int, fp8: bool):
    """Rank ``rank``'s tokens: T differs per rank, rank 1 has none; expert 5 never chosen."""
    T = (0 if rank == 1 else 3 + 2 * rank)
    g = torch.Generator().manual_seed(100 + rank)
    k = 3
    choices = torch.tensor([0, 1, 2, 3, 4, 6, 7])
    ids = torch.stack([choices[torch.randperm(len(choices), generator=g)[:k]] for _ in range(T)]) \
        if T else torch.empty(0, k, dtype=torch.int64)
    ids = ids.to(torch.int32)
    if T:
        ids[0, 2] = -1                                    # a slot that sends nothing
    x = torch.randn(T, H, generator=g)
    weights = torch.rand(T, k, generator=g)
    if fp8:
        scale = torch.rand(T, H // 128, generator=g) + 0.5
        return x.clamp(-400, 400).to(torch.float8_e4m3fn), scale, ids, weights
    return x.to(torch.bfloat16), None, ids, weights


def _expert_map(world: int, permuted: bool):
    if not permuted:
        return None
    owner = torch.arange(E) % world                       # round robin instead of contiguous blocks
    return owner.to(torch.int32)


def _owner(world: int, permuted: bool):
    emap = _expert_map(world, permuted)
    return emap.long() if emap is not None else torch.arange(E) // (E // world)


def _expert_fn(rows: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """What the 'experts' compute in the test: a function of the row and its source index only."""
    s, t, j = (source[:, i, None].float() for i in range(3))
    return rows.float() * (1 + s + 0.5 * j) + t


def _rank_body(rank: int, world: int, fp8: bool, permuted: bool):
    from hal import distributed
    group = distributed.ep_group()            # made once per process group, then reused
    rt = hal.runtime("cpu")
    x, scale, ids, weights = _inputs(rank, world, fp8)
    recv_x, recv_scale, counts, source = rt.ep_dispatch(x, ids, num_experts=E, group=group.name, x_scale=scale,
                                                        expert_map=_expert_map(world, permuted))
    rows = recv_x.float() * recv_scale.repeat_interleave(128, 1) if fp8 else recv_x
    out = rt.ep_combine(_expert_fn(rows, source), source, weights, group=group.name)
    return {"recv_x": recv_x.view(torch.uint8) if fp8 else recv_x, "recv_scale": recv_scale, "counts": counts,
            "source": source, "out": out}


def _expected(world: int, fp8: bool, permuted: bool):
    """Per rank: the rows it must receive, built by walking every rank's (token, slot) pairs."""
    owner = _owner(world, permuted)
    inputs = [_inputs(r, world, fp8) for r in range(world)]
    want = []
    for r in range(world):
        local = [e for e in range(E) if owner[e] == r]
        src, rows, scales, counts = [], [], [], []
        for e in local:
            n = 0
            for s, (x, scale, ids, _) in enumerate(inputs):
                for t in range(ids.shape[0]):
                    for j in range(ids.shape[1]):
                        if ids[t, j] == e:
                            src.append((s, t, j))
                            rows.append(x[t])
                            scales.append(scale[t] if scale is not None else torch.empty(0))
                            n += 1
            counts.append(n)
        want.append({"source": torch.tensor(src, dtype=torch.int32).reshape(-1, 3),
                     "recv_x": torch.stack(rows) if rows else torch.empty(0, H, dtype=inputs[0][0].dtype),
                     "recv_scale": torch.stack(scales) if scales else None,
                     "counts": torch.tensor(counts, dtype=torch.int32)})
    outs = []
    for s, (x, scale, ids, weights) in enumerate(inputs):
        xf = x.float() * scale.repeat_interleave(128, 1) if fp8 else x.float()
        out = torch.zeros(ids.shape[0], H)
        for j in range(ids.shape[1]):
            row = xf * (1 + s + 0.5 * j) + torch.arange(ids.shape[0])[:, None].float()
            out = out + torch.where(ids[:, j, None] >= 0, weights[:, j, None] * row, 0.0)
        outs.append(out.to(torch.float32))
    return want, outs


SCENARIOS = [(False, False), (False, True), (True, False)]          # (fp8 payload, round-robin expert map)


def _all_on_rank(rank: int, world: int):
    """Every scenario of this file on one rank, so each world size costs one start of its ranks."""
    return {"dispatch": {sc: _rank_body(rank, world, *sc) for sc in SCENARIOS},
            "moe": {fp8: _ep_moe_rank(rank, world, fp8) for fp8 in (False, True)}}


@pytest.fixture(scope="module")
def ranks():
    return {world: run_ranks(_all_on_rank, world, timeout_s=120) for world in (2, 4)}


def _killed_rank(rank: int, world: int):
    import os
    import signal
    from hal import distributed
    group = distributed.ep_group()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)                # dies without a word, mid-run
    x = torch.randn(2, 8)
    hal.runtime("cpu").ep_dispatch(x, torch.tensor([[0], [1]], dtype=torch.int32), num_experts=2, group=group.name)


def test_a_killed_rank_makes_the_others_fail_within_the_timeout():
    import time
    t0 = time.monotonic()
    with pytest.raises(RanksFailed) as info:
        run_ranks(_killed_rank, 2, timeout_s=10)
    assert "without a result" in info.value.failures[1]          # SIGKILL: exit code -9, nothing written
    assert 0 in info.value.failures                                # the survivor's collective gave up
    assert time.monotonic() - t0 < 70


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("fp8,permuted", SCENARIOS)
def test_dispatch_and_combine_over_gloo_match_the_single_process_expectation(ranks, world, fp8, permuted):
    got = [r["dispatch"][(fp8, permuted)] for r in ranks[world]]
    want, outs = _expected(world, fp8, permuted)
    for r in range(world):
        assert torch.equal(got[r]["source"], want[r]["source"]), r
        assert torch.equal(got[r]["counts"], want[r]["counts"]), r
        wx = want[r]["recv_x"]
        assert torch.equal(got[r]["recv_x"], wx.view(torch.uint8) if fp8 else wx), r      # bit-exact rows
        if fp8:
            assert torch.equal(got[r]["recv_scale"], want[r]["recv_scale"].reshape(-1, H // 128)), r
        else:
            assert got[r]["recv_scale"].shape == (wx.shape[0], 0)
        torch.testing.assert_close(got[r]["out"], outs[r], rtol=1e-6, atol=1e-6)
    assert got[1]["out"].shape == (0, H)                          # the rank without tokens
    owner = _owner(world, permuted)
    empty_rank, empty_local = int(owner[5]), int((owner[:5] == owner[5]).sum())
    assert got[empty_rank]["counts"][empty_local] == 0            # expert 5: never chosen, zero rows


def test_one_process_group_equals_moe_dispatch_order():
    """With the one-process group, ep_dispatch's rows are moe_dispatch's rows (align 1): the same
    expert-major order, so a rank can hand them to moe_experts unchanged."""
    rt = hal.runtime("cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 32, generator=g)
    ids = torch.randint(0, 6, (7, 2), generator=g).to(torch.int32)
    recv_x, _, counts, source = rt.ep_dispatch(x, ids, num_experts=6)
    plan = rt.moe_dispatch(x, ids, 6)
    assert torch.equal(recv_x, plan.hidden) and torch.equal(counts, plan.tokens_per_expert)
    assert torch.equal(source[:, 1].long() * 2 + source[:, 2].long(), plan.source)


def _bad_rank(rank: int, world: int):
    from hal import distributed
    group = distributed.ep_group()
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    x = torch.randn(2, 8)
    hal.runtime("cpu").ep_dispatch(x, torch.zeros(2, 1, dtype=torch.int32), num_experts=2, group=group.name)


def test_a_failing_rank_fails_the_run_within_the_timeout_naming_the_rank():
    import time
    t0 = time.monotonic()
    with pytest.raises(RanksFailed) as info:
        run_ranks(_bad_rank, 2, timeout_s=10)
    assert "planted failure on rank 1" in info.value.failures[1]
    assert 0 in info.value.failures                               # its peer gave up instead of hanging
    assert time.monotonic() - t0 < 70


# --- the EP form of moe_forward against the single-process moe_forward ----------------------------

MOE_E, MOE_H, MOE_I, MOE_K = 8, 128, 32, 2


def _moe_weights():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(MOE_E, 2 * MOE_I, MOE_H, generator=g) * 0.1, torch.randn(MOE_E, MOE_H, MOE_I, generator=g) * 0.1,
            torch.rand(MOE_E, generator=g))


def _moe_tokens(rank: int):
    g = torch.Generator().manual_seed(50 + rank)
    T = 0 if rank == 1 else 4 + 3 * rank
    return torch.randn(T, MOE_H, generator=g), torch.randn(T, MOE_E, generator=g)


ROUTING = dict(top_k=MOE_K, scoring="sigmoid", n_group=2, topk_group=1, renormalize=True, scaling_factor=2.5)


def _ep_moe_rank(rank: int, world: int, fp8_dispatch: bool):
    from hal import distributed
    from hal.ep_moe import ep_moe_forward
    group = distributed.ep_group()
    w_gu, w_d, bias = _moe_weights()
    mine = slice(rank * MOE_E // world, (rank + 1) * MOE_E // world)
    hidden, logits = _moe_tokens(rank)
    return ep_moe_forward(hal.runtime("cpu"), hidden, logits, w_gu[mine], w_d[mine], num_experts=MOE_E,
                          group=group.name, correction_bias=bias, fp8_dispatch=fp8_dispatch, **ROUTING)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("fp8_dispatch", [False, True])
def test_ep_moe_forward_equals_the_single_process_moe_forward(ranks, world, fp8_dispatch):
    got = [r["moe"][fp8_dispatch] for r in ranks[world]]
    w_gu, w_d, bias = _moe_weights()
    for rank in range(world):
        hidden, logits = _moe_tokens(rank)
        if fp8_dispatch:          # the EP form sends e4m3 rows: the single-process run sees the same rounding
            q, s = hal.ops.fp8_quantize(hidden)
            from hal.blockscale import dequantize
            hidden = dequantize(q, s, 1, 128)
        want = hal.ops.moe_forward(hidden, logits, w_gu, w_d, correction_bias=bias, **ROUTING)
        torch.testing.assert_close(got[rank], want, rtol=1e-5, atol=1e-6)
    assert got[1].shape == (0, MOE_H)


# --- conformance at world sizes above one -----------------------------------------------------------

def _faulty_ep_backend(kind: str):
    from hal.backend import Backend, OpCapability
    from hal.backends.cpu import KERNELS
    from hal.registry import get_registry
    dispatch, combine = KERNELS["ep_dispatch"], KERNELS["ep_combine"]
    if kind == "unweighted_combine":
        def combine(expert_out, recv_source, topk_weights, *, group="local"):       # noqa: F811 - the planted fault
            return KERNELS["ep_combine"](expert_out, recv_source, torch.ones_like(topk_weights), group=group)
    else:   # "source_without_slot": every row claims to be its token's slot 0
        def dispatch(*args, **kwargs):                                              # noqa: F811 - the planted fault
            x, s, c, src = KERNELS["ep_dispatch"](*args, **kwargs)
            return x, s, c, src * torch.tensor([1, 1, 0], dtype=src.dtype)
    name = f"faulty-{kind}"
    if name not in [r.name for r in get_registry().records()]:
        get_registry().register_backend(Backend(name, kernels={"ep_dispatch": dispatch, "ep_combine": combine},
                                                capabilities={"ep_dispatch": OpCapability(), "ep_combine": OpCapability()}))


def _unweighted_combine():
    _faulty_ep_backend("unweighted_combine")


def _source_without_slot():
    _faulty_ep_backend("source_without_slot")


def test_world_conformance_passes_the_reference_and_fails_planted_faults():
    from hal.conformance.world import certify_world
    from hal.registry import get_registry
    run = certify_world("cpu", 2)
    assert {r.status for r in run.results} == {"PASS"} and len(run.results) == 6
    try:
        _unweighted_combine()                               # this process reports on it; the ranks run it
        bad = certify_world("faulty-unweighted_combine", 2, rank_setup=_unweighted_combine)
        by_op = {(r.op, r.status) for r in bad.results}
        assert ("ep_combine", "FAIL") in by_op and ("ep_dispatch", "PASS") in by_op
        _source_without_slot()
        bad = certify_world("faulty-source_without_slot", 2, rank_setup=_source_without_slot)
        assert {r.status for r in bad.results if r.op == "ep_dispatch"} == {"FAIL"}
        assert any("recv_source" in r.reason for r in bad.results if r.op == "ep_dispatch")
    finally:
        for name in ("faulty-unweighted_combine", "faulty-source_without_slot"):
            if name in [r.name for r in get_registry().records()]:
                get_registry().unregister(name)


def test_cli_world_size_option():
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "hal.cli", "conformance", "-b", "cpu", "--ops", "ep_combine",
                          "--world-size", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout)["backends"][0]["results"]
    world = [r for r in results if r["case"].startswith("world2/")]
    assert len(world) == 3 and {r["op"] for r in results} == {"ep_combine"}
    assert {r["status"] for r in world} == {"PASS"} and len(results) > len(world)      # + the one-process cases
    bad = subprocess.run([sys.executable, "-m", "hal.cli", "conformance", "-b", "cpu", "--world-size", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--world-size" in bad.stderr


def test_traffic_arithmetic_by_hand():
    from hal.ep_traffic import bytes_per_token, decode_floor_s, rows_sent
    assert rows_sent(8, 8, "expanded") == 7.0                        # 8 slots, 1/8 of them stay home
    assert rows_sent(2, 2, "per_rank") == 0.75                       # the other rank holds >= 1 of 2: 1 - 1/4
    assert bytes_per_token(7168, 8, 8, "expanded", "fp8") == 7 * 7168 * (1 + 4 / 128 + 2)
    # EP=8 in one node: 128 tokens x 58 layers x 152,096 B over 450 GB/s
    want = 128 * 58 * 7 * 7168 * (1 + 4 / 128 + 2) / 450e9
    got = decode_floor_s(7168, 8, 58, 128, 8, "expanded", "fp8", gpus_per_node=8, intra_gbps=450, inter_gbps=50)
    assert abs(got - want) < 1e-12
    with pytest.raises(ValueError, match="layout"):
        rows_sent(8, 8, "ring")
