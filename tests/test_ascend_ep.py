"""hal-ascend's expert-parallel ops on the MC2 pair (npu_moe_distribute_dispatch_v2 / combine_v2),
run through the emulator (bound to the torch-npu wheel's schemas) over real gloo groups of 2 and
4 ranks, against the CPU reference: uneven tokens, a rank with none, an expert nobody picks, -1
slots, an expert map, an FP8 payload, the bf16 combine through MC2 and a planted fault in it;
the schema binding; every decline reason; and the world conformance (and a planted fault there)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("hal_ascend", reason="hal-ascend is installed by ci/test.sh")

from hal_ascend import ep_mc2, npu, schema  # noqa: E402

from hal.spawn_ranks import run_ranks  # noqa: E402
from ep_tokens import rank_tokens  # noqa: E402

PKG = schema.torch_npu_dir()
pytestmark = pytest.mark.skipif(PKG is None, reason="the torch-npu wheel (its schema yaml) is not installed; "
                                "ci/test.sh installs it to .hal-test-deps/torch-npu")
E = 8
_RESULTS: dict = {}


def _tokens(rank: int, world: int, dtype, H: int, seed: int):
    """Rank ``rank``'s tokens, top-3 (:func:`ep_tokens.rank_tokens`)."""
    return rank_tokens(torch.Generator().manual_seed(seed * 100 + rank), rank, dtype, H, 3)


def _rank(rank: int, world: int, plant: str = ""):
    """Every scenario on one rank, on both the ascend (emulated MC2) and the cpu runtime."""
    import hal
    from hal import distributed
    from hal.errors import UnsupportedCase
    group = distributed.ep_group().name
    asc, cpu = hal.runtime("ascend"), hal.runtime("cpu")
    out = {}
    for name, dtype, H, permuted in (("bf16", torch.bfloat16, 64, False), ("fp16_map", torch.float16, 40, True),
                                     ("fp8", torch.float8_e4m3fn, 200, False), ("fp32", torch.float32, 24, True)):
        x, scale, ids, w = _tokens(rank, world, dtype, H, len(out))
        emap = (torch.arange(E) % world).flip(0).to(torch.int32) if permuted else None
        got = asc.ep_dispatch(x, ids, num_experts=E, group=group, x_scale=scale, expert_map=emap)
        want = cpu.ep_dispatch(x, ids, num_experts=E, group=group, x_scale=scale, expert_map=emap)
        # expert outputs in the payload's 16-bit dtype (fp32 for fp8/fp32) exercise MC2's combine
        y_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        src = want[3].float()
        y = (want[0].float() * (1 + src[:, :1] + 0.5 * src[:, 2:]) + src[:, 1:2]).to(y_dtype)
        out[name] = {"got": [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in got],
                     "want": [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in want],
                     "combined": asc.ep_combine(y, got[3], w, group=group),
                     "combined_shuffled": asc.ep_combine(y.flip(0), got[3].flip(0), w, group=group),
                     "reference": cpu.ep_combine(y, want[3], w, group=group)}
    # two dispatches in flight (two micro-batches), combined in the opposite order
    first, second = _tokens(rank, world, torch.bfloat16, 64, 5), _tokens(rank, world, torch.bfloat16, 64, 6)
    d1 = asc.ep_dispatch(first[0], first[2], num_experts=E, group=group, x_scale=None, expert_map=None)
    d2 = asc.ep_dispatch(second[0], second[2], num_experts=E, group=group, x_scale=None, expert_map=None)
    out["overlap"] = [(asc.ep_combine(d[0] * 2, d[3], tok[3], group=group),
                       cpu.ep_combine(d[0] * 2, d[3], tok[3], group=group)) for d, tok in ((d2, second), (d1, first))]
    if plant == "":
        from hal_ascend import emulator
        real = emulator.IMPLS["npu_moe_distribute_combine_v2"]

        def unweighted(*a, **kw):                 # the planted fault: expert_scales ignored
            kw["expert_scales"] = torch.ones_like(kw["expert_scales"])
            return real(*a, **kw)
        emulator.IMPLS["npu_moe_distribute_combine_v2"] = unweighted
        npu.reset()
        x, scale, ids, w = _tokens(rank, world, torch.bfloat16, 64, 0)
        got = asc.ep_dispatch(x, ids, num_experts=E, group=group, x_scale=None, expert_map=None)
        y = got[0] * 3
        out["planted"] = (asc.ep_combine(y, got[3], w, group=group), cpu.ep_combine(y, got[3], w, group=group))
        emulator.IMPLS["npu_moe_distribute_combine_v2"] = real
        npu.reset()
    x, _, ids, _ = _tokens(rank, world, torch.bfloat16, 32, 9)
    if rank == 0 and ids.shape[0]:
        ids[0, 1] = ids[0, 2]                     # a duplicate on one rank only: every rank must decline
    try:
        asc.ep_dispatch(x, ids, num_experts=E, group=group, x_scale=None, expert_map=None)
        out["duplicate"] = None
    except UnsupportedCase as exc:
        out["duplicate"] = str(exc)
    return out


