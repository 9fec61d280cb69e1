"""Run one function on W local processes joined by a gloo process group (tests, and conformance of
the expert-parallel ops at several world sizes, on one machine without accelerators).

:func:`run_ranks` starts the ranks (``spawn``), initializes ``torch.distributed`` with gloo and a
bounded collective timeout in each, calls ``fn(rank, world_size, *args)``, and returns the ranks'
results in rank order. A rank that raises makes the call raise :class:`RanksFailed` naming the
rank and its error; a rank that never finishes is killed at the deadline -- never a hang.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import tempfile
import time
import traceback
from typing import Any, Callable


class RanksFailed(RuntimeError):
    """One or more ranks raised, died or ran past the deadline; ``failures`` maps rank -> reason."""

    def __init__(self, failures: dict):
        self.failures = dict(failures)
        lines = "; ".join(f"rank {r}: {why}" for r, why in sorted(self.failures.items()))
        super().__init__(f"{len(self.failures)} rank(s) failed: {lines}")


def _rank_main(fn: Callable, rank: int, world_size: int, store: str, out_dir: str, timeout_s: float, args: tuple):
    import torch.distributed as dist
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            from hal import distributed
            for name in distributed.group_names():
                distributed.forget_ep_group(name)
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, whatever it is
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
    import torch
    torch.save(result, path + ".tmp")             # torch's format: float8 tensors survive it, plain pickle's do not
    os.replace(path + ".tmp", path)


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 120.0) -> list:
    """``[fn(rank, world_size, *args) for each rank]``, each computed in its own process of a
    gloo group of ``world_size`` ranks. ``fn`` and ``args`` must be picklable (a module-level
    function). ``timeout_s`` bounds both each collective and the whole run."""
    if world_size < 1:
        raise ValueError(f"run_ranks: world_size must be >= 1, got {world_size}")
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="hal-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, store, tmp, timeout_s, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s + 60         # start-up (imports) on top of the collective bound
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        failures, results = {}, []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join(5)
                failures[r] = f"still running after {timeout_s + 60:.0f} s (killed)"
                results.append(None)
                continue
            path = os.path.join(tmp, f"rank{r}.pkl")
            if not os.path.exists(path):
                failures[r] = f"exited with code {p.exitcode} without a result"
                results.append(None)
                continue
            import torch
            status, value = torch.load(path, weights_only=False)  # noqa: S614 - our own child wrote it just now
            if status != "ok":
                failures[r] = value.strip()
            results.append(value)
        if failures:
            raise RanksFailed(failures)
        return results


__all__ = ["run_ranks", "RanksFailed"]
