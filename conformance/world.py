"""Conformance of the expert-parallel ops at world sizes above one: a backend's ``ep_dispatch`` and
``ep_combine`` run on W local processes joined by gloo (:func:`hal.spawn_ranks.run_ranks`) and are
judged against the single-process reference.

The expectation needs no multi-process code: the reference ``ep_dispatch`` of every rank's tokens
concatenated in rank order, in the one-process group, lists the rows by expert, then by
(rank, token, slot); rank r must receive exactly the rows of the experts it owns, in that order,
with the source translated from the concatenated token index to (rank, token). ``ep_combine``'s
expectation is the one-process combine of the same expert outputs, sliced per rank. The expert
outputs are a function of each row and its source index only, so a wrong row or a wrong source
shows up in the combine too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
import traceback
from typing import Callable, Optional

import torch

from hal.conformance import metrics
from hal.conformance.runner import BackendRun, CaseResult, flatten_outputs, identical, judge

E = 8
# (name, hidden size, top-k, payload, explicit round-robin expert map)
SCENARIOS = [("bf16_uneven_ranks", 64, 3, "bf16", False), ("fp32_expert_map", 32, 2, "fp32", True),
             ("fp8_payload", 256, 2, "fp8", False)]
OPS = ("ep_dispatch", "ep_combine")


def rank_inputs(scenario: tuple, world: int, rank: int, seed: int) -> dict:
    """Rank ``rank``'s arguments: token counts differ per rank (rank 1 has none when W > 1),
    expert 5 is never chosen, -1 slots appear."""
    name, H, k, payload, permuted = scenario
    digest = hashlib.sha256(f"{seed}:{name}:{world}:{rank}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 62))
    T = 0 if (rank == 1 and world > 1) else 2 + 3 * rank
    pool = torch.tensor([e for e in range(E) if e != 5])
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)]) if T else \
        torch.empty(0, k, dtype=torch.int64)
    ids = ids.to(torch.int32)
    if T > 1:
        ids[1, -1] = -1
    x, scale = torch.randn(T, H, generator=g), None
    if payload == "fp8":
        x, scale = (x * 50).clamp(-448, 448).to(torch.float8_e4m3fn), torch.rand(T, -(-H // 128), generator=g) + 0.5
    elif payload == "bf16":
        x = x.bfloat16()
    expert_map = (torch.arange(E) % world).to(torch.int32) if permuted else None
    return {"x": x, "x_scale": scale, "topk_ids": ids, "weights": torch.rand(T, k, generator=g), "expert_map": expert_map}


def expert_outputs(rows: torch.Tensor, scale: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The stand-in experts: ``dequantized row * (1 + s + j/2) + t`` from the row and its source,
    in the payload's dtype for bf16 payloads (a 16-bit combine, as real experts give) and fp32
    otherwise."""
    x = rows.float() * scale.repeat_interleave(128, 1)[:, :rows.shape[1]] if rows.dtype == torch.float8_e4m3fn \
        else rows.float()
    s, t, j = (source[:, i, None].float() for i in range(3))
    y = x * (1 + s + 0.5 * j) + t
    return y.to(torch.bfloat16) if rows.dtype == torch.bfloat16 else y


def _rank_main(rank: int, world: int, backend: str, fallback: str, seed: int, rank_setup) -> dict:
    """On one rank: run every scenario twice through the backend's bound EP ops."""
    from hal import distributed
    if rank_setup is not None:
        rank_setup()
    from hal.binding import to_device
    from hal.conformance.runner import BoundBackend
    from hal.registry import get_registry
    bound = BoundBackend(get_registry().record(backend), fallback)
    group = distributed.ep_group().name
    out = {"paths": {op: bound.paths[op] for op in OPS}, "notes": {op: bound.notes[op] for op in OPS}, "scenarios": {}}
    for sc in SCENARIOS:
        inp = rank_inputs(sc, world, rank, seed)
        runs, error = [], None
        try:
            for _ in range(2):
                if "ep_dispatch" not in bound.ops or "ep_combine" not in bound.ops:
                    raise LookupError("the backend does not implement " + " and ".join(o for o in OPS
                                                                                      if o not in bound.ops))
                dev = {k: to_device(v, bound.device) for k, v in inp.items()}
                disp = bound.ops["ep_dispatch"](dev["x"], dev["topk_ids"], num_experts=E, group=group,
                                                x_scale=dev["x_scale"], expert_map=dev["expert_map"])
                flat = [t.detach().cpu() for t in flatten_outputs(disp)]
                y = expert_outputs(flat[0], flat[1], flat[3]).to(bound.device)
                comb = bound.ops["ep_combine"](y, disp[3], dev["weights"], group=group)
                runs.append((flat, comb.detach().cpu()))
        except Exception as exc:  # noqa: BLE001 - the backend's error is the case's result
            error = (f"{type(exc).__name__}: {exc}", traceback.format_exc())
        out["scenarios"][sc[0]] = {"runs": runs, "error": error}
    return out