def _check(results, world):
    for r, res in enumerate(results):
        for name in ("bf16", "fp16_map", "fp8", "fp32"):
            sc = res[name]
            for i, (g, w) in enumerate(zip(sc["got"], sc["want"])):
                assert g.dtype == w.dtype and torch.equal(g, w), (world, r, name, i)
            assert torch.equal(sc["combined"], sc["reference"]), (world, r, name)
            assert torch.equal(sc["combined_shuffled"], sc["reference"]), (world, r, name)
        assert "two slots" in res["duplicate"], (world, r)
        for got, want in res["overlap"]:
            assert torch.equal(got, want), (world, r)
    assert results[1]["bf16"]["combined"].shape == (0, 64)                       # the rank without tokens


def test_emulated_mc2_equals_the_reference(monkeypatch):
    """World size 4 (2 experts per rank, so the expert map's relabelling matters); world size 2
    runs in the conformance tests below (certify_world's scenarios, over the same kernels)."""
    world = 4
    monkeypatch.setenv("HAL_ASCEND_EMULATE", "1")
    results = run_ranks(_rank, world, "", timeout_s=60)
    _RESULTS[world] = results
    _check(results, world)
    counts = [res["bf16"]["got"][2] for res in results]
    assert sum(int(c.sum()) for c in counts) > 0
    per_rank = E // world
    assert int(counts[5 // per_rank][5 % per_rank]) == 0                         # expert 5: no rows, still listed


def test_a_combine_ignoring_expert_scales_is_caught():
    """The planted fault ran in the ranks of the run above too; checked on its own here."""
    results = _RESULTS.get(4)
    if results is None:
        pytest.skip("runs after test_emulated_mc2_equals_the_reference (its ranks run the planted fault too)")
    for r, res in enumerate(results):
        planted, reference = res["planted"]
        assert torch.equal(res["bf16"]["combined"], res["bf16"]["reference"])
        if reference.shape[0]:
            assert not torch.equal(planted, reference), r


# --- the schema binding -------------------------------------------------------------------------

def test_the_mc2_pair_is_bound_to_the_wheel_schemas(monkeypatch):
    monkeypatch.setenv("HAL_ASCEND_EMULATE", "1")
    npu.reset()
    try:
        b = npu.binding()
        assert b.bound, b.reason
        for name in ("npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2"):
            text = schema.read_schemas({name}, os.path.join(PKG, schema.YAML_PATH))[name][0]
            registered = str(getattr(torch.ops.hal_npu_emu, name).default._schema).split("::", 1)[1]
            assert registered == str(torch._C.parse_schema(f"x::{text}")).split("::", 1)[1]
            assert name in b.meta                                                # outputs checked against meta
        sch = torch.ops.hal_npu_emu.npu_moe_distribute_dispatch_v2.default._schema
        positional = [a.name for a in sch.arguments if not a.kwarg_only]
        assert positional == ["x", "expert_ids", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"]
        # a call the wheel's meta function rejects fails the same way here (ep_rank_id outside the world)
        with pytest.raises(Exception, match="ep_rank_id"):
            b.ops["npu_moe_distribute_dispatch_v2"](torch.zeros(1, 1024, dtype=torch.bfloat16),
                                                    torch.zeros(1, 1, dtype=torch.int32), "nogroup", 2, 5, 2)
    finally:
        npu.reset()


# --- decline reasons ----------------------------------------------------------------------------

@pytest.fixture
def group4(monkeypatch):
    from hal import distributed
    g = distributed.EPGroup("fake4", 0, 4, process_group=object())
    monkeypatch.setitem(distributed._GROUPS, "fake4", g)
    monkeypatch.delenv("HAL_ASCEND_EP_MAX_BS", raising=False)
    monkeypatch.delenv("HCCL_BUFFSIZE", raising=False)
    return "fake4"


def _d(T=4, H=64, k=2, E=8, dtype=torch.bfloat16, group="fake4", soc="A3", scale=False):
    x = torch.zeros(T, H, dtype=dtype)
    return ep_mc2.dispatch_supports(x, torch.zeros(T, k, dtype=torch.int32), num_experts=E, group=group,
                                    x_scale=torch.ones(T, -(-H // 128)) if scale else None, expert_map=None, soc=soc)


def test_every_decline_reason(group4, monkeypatch):
    from hal import distributed
    assert _d() is None and _d(dtype=torch.float8_e4m3fn, H=256, scale=True) is None and _d(dtype=torch.float32) is None
    assert "Atlas A2/A3 only" in _d(soc="950")
    assert "expand_scales" in _d(soc="A2")
    assert _d(group="local") is None                       # one process: the reference's torch ops, no MC2
    monkeypatch.setitem(distributed._GROUPS, "fake400", distributed.EPGroup("fake400", 0, 400, object()))
    assert "2 to 384 ranks" in _d(group="fake400", E=400)
    assert "K <= 16" in _d(k=17, E=32)
    assert "K <= moe_expert_num" in _d(k=3, E=2)
    assert "at most 512" in _d(E=516)
    assert "H <= 7168" in _d(H=7166)                       # the row plus its source and ids: 7166 + 2 (2 + 2) words
    assert _d(H=7160) is None
    monkeypatch.setenv("HAL_ASCEND_EP_MAX_BS", "600")
    assert "1 to 512 tokens" in _d()
    monkeypatch.setenv("HAL_ASCEND_EP_MAX_BS", "512")
    monkeypatch.setenv("HCCL_BUFFSIZE", "50")
    why = _d(H=7000, E=64)
    assert "HCCL_BUFFSIZE" in why
    # the A3 formula by hand: L=16, max_bs=512, W=4, H=7008 (7000 + 2 (2 + 2) words, as bf16 words)
    need = 2 * (16 * 512 * 4 * 14336 + 2 * 512 * 14336)
    assert f">= {-(-need // 2 ** 20)} MB" in why
    monkeypatch.setenv("HCCL_BUFFSIZE", str(-(-need // 2 ** 20)))
    assert _d(H=7000, E=64) is None


def test_combine_declines(group4, monkeypatch):
    monkeypatch.setattr(ep_mc2, "HANDLES", {})
    y, src, w = torch.zeros(3, 64, dtype=torch.bfloat16), torch.zeros(3, 3, dtype=torch.int32), torch.rand(2, 2)
    assert "no preceding ep_dispatch" in ep_mc2.combine_supports(y, src, w, group="fake4")
    assert ep_mc2.combine_supports(y.float(), src, w, group="fake4") is None          # fp32: the all-to-all path
    assert ep_mc2.combine_supports(y, src, w, group="local") is None
    assert "Atlas A2/A3 only" in ep_mc2.combine_supports(y, src, w, group="fake4", soc="950")
    ep_mc2.HANDLES["fake4"] = [ep_mc2.Handle("fake4", src, torch.arange(3), torch.zeros(2, 2, dtype=torch.int32),
                                             torch.ones(2, 2, dtype=torch.bool), None, None, None, 8, 8, 2, 8)]
    assert ep_mc2.combine_supports(y, src, w, group="fake4") is None
    assert "does not match" in ep_mc2.combine_supports(y, src, torch.rand(3, 2), group="fake4")
    assert "H <= 7168" in ep_mc2.combine_supports(torch.zeros(3, 8000, dtype=torch.bfloat16), src, w, group="fake4")


def test_expert_relabelling_puts_experts_where_the_map_says():
    emap = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    mc2 = ep_mc2.mc2_expert_ids(8, 2, emap)
    assert mc2.tolist() == [4, 0, 5, 1, 6, 2, 7, 3]        # rank 0 owns 1, 3, 5, 7 -> MC2 ids 0..3 in that order
    assert torch.equal(ep_mc2.mc2_expert_ids(8, 2, None), torch.arange(8))


# --- the world conformance ----------------------------------------------------------------------

def _plant_dispatch_fault():
    """Rank setup: the emulated dispatch delivers every row with its first word zeroed."""
    from hal_ascend import emulator
    real = emulator.IMPLS["npu_moe_distribute_dispatch_v2"]

    def lossy(*a, **kw):
        out = real(*a, **kw)
        out[0][:, 0] = 0
        return out
    emulator.IMPLS["npu_moe_distribute_dispatch_v2"] = lossy
    npu.reset()


def test_a_planted_dispatch_fault_fails_the_world_conformance(monkeypatch, request):
    from hal.conformance.world import certify_world
    from hal.registry import reset_registry
    monkeypatch.setenv("HAL_ASCEND_EMULATE", "1")
    reset_registry()                        # this process reports on the emulated backend, whatever probed before
    request.addfinalizer(reset_registry)    # and forgets it again (the next load sees the restored environment)
    bad = certify_world("ascend", 2, rank_setup=_plant_dispatch_fault, timeout_s=60)
    assert {r.status for r in bad.results if r.op == "ep_dispatch"} == {"FAIL"}
    assert all("recv_x" in r.reason for r in bad.results if r.op == "ep_dispatch")


def test_world_conformance_passes_at_world_sizes_2_and_4():
    """``hal conformance --backend ascend --ops ep_dispatch,ep_combine --world-size 2,4`` (certify_world
    at 2 and 4 in the child): every world case PASSes on the emulated path."""
    import json
    import subprocess
    import sys
    env = {**os.environ, "HAL_ASCEND_EMULATE": "1"}
    proc = subprocess.run([sys.executable, "-m", "hal.cli", "conformance", "--backend", "ascend", "--ops",
                           "ep_dispatch,ep_combine", "--world-size", "2,4", "--json"], capture_output=True, text=True,
                          timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)["backends"][0]["results"]
    world = [r for r in results if r["case"].startswith("world")]
    assert len(world) == 12 and {r["status"] for r in world} == {"PASS"}, [(r["case"], r["reason"]) for r in world]
    assert {r["path"] for r in world} == {"emulated"}
