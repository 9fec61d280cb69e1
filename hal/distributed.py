"""Expert-parallel groups: the processes an expert-parallel op (``ep_dispatch`` / ``ep_combine``)
exchanges tokens with, and the one transport the reference uses.

An :class:`EPGroup` is created once per ``torch.distributed`` process group with
:func:`ep_group` and named; the EP ops take that name (``group="..."``), as torch's functional
collectives take a group name, so the ops keep a plain ``torch.library`` schema. The group
``"local"`` always exists: one process, no ``torch.distributed`` at all (the exchange is the
identity), which is expert parallelism of size 1 and what single-process callers and the
contract's samples use.

The transport is ``torch.distributed.all_to_all_single`` with the row counts exchanged first
(gloo on CPUs, NCCL on GPUs, HCCL on Ascend); every payload travels as a ``uint8`` view of its
rows, bit-exact, because gloo refuses float8 tensors ("Invalid scalar type").
"""
from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Mapping, Optional

import torch

LOCAL = "local"

# what the reference's exchange offers; a backend with its own transport states its own
REFERENCE_CAPABILITIES = {
    "layouts": ("expert_major",),      # rows grouped by local expert, then (source rank, token, slot)
    "fp8_payload": True,               # e4m3 rows with 1x128 fp32 scales travel bit-exact
    "sync_free": False,                # the row counts are read on the host to size the exchange
    "max_tokens_per_rank": None,       # no limit beyond memory
}


@dataclasses.dataclass(frozen=True)
class EPGroup:
    """One expert-parallel group as seen from this process: its ``name`` (what the EP ops take),
    this process's ``rank`` in it, ``world_size``, the ``torch.distributed`` process group
    (None for the one-process group ``"local"``) and the ``capabilities`` of the exchange
    (``layouts``, ``fp8_payload``, ``sync_free``, ``max_tokens_per_rank``)."""

    name: str
    rank: int
    world_size: int
    process_group: Any = None
    capabilities: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(REFERENCE_CAPABILITIES))


_GROUPS: dict[str, EPGroup] = {LOCAL: EPGroup(LOCAL, 0, 1, None)}
_LOCK = threading.Lock()


def ep_group(process_group: Optional[Any] = None, *, name: Optional[str] = None) -> EPGroup:
    """The :class:`EPGroup` of ``process_group`` (default: torch.distributed's WORLD), created on
    first use and then reused. ``name`` defaults to the process group's own ``group_name``.
    Raises RuntimeError when torch.distributed is not initialized."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("hal.distributed.ep_group: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first, or run under torchrun); a single process "
                           f"uses the group {LOCAL!r}")
    pg = process_group if process_group is not None else dist.group.WORLD
    key = name or getattr(pg, "group_name", None) or f"pg{id(pg)}"
    with _LOCK:
        found = _GROUPS.get(key)
        if found is not None and found.process_group is pg:
            return found
        if found is not None:
            raise ValueError(f"hal.distributed.ep_group: the name {key!r} is taken by another process group")
        group = EPGroup(key, dist.get_rank(pg), dist.get_world_size(pg), pg)
        _GROUPS[key] = group
        return group


def get_ep_group(name: str) -> Optional[EPGroup]:
    """The group registered under ``name`` in this process, or None."""
    return _GROUPS.get(name)


def group_names() -> tuple[str, ...]:
    """The names of the groups registered in this process (``"local"`` first)."""
    return tuple(_GROUPS)


def forget_ep_group(name: str) -> None:
    """Drop a group (before its process group is destroyed); ``"local"`` stays."""
    if name != LOCAL:
        with _LOCK:
            _GROUPS.pop(name, None)


def _as_bytes(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` [n, ...] as a contiguous [n, bytes per row] uint8 tensor (bit-exact for any dtype)."""
    per_row = math.prod(rows.shape[1:]) * rows.element_size()
    if rows.numel() == 0:
        return torch.empty(rows.shape[0], per_row, dtype=torch.uint8, device=rows.device)
    return rows.contiguous().reshape(rows.shape[0], -1).view(torch.uint8)


def exchange_counts(group: EPGroup, send_counts: torch.Tensor) -> torch.Tensor:
    """All-to-all of one int64 per peer: ``send_counts`` [world] (rows this rank sends to each
    rank) -> [world] (rows each rank sends to this one)."""
    if group.process_group is None:
        return send_counts.clone()
    import torch.distributed as dist
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group.process_group)
    return recv


def exchange_rows(group: EPGroup, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """All-to-all of rows: ``rows`` [n, ...] ordered by destination rank, ``send_counts[r]`` of them
    for rank r; returns the [sum(recv_counts), ...] rows received, ordered by source rank. Any
    dtype (sent as bytes); the counts come from :func:`exchange_counts`."""
    if group.process_group is None:
        return rows.clone()
    import torch.distributed as dist
    payload = _as_bytes(rows)
    recv = torch.empty(sum(recv_counts), payload.shape[1], dtype=torch.uint8, device=rows.device)
    dist.all_to_all_single(recv, payload, output_split_sizes=list(recv_counts), input_split_sizes=list(send_counts),
                           group=group.process_group)
    return recv.view(rows.dtype).reshape(sum(recv_counts), *rows.shape[1:]) if payload.shape[1] else \
        torch.empty(sum(recv_counts), *rows.shape[1:], dtype=rows.dtype, device=rows.device)


__all__ = ["EPGroup", "LOCAL", "REFERENCE_CAPABILITIES", "ep_group", "get_ep_group", "group_names",
           "forget_ep_group", "exchange_counts", "exchange_rows"]
