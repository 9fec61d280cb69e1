"""hal-cuda's ep_dispatch / ep_combine on DeepEP's low-latency kernels, without a GPU.

hal-cuda runs on CPU tensors (HAL_CUDA_INTERPRET=1) and ``deep_ep`` is the CPU test double of
``tests/deep_ep_double`` (DeepEP's documented low-latency semantics over gloo; put on sys.path in
the ranks and tests of this file only). At world sizes 2 and 4 (gloo ranks), hal-cuda's ops must
go through the double (its calls are counted) and equal the CPU reference exactly: uneven tokens
per rank, a rank with no tokens, an expert nobody picks, -1 slots, an expert map, e4m3 / fp16 /
fp32 payloads packed into bf16 rows, two dispatches in flight, a reordered combine. Every decline
reason is reached: the calls that do not fit take the torch.distributed path (and still equal the
reference) with the reason recorded; the double itself rejects what the real API rejects.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("hal_cuda", reason="hal-cuda is installed by ci/test.sh")
pytest.importorskip("triton")

from hal.spawn_ranks import run_ranks  # noqa: E402
from ep_tokens import rank_tokens  # noqa: E402

DOUBLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deep_ep_double")
E = 8
MAXT_ENV = "HAL_CUDA_DEEPEP_MAX_TOKENS"


def _use_double():
    """In a rank: hal-cuda on CPU tensors, and the double importable as ``deep_ep``."""
    if DOUBLE not in sys.path:
        sys.path.insert(0, DOUBLE)
    from hal_cuda import ep_deepep
    ep_deepep.reset()
    import deep_ep
    assert deep_ep.TENSOR_DEVICE == "cpu", "the real deep_ep was imported instead of the test double"
    return deep_ep, ep_deepep


def _tokens(rank: int, dtype, H: int, k: int, seed: int, T=None):
    """Rank ``rank``'s tokens (:func:`ep_tokens.rank_tokens`), seeded by ``seed`` and the rank."""
    return rank_tokens(torch.Generator().manual_seed(1000 * seed + rank), rank, dtype, H, k, T)


def _expert_fn(rows, scale, source, dtype):
    """The stand-in experts: a function of the (dequantized) row and its source only."""
    x = rows.float() * scale.repeat_interleave(128, 1)[:, :rows.shape[1]] if rows.dtype == torch.float8_e4m3fn \
        else rows.float()
    s, t, j = (source[:, i, None].float() for i in range(3))
    return (x * (1 + s + 0.5 * j) + t).to(dtype)


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _scenario(cuda, cpu, group, rank, *, dtype, H, k, seed, out_dtype, emap=None, T=None, dup=False,
              shuffled=False):
    """One dispatch + combine on hal-cuda and on the CPU reference; returns both sides and the paths."""
    import deep_ep
    from hal_cuda import ep_deepep
    x, scale, ids, w = _tokens(rank, dtype, H, k, seed, T)
    if dup and rank == 0 and ids.shape[0]:
        ids[0, 2] = ids[0, 1] if ids[0, 1] >= 0 else 2                 # one token names an expert twice
        ids[0, 1] = ids[0, 2]
    before = dict(deep_ep.CALLS)
    got = cuda.ep_dispatch(x, ids, num_experts=E, group=group, x_scale=scale, expert_map=emap)
    dispatch_path = ep_deepep.LAST[(group, "ep_dispatch")]
    want = cpu.ep_dispatch(x, ids, num_experts=E, group=group, x_scale=scale, expert_map=emap)
    y_got = _expert_fn(got[0], got[1], got[3], out_dtype)
    y_want = _expert_fn(want[0], want[1], want[3], out_dtype)
    if shuffled:
        comb = cuda.ep_combine(y_got.flip(0), got[3].flip(0), w, group=group)
    else:
        comb = cuda.ep_combine(y_got, got[3], w, group=group)
    combine_path = ep_deepep.LAST[(group, "ep_combine")]
    calls = {key: deep_ep.CALLS[key] - before.get(key, 0) for key in ("low_latency_dispatch", "low_latency_combine")}
    return {"got": [_bits(t) for t in got], "want": [_bits(t) for t in want], "combined": comb,
            "reference": cpu.ep_combine(y_want, want[3], w, group=group), "paths": (dispatch_path, combine_path),
            "calls": calls}


