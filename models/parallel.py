"""Tensor-parallel groups and the slice of a model one rank holds.

Layout: the world of W ranks splits into TP groups of T consecutive ranks (ranks ``g*T .. g*T+T-1``
form group g; T divides W). Inside a TP group, attention heads (MLA, GQA, and the linear-attention
heads of Gated DeltaNet / KDA), dense-MLP and shared-expert intermediate columns are split:
column-parallel linears (q / kv_b / k / v / gate / up; fused ones such as Qwen3.5's
``in_proj_qkv`` keep several row ranges, see :class:`FusedColumns`) keep this rank's heads or
intermediate rows, row-parallel ones (o / down) keep the matching input columns and sum the ranks'
partial outputs with an all-reduce over the group. The routed experts stay expert
parallel over all W ranks (:mod:`hal.distributed`'s EP group); every rank runs the same batch.

A :class:`TPGroup` is made once per process with :func:`tp_group` (every rank must call it: it
creates all W / T process groups) and named, like an EP group; ``hal.models.load(..., tp_group=name)``
takes the name. The group ``"local"`` (T = 1, no torch.distributed) always exists.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Optional

import torch

LOCAL = "local"


@dataclasses.dataclass(frozen=True)
class TPGroup:
    """One tensor-parallel group seen from this process: ``name``, this process's ``rank`` in the
    group (0 .. size-1), ``size`` (T) and the ``torch.distributed`` process group (None for the
    one-process group ``"local"``)."""

    name: str
    rank: int
    size: int
    process_group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group's ranks (same shape and dtype). On gloo the sum runs in fp32
        (gloo's reduction of bfloat16 is not available everywhere); elsewhere in ``x``'s dtype."""
        if self.process_group is None or self.size == 1:
            return x
        import torch.distributed as dist
        wide = dist.get_backend(self.process_group) == "gloo" and x.dtype != torch.float32
        buf = x.float() if wide else x.contiguous().clone()
        dist.all_reduce(buf, group=self.process_group)
        return buf.to(x.dtype) if wide else buf

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x [..., n]`` concatenated in rank order along the last dim: ``[..., size * n]``."""
        if self.process_group is None or self.size == 1:
            return x
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=-1)


_GROUPS: dict[str, TPGroup] = {LOCAL: TPGroup(LOCAL, 0, 1, None)}
_LOCK = threading.Lock()


def tp_group(size: int, *, name: Optional[str] = None) -> TPGroup:
    """This rank's TP group when torch.distributed's world splits into groups of ``size``
    consecutive ranks (created on first use, then reused; every rank must make the same call, since
    each process group is created collectively). ``size`` 1 returns ``"local"``. Raises ValueError
    when ``size`` does not divide the world size, RuntimeError when torch.distributed is not initialized."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor parallelism: the TP size must be an integer >= 1, got {size!r}")
    if size == 1:
        return _GROUPS[LOCAL]
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"hal.models.parallel.tp_group: a TP size of {size} needs torch.distributed "
                           "(call torch.distributed.init_process_group first, or run under torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"tensor parallelism: the TP size {size} does not divide the world size {world} "
                         "(TP groups are consecutive ranks)")
    key = name or f"tp{size}"
    with _LOCK:
        if key in _GROUPS:
            found = _GROUPS[key]
            if found.size != size:
                raise ValueError(f"tp_group: the name {key!r} is taken by a group of size {found.size}")
            return found
        mine = None
        for g in range(world // size):                     # every rank creates every group, in the same order
            ranks = list(range(g * size, (g + 1) * size))
            pg = dist.new_group(ranks)
            if rank in ranks:
                mine = TPGroup(key, rank - g * size, size, pg)
        _GROUPS[key] = mine
        return mine


def get_tp_group(name: str) -> Optional[TPGroup]:
    """The TP group registered under ``name`` in this process, or None."""
    return _GROUPS.get(name)


def forget_tp_group(name: str) -> None:
    """Drop a group (before its process group is destroyed); ``"local"`` stays."""
    if name != LOCAL:
        with _LOCK:
            _GROUPS.pop(name, None)


@dataclasses.dataclass(frozen=True)
class Sharding:
    """What one rank holds: its TP group (``tp``) and its EP group (``ep``: a
    :class:`hal.distributed.EPGroup`, or None for all experts on every rank)."""

    tp: TPGroup = _GROUPS[LOCAL]
    ep: Any = None

    def part(self, n: int, what: str) -> tuple[int, int]:
        """This TP rank's contiguous share [start, stop) of ``n`` items (heads, intermediate rows);
        ValueError naming ``what`` and both numbers when T does not divide n."""
        T = self.tp.size
        if n % T:
            raise ValueError(f"tensor parallelism: the model's {n} {what} do not divide over a TP group of {T} "
                             f"ranks (choose a TP size that divides {n})")
        k = n // T
        return self.tp.rank * k, (self.tp.rank + 1) * k

    def rows(self, n: int, width: int, what: str, offset: int = 0) -> tuple[int, int]:
        """The rows [start, stop) of this TP rank's heads in a tensor laid out as ``n`` heads of
        ``width`` rows each, starting at row ``offset`` (e.g. the k part of a fused q / k / v
        projection); ValueError as :meth:`part` when T does not divide n."""
        h0, h1 = self.part(n, what)
        return offset + h0 * width, offset + h1 * width

    def experts(self, E: int) -> tuple[int, int]:
        """This rank's routed experts [start, stop) of ``E`` (all of them without EP); ValueError
        when the EP world size does not divide E."""
        if self.ep is None or self.ep.world_size == 1:
            return 0, E
        W = self.ep.world_size
        if E % W:
            raise ValueError(f"expert parallelism: the model's {E} routed experts do not divide over {W} ranks "
                             f"(choose a world size that divides {E})")
        return self.ep.rank * E // W, (self.ep.rank + 1) * E // W


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """``ranges`` ([(start, stop), ...] in order) with adjacent ones joined: [(0, 4), (4, 8), (10, 12)]
    -> [(0, 8), (10, 12)]; so a whole tensor (TP size 1) reads as one range."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@dataclasses.dataclass
class FusedColumns:
    """A column-parallel slice of a fused projection that keeps several row ranges (Qwen3.5's
    ``in_proj_qkv`` under TP: this rank's q, k and v rows), each a :class:`hal.models.layers.Linear`
    of its own (used when they cannot be one weight: FP8 ranges cut inside a 128-row scale block).
    ``x [..., in] -> [..., sum of the parts' out_features]``: the parts' outputs concatenated."""

    parts: tuple

    def __call__(self, x: torch.Tensor, rt) -> torch.Tensor:
        return torch.cat([p(x, rt) for p in self.parts], dim=-1)

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)


__all__ = ["TPGroup", "LOCAL", "tp_group", "get_tp_group", "forget_tp_group", "Sharding", "merge_ranges",
           "FusedColumns"]