def expectation(scenario: tuple, world: int, seed: int) -> list[dict]:
    """Per rank: the dispatch outputs and the combine's (truth, ref), from the one-process reference."""
    from hal.backends.cpu import KERNELS, float64_evaluation
    from hal.contract.expert_parallel import owner_of_experts
    inputs = [rank_inputs(scenario, world, r, seed) for r in range(world)]
    counts = [i["x"].shape[0] for i in inputs]
    starts = torch.tensor([0] + counts).cumsum(0)
    X = torch.cat([i["x"] for i in inputs])
    ids = torch.cat([i["topk_ids"] for i in inputs])
    scale = torch.cat([i["x_scale"] for i in inputs]) if inputs[0]["x_scale"] is not None else None
    rows, row_scale, _, source = KERNELS["ep_dispatch"](X, ids, num_experts=E, group="local", x_scale=scale)
    t_global, slot = source[:, 1].long(), source[:, 2].long()
    src_rank = torch.searchsorted(starts[1:], t_global, right=True)
    local_src = torch.stack([src_rank, t_global - starts[src_rank], slot], 1).to(torch.int32)
    expert = ids[t_global, slot].long()
    owner = owner_of_experts(E, world, inputs[0]["expert_map"])[expert]
    y = expert_outputs(rows, row_scale, local_src)
    W = torch.cat([i["weights"] for i in inputs])
    one_process = torch.stack([torch.zeros_like(t_global), t_global, slot], 1).to(torch.int32)
    ref = KERNELS["ep_combine"](y, one_process, W, group="local")
    with float64_evaluation():
        truth = KERNELS["ep_combine"](y, one_process, W, group="local")
    emap = inputs[0]["expert_map"]
    per_rank = []
    for r in range(world):
        mine = owner == r
        local_experts = torch.nonzero(owner_of_experts(E, world, emap) == r).flatten()
        tpe = torch.stack([((expert == e) & mine).sum() for e in local_experts]).to(torch.int32)
        sl = slice(int(starts[r]), int(starts[r + 1]))
        per_rank.append({"dispatch": [rows[mine], row_scale[mine], tpe, local_src[mine]],
                         "combine": (truth[sl], ref[sl])})
    return per_rank


def certify_world(backend: str, world_size: int, *, seed: int = 0, fallback: str = "error",
                  progress: Optional[Callable[[CaseResult], None]] = None, timeout_s: float = 120.0,
                  rank_setup: Optional[Callable[[], None]] = None) -> BackendRun:
    """Certify ``backend``'s EP ops on ``world_size`` gloo ranks: one result per (op, scenario),
    case names ``world<W>/<scenario>``. A rank failure or timeout makes every case ERROR.
    ``rank_setup``: a module-level function each rank calls first, in its own process (e.g. to
    register a backend that is not installed as a plugin; this process must then know the backend
    too, to report on it)."""
    from hal.registry import get_registry
    from hal.spawn_ranks import RanksFailed, run_ranks
    rec = get_registry().record(backend)
    av = rec.availability
    run = BackendRun(rec.name, rec.label, rec.status, rec.reason, av.device if av else "",
                     dict(av.versions) if av else {}, [], [], fallback)

    def add(r: CaseResult) -> None:
        run.results.append(r)
        if progress:
            progress(r)

    if rec.status != "available":
        for sc in SCENARIOS:
            for op in OPS:
                add(CaseResult(rec.name, rec.label, op, f"world{world_size}/{sc[0]}", "SKIPPED", "-",
                               f"backend {rec.status}: {rec.reason}"))
        return run
    t0 = time.perf_counter()
    try:
        ranks = run_ranks(_rank_main, world_size, backend, fallback, seed, rank_setup, timeout_s=timeout_s)
    except RanksFailed as exc:
        for sc in SCENARIOS:
            for op in OPS:
                add(CaseResult(rec.name, rec.label, op, f"world{world_size}/{sc[0]}", "ERROR", "-", str(exc)))
        return run
    elapsed = (time.perf_counter() - t0) / (2 * len(SCENARIOS))
    for sc in SCENARIOS:
        want = expectation(sc, world_size, seed)
        for op_i, op in enumerate(OPS):
            res = CaseResult(rec.name, rec.label, op, f"world{world_size}/{sc[0]}", "PASS", ranks[0]["paths"][op],
                             duration_s=elapsed, tags=("world",))
            errors = [(r, ranks[r]["scenarios"][sc[0]]["error"]) for r in range(world_size)
                      if ranks[r]["scenarios"][sc[0]]["error"]]
            if errors:
                r, (msg, tb) = errors[0]
                unsupported = msg.startswith("LookupError") or msg.startswith("UnsupportedCase")
                res.status = "UNSUPPORTED" if unsupported else "ERROR"
                res.reason, res.traceback = f"rank {r}: {msg}", tb
                add(res)
                continue
            checks = []
            for r in range(world_size):
                runs = ranks[r]["scenarios"][sc[0]]["runs"]
                if op == "ep_dispatch":
                    got = runs[0][0]
                    expected = want[r]["dispatch"]
                    outs = [metrics.check_exact(f"rank{r}.{name}", g, e)
                            for name, g, e in zip(("recv_x", "recv_scale", "tokens_per_expert", "recv_source"),
                                                  got, expected)]
                    same = identical(runs[0][0], runs[1][0])
                else:
                    truth, ref = want[r]["combine"]
                    outs = [dataclasses.replace(o, name=f"rank{r}.{o.name}")
                            for o in judge("ep_combine", (), {}, [runs[0][1]], [truth], [ref])]
                    same = identical([runs[0][1]], [runs[1][1]])
                checks += outs
                if not same and res.status == "PASS":
                    res.status, res.reason = "NONDETERMINISTIC", f"rank {r}: two runs on the same inputs differ bitwise"
            res.outputs = checks
            failed = [o for o in checks if not o.passed]
            if failed:
                res.status = "FAIL"
                res.reason = "; ".join(f"{o.name}: {o.message}" for o in failed[:4])
            elif res.path == "fallback" and not res.reason:
                res.reason = ranks[0]["notes"][op]
            add(res)
    return run