def _double_rejects(rank: int, world: int) -> dict:
    """The double fails loudly where the real API would (each check fires before any collective,
    except the disagreement, which every rank sees)."""
    import deep_ep
    import torch.distributed as dist
    pg = dist.group.WORLD
    L = E // world
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(8, 2048, world, E)
    buf = deep_ep.Buffer(pg, 0, hint, low_latency_mode=True, num_qps_per_rank=L, explicitly_destroy=True)
    ids = torch.zeros(2, 2, dtype=torch.int64)
    x = torch.zeros(2, 2048, dtype=torch.bfloat16)
    bad = {
        "dtype": lambda: buf.low_latency_dispatch(x.float(), ids, 8, E, use_fp8=False),
        "hidden_128": lambda: buf.low_latency_dispatch(torch.zeros(2, 1000, dtype=torch.bfloat16), ids, 8, E,
                                                       use_fp8=False),
        "hidden_switch": lambda: buf.low_latency_dispatch(torch.zeros(2, 1152, dtype=torch.bfloat16), ids, 8, E,
                                                          use_fp8=False),
        "too_many_tokens": lambda: buf.low_latency_dispatch(torch.zeros(9, 2048, dtype=torch.bfloat16),
                                                            torch.zeros(9, 2, dtype=torch.int64), 8, E, use_fp8=False),
        "topk_dtype": lambda: buf.low_latency_dispatch(x, ids.int(), 8, E, use_fp8=False),
        "topk_12": lambda: buf.low_latency_dispatch(x, torch.zeros(2, 12, dtype=torch.int64), 8, E, use_fp8=False),
        "buffer_small": lambda: buf.low_latency_dispatch(x, ids, 16, E, use_fp8=False),
        "not_contiguous": lambda: buf.low_latency_dispatch(torch.zeros(2048, 2, dtype=torch.bfloat16).t(), ids, 8,
                                                           E, use_fp8=False),
        "fp8_cast": lambda: buf.low_latency_dispatch(x, ids, 8, E, use_fp8=True),
        "combine_dtype": lambda: buf.low_latency_combine(torch.zeros(L, world * 8, 2048), ids, torch.zeros(2, 2),
                                                         (torch.zeros(L, world * 8, dtype=torch.int32),
                                                          torch.zeros(L, world, dtype=torch.int64), 8, 2048, E)),
        "combine_weights_dtype": lambda: buf.low_latency_combine(
            torch.zeros(L, world * 8, 2048, dtype=torch.bfloat16), ids, torch.zeros(2, 2, dtype=torch.bfloat16),
            (torch.zeros(L, world * 8, dtype=torch.int32), torch.zeros(L, world, dtype=torch.int64), 8, 2048, E)),
    }
    few_qps = deep_ep.Buffer(pg, 0, hint, low_latency_mode=True, num_qps_per_rank=L - 1, explicitly_destroy=True)
    bad["qps"] = lambda: few_qps.low_latency_dispatch(x, ids, 8, E, use_fp8=False)
    out = {}
    for name, call in bad.items():
        try:
            call()
            out[name] = None
        except (RuntimeError, AssertionError, NotImplementedError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    # ranks that disagree on num_max_dispatch_tokens_per_rank: every rank raises
    try:
        buf.low_latency_dispatch(torch.zeros(0, 2048, dtype=torch.bfloat16), torch.zeros(0, 2, dtype=torch.int64),
                                 8 if rank == 0 else 4, E, use_fp8=False)
        out["disagree"] = None
    except RuntimeError as exc:
        out["disagree"] = str(exc)
    buf.destroy()
    few_qps.destroy()
    return out


def _declines(rank: int, world: int, group: str) -> dict:
    """Every decline reason of deepep_unsupported_reason / deepep_combine_unsupported_reason, on a
    real gloo group (the functions are pure: no collective runs here)."""
    import deep_ep
    from hal import distributed
    from hal_cuda import ep_deepep
    r = {}

    def d(x=None, k=2, H=64, dtype=torch.bfloat16, grp=group, scale=None, num_experts=E):
        x = torch.zeros(3, H, dtype=dtype) if x is None else x
        return ep_deepep.deepep_unsupported_reason(x, torch.zeros(x.shape[0], k, dtype=torch.int32),
                                                   num_experts=num_experts, group=grp, x_scale=scale)

    r["fits"] = d()
    r["fits_fp8"] = d(dtype=torch.float8_e4m3fn, H=7936, scale=torch.ones(3, 62))       # 3968 + 124 words
    r["fits_fp32_8192_words"] = d(dtype=torch.float32, H=4096)
    r["wide_fp32"] = d(dtype=torch.float32, H=4097)
    r["wide_fp8"] = d(dtype=torch.float8_e4m3fn, H=16384, scale=torch.ones(3, 128))
    r["topk"] = d(k=12)
    r["local"] = d(grp="local")
    r["device"] = d(x=torch.zeros(3, 64, dtype=torch.bfloat16, device="meta"))
    distributed._GROUPS["fake_pg"] = distributed.EPGroup("fake_pg", 0, world, process_group=object())
    r["backend"] = d(grp="fake_pg")
    del distributed._GROUPS["fake_pg"]
    os.environ["HAL_CUDA_DEEPEP"] = "0"
    r["disabled"] = d()
    del os.environ["HAL_CUDA_DEEPEP"]
    for value, name in (("abc", "maxt_text"), ("0", "maxt_zero"), ("3", "maxt_multiple_of_4")):
        os.environ[MAXT_ENV] = value
        r[name] = d()
    del os.environ[MAXT_ENV]
    os.environ["NVSHMEM_QP_DEPTH"] = "64"
    r["qp_depth"] = d()
    del os.environ["NVSHMEM_QP_DEPTH"]
    deep_ep.topk_idx_t = torch.int8
    r["topk_idx_t"] = d(num_experts=256)
    deep_ep.topk_idx_t = torch.int64
    real_sms = ep_deepep._device_sms
    ep_deepep._device_sms = lambda device: 1                                  # a GPU with one SM
    r["sms"] = d(num_experts=16)
    ep_deepep._device_sms = real_sms
    torch.use_deterministic_algorithms(True)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    r["deterministic"] = d()
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    # deep_ep not importable
    saved = sys.modules.pop("deep_ep")
    sys.path.remove(DOUBLE)
    ep_deepep._MODULE = None
    r["not_importable"] = d()
    r["note_not_importable"] = ep_deepep.deepep_note("cpu")
    sys.path.insert(0, DOUBLE)
    sys.modules["deep_ep"] = saved
    ep_deepep._MODULE = None
    r["note"] = ep_deepep.deepep_note("cpu")
    r["note_cuda"] = ep_deepep.deepep_note("cuda")
    # the combine's own reasons, against a kept dispatch of this group
    y = torch.zeros(4, 64, dtype=torch.bfloat16)
    src = torch.zeros(4, 3, dtype=torch.int32)
    w = torch.zeros(3, 2)
    r["c_unknown_rows"] = ep_deepep.deepep_combine_unsupported_reason(y, src, w, group=group)
    st = ep_deepep._STATES[group]
    h = ep_deepep._Handle(src, st, torch.arange(4), torch.zeros(3, 2, dtype=torch.int64), None, 3, False)
    ep_deepep._keep(group, h)
    r["c_fits"] = ep_deepep.deepep_combine_unsupported_reason(y, src, w, group=group)
    r["c_fp32"] = ep_deepep.deepep_combine_unsupported_reason(y.float(), src, w, group=group)
    r["c_fp16"] = ep_deepep.deepep_combine_unsupported_reason(y.half(), src, w, group=group)
    r["c_wide"] = ep_deepep.deepep_combine_unsupported_reason(torch.zeros(4, 8200, dtype=torch.bfloat16), src, w,
                                                              group=group)
    r["c_width"] = ep_deepep.deepep_combine_unsupported_reason(torch.zeros(4, 4096, dtype=torch.bfloat16), src, w,
                                                               group=group)
    h.duplicate = True
    r["c_duplicate"] = ep_deepep.deepep_combine_unsupported_reason(y, src, w, group=group)
    h.duplicate = False
    r["c_local"] = ep_deepep.deepep_combine_unsupported_reason(y, src, w, group="local")
    ep_deepep._STATES[group] = ep_deepep._State(st.buffer, st.process_group, st.max_tokens, st.num_experts,
                                                st.rdma_bytes)
    r["c_recreated"] = ep_deepep.deepep_combine_unsupported_reason(y, src, w, group=group)
    ep_deepep._STATES[group] = st
    ep_deepep.remember_torch_dispatch(group, src.clone())
    marker = ep_deepep.HANDLES[group][-1].source
    r["c_torch_dispatch"] = ep_deepep.deepep_combine_unsupported_reason(y, marker, w, group=group)
    r["c_wrong_weights"] = None
    try:
        ep_deepep.combine(y, src, torch.zeros(5, 2), group=group)
    except Exception as exc:  # noqa: BLE001
        r["c_wrong_weights"] = f"{type(exc).__name__}: {exc}"
    return r


def _rank(rank: int, world: int) -> dict:
    deep_ep, ep_deepep = _use_double()
    import hal
    from hal import distributed
    group = distributed.ep_group().name
    cuda, cpu = hal.runtime("cuda"), hal.runtime("cpu")
    assert cuda.device_type == "cpu", "hal-cuda must run under the interpreter here (HAL_CUDA_INTERPRET=1)"
    rr = (torch.arange(E) % world).to(torch.int32)
    out = {"scenarios": {}}
    sc = out["scenarios"]
    sc["bf16"] = _scenario(cuda, cpu, group, rank, dtype=torch.bfloat16, H=2048, k=3, seed=1,
                           out_dtype=torch.bfloat16)
    sc["bf16_shuffled"] = _scenario(cuda, cpu, group, rank, dtype=torch.bfloat16, H=2048, k=3, seed=2,
                                    out_dtype=torch.bfloat16, shuffled=True)
    sc["fp8_map"] = _scenario(cuda, cpu, group, rank, dtype=torch.float8_e4m3fn, H=256, k=2, seed=3,
                              out_dtype=torch.float32, emap=rr)
    sc["fp32_map"] = _scenario(cuda, cpu, group, rank, dtype=torch.float32, H=40, k=3, seed=4,
                               out_dtype=torch.bfloat16, emap=rr.flip(0))
    sc["fp16"] = _scenario(cuda, cpu, group, rank, dtype=torch.float16, H=2560, k=2, seed=5, out_dtype=torch.float16)
    sc["duplicate"] = _scenario(cuda, cpu, group, rank, dtype=torch.bfloat16, H=64, k=3, seed=6,
                                out_dtype=torch.bfloat16, dup=True)
    sc["topk12"] = _scenario(cuda, cpu, group, rank, dtype=torch.bfloat16, H=64, k=12, seed=7,
                             out_dtype=torch.bfloat16)
    sc["wide"] = _scenario(cuda, cpu, group, rank, dtype=torch.float32, H=4097, k=2, seed=8, out_dtype=torch.float32)
    os.environ[MAXT_ENV] = "4"
    sc["fits_4"] = _scenario(cuda, cpu, group, rank, dtype=torch.bfloat16, H=128, k=2, seed=9,
                             out_dtype=torch.bfloat16, T=[4, 0, 1, 3][rank])
    sc["overflow"] = _scenario(cuda, cpu, group, rank, dtype=torch.bfloat16, H=128, k=2, seed=10,
                               out_dtype=torch.bfloat16, T=[5, 0, 1, 3][rank])
    del os.environ[MAXT_ENV]
    # two dispatches in flight, combined in the opposite order
    first = _tokens(rank, torch.bfloat16, 2048, 3, 11)
    second = _tokens(rank, torch.bfloat16, 2048, 3, 12)
    d1 = cuda.ep_dispatch(first[0], first[2], num_experts=E, group=group)
    d2 = cuda.ep_dispatch(second[0], second[2], num_experts=E, group=group)
    out["overlap"] = [(cuda.ep_combine(d[0] * 2, d[3], tok[3], group=group),
                       cpu.ep_combine(d[0] * 2, d[3], tok[3], group=group), ep_deepep.LAST[(group, "ep_combine")])
                      for d, tok in ((d2, second), (d1, first))]
    out["calls"] = dict(deep_ep.CALLS)
    out["counts"] = dict(ep_deepep.COUNTS)
    if world == 2:
        out["double_rejects"] = _double_rejects(rank, world)
        out["declines"] = _declines(rank, world, group)
    ep_deepep.release()
    return out


@pytest.fixture(scope="module")
def ranks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HAL_CUDA_INTERPRET", "1")
        for var in ("HAL_CUDA_DEEPEP", MAXT_ENV, "NVSHMEM_QP_DEPTH"):
            mp.delenv(var, raising=False)
        return {world: run_ranks(_rank, world, timeout_s=240) for world in (2, 4)}


DEEPEP = ("deepep", None)


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_and_combine_on_the_double_equal_the_reference(ranks, world):
    for r, res in enumerate(ranks[world]):
        for name, sc in res["scenarios"].items():
            for i, (g, w) in enumerate(zip(sc["got"], sc["want"])):
                assert g.dtype == w.dtype and torch.equal(g, w), (world, r, name, i)     # rows, scales, counts, sources
            assert sc["combined"].dtype == sc["reference"].dtype, (world, r, name)
            assert torch.equal(sc["combined"], sc["reference"]), (world, r, name)
        for got, want, path in res["overlap"]:
            assert torch.equal(got, want) and path == DEEPEP, (world, r)
    res = ranks[world]
    assert res[1]["scenarios"]["bf16"]["combined"].shape == (0, 2048)               # the rank without tokens
    owner = torch.arange(E) // (E // world)
    counts = res[int(owner[5])]["scenarios"]["bf16"]["got"][2]
    assert int(counts[5 % (E // world)]) == 0                                      # expert 5: no rows, still listed
    assert sum(int(c["scenarios"]["bf16"]["got"][2].sum()) for c in res) > 0


@pytest.mark.parametrize("world", [2, 4])
def test_the_deepep_path_was_taken_where_the_call_fits(ranks, world):
    for r, res in enumerate(ranks[world]):
        sc = res["scenarios"]
        for name in ("bf16", "bf16_shuffled", "fp32_map", "fits_4"):
            assert sc[name]["paths"] == (DEEPEP, DEEPEP), (world, r, name, sc[name]["paths"])
            assert sc[name]["calls"] == {"low_latency_dispatch": 1, "low_latency_combine": 1}, (world, r, name)
        for name in ("fp8_map", "fp16", "duplicate"):                   # DeepEP dispatch, torch.distributed combine
            assert sc[name]["paths"][0] == DEEPEP, (world, r, name)
            assert sc[name]["paths"][1][0] == "torch.distributed", (world, r, name)
            assert sc[name]["calls"] == {"low_latency_dispatch": 1, "low_latency_combine": 0}, (world, r, name)
        assert "float32" in sc["fp8_map"]["paths"][1][1] and "bf16" in sc["fp8_map"]["paths"][1][1]
        assert "float16" in sc["fp16"]["paths"][1][1]
        assert "two slots" in sc["duplicate"]["paths"][1][1]
        for name, needle in (("topk12", "top-k <= 11"), ("wide", "8194 bf16 words")):
            assert sc[name]["paths"][0] == ("torch.distributed", sc[name]["paths"][0][1]), (world, r, name)
            assert needle in sc[name]["paths"][0][1], (world, r, name, sc[name]["paths"][0][1])
            assert sc[name]["calls"] == {"low_latency_dispatch": 0, "low_latency_combine": 0}, (world, r, name)
        # more tokens on rank 0 than the buffer's 4: every rank ran DeepEP's dispatch, then redid it
        over = sc["overflow"]
        assert over["calls"] == {"low_latency_dispatch": 1, "low_latency_combine": 0}, (world, r)
        assert over["paths"][0][0] == "torch.distributed" and "more tokens" in over["paths"][0][1], (world, r)
        assert "tokens per rank [5, 0" in over["paths"][0][1]
        assert over["paths"][1][0] == "torch.distributed" and "did not run on DeepEP" in over["paths"][1][1]
        # buffers: 128 tokens x 2048 words, re-sized for fp16 rows of 2560, 4 tokens, 128 tokens again
        assert res["calls"]["Buffer"] == 4 and res["calls"]["destroy"] == 3, res["calls"]


def test_every_decline_reason(ranks):
    res = ranks[2][0]["declines"]
    assert res["fits"] is None and res["fits_fp8"] is None and res["fits_fp32_8192_words"] is None
    expected = {
        "wide_fp32": "8194 bf16 words (4097 x float32)",
        "wide_fp8": "+ its 1x128 fp32 scales",
        "topk": "top-k <= 11",
        "local": "one process",
        "device": "take cpu tensors; these are on meta",
        "backend": "process group runs unknown",
        "disabled": "HAL_CUDA_DEEPEP=0",
        "maxt_text": "is not an integer",
        "maxt_zero": "at least 1 token",
        "maxt_multiple_of_4": "multiple of 4",
        "qp_depth": "NVSHMEM_QP_DEPTH >= 2 (max tokens + 1) = 258",
        "topk_idx_t": "do not fit deep_ep.topk_idx_t (int8)",
        "sms": "at most 14 experts per SM",
        "deterministic": "fill_uninitialized_memory",
        "not_importable": "deep_ep is not importable",
        "note_not_importable": "DeepEP not used: deep_ep is not importable",
        "note": "DeepEP low-latency kernels (deep_ep 2.1.0)",
        "note_cuda": "DeepEP not used: deep_ep 2.1.0 is importable, but its kernels take cpu tensors",
        "c_unknown_rows": "did not run on DeepEP",
        "c_fp32": "float32",
        "c_fp16": "float16",
        "c_wide": "hidden sizes up to 8192",
        "c_width": "sized for narrower rows",
        "c_duplicate": "two slots",
        "c_local": "one process",
        "c_recreated": "re-created",
        "c_torch_dispatch": "did not run on DeepEP",
        "c_wrong_weights": "ContractError",
    }
    for name, needle in expected.items():
        assert res[name] is not None and needle in res[name], (name, res[name])
    assert res["c_fits"] is None


def test_the_double_rejects_what_deepep_rejects(ranks):
    res = ranks[2][0]["double_rejects"]
    for name, needle in (("dtype", "kBFloat16"), ("hidden_128", "% 128"), ("hidden_switch", "Unsupported hidden"),
                         ("too_many_tokens", "num_max_dispatch_tokens_per_rank"), ("topk_dtype", "topk_idx_t"),
                         ("topk_12", "kNumMaxTopK"), ("buffer_small", "num_rdma_bytes"),
                         ("not_contiguous", "is_contiguous"), ("fp8_cast", "not emulated"),
                         ("combine_dtype", "kBFloat16"), ("combine_weights_dtype", "kFloat32"),
                         ("qps", "QPs per rank"), ("disagree", "same low-latency kernel")):
        assert res[name] is not None and needle in res[name], (name, res[name])


def test_without_deep_ep_the_note_says_so(monkeypatch):
    from hal_cuda import ep_deepep
    monkeypatch.delenv("HAL_CUDA_DEEPEP", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != DOUBLE])
    monkeypatch.delitem(sys.modules, "deep_ep", raising=False)
    ep_deepep.reset()
    try:
        note = ep_deepep.deepep_note()
        assert note.startswith("DeepEP not used: deep_ep is not importable"), note
        monkeypatch.syspath_prepend(DOUBLE)
        ep_deepep.reset()
        assert ep_deepep.deepep_note("cpu").startswith("DeepEP low-latency kernels"), ep_deepep.deepep_note("cpu")
        monkeypatch.setenv("HAL_CUDA_DEEPEP", "0")
        assert "disabled (HAL_CUDA_DEEPEP=0)" in ep_deepep.deepep_note("cpu")
    finally:
        monkeypatch.delitem(sys.modules, "deep_ep", raising=False)
        ep_deepep.reset()
