"""The case catalog: every contract op's conformance cases at three levels.

``quick``: tiny shapes covering every edge the contract names (T=0/1, one hot expert, empty experts,
-1 ids, groups, both scorings, K/N not multiples of 128, M=0, -1 tails, L=1, MHA/GQA/MQA/MLA,
NaN/Inf, values beyond 448, ue8m0, bf16/fp16/fp32); it runs on 2 CPU cores in CI, including under
the Triton interpreter. ``full``: the real models' shapes (GLM-5, DeepSeek-V3.2, GLM-4.5 hidden
sizes, expert counts, top-k, MLA 576/512, index heads 32/64 x 128, top_k 2048), with token and
sequence counts scaled so a GPU machine's reference evaluation finishes in minutes. ``models``:
the calls the built-in models make under ``hal run``, recorded and replayed
(:mod:`hal.conformance.cases.model_calls`).
"""
from __future__ import annotations

from hal.conformance.cases import dsa, expert_parallel, fp8, linear_attention, moe
from hal.conformance.cases._case import Case

LEVELS = ("quick", "full", "models")
_REGISTERED: dict = {}


def register_cases(op: str, cases_of_level) -> None:
    """Add the cases of an op defined outside HAL's families (:func:`hal.contract.add_op`):
    ``cases_of_level(level) -> list[Case]`` is called for each catalog request."""
    _REGISTERED[op] = cases_of_level


def catalog(level: str = "quick", ops=None) -> list[Case]:
    """Every case of ``level`` (optionally only for ``ops``), in contract op order."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    from hal.contract import CONTRACT
    if level == "models":
        from hal.conformance.cases import model_calls
        order = {op: i for i, op in enumerate(CONTRACT)}
        return sorted((c for c in model_calls.cases() if ops is None or c.op in ops), key=lambda c: order[c.op])
    everything = moe.cases(level) + dsa.cases(level) + fp8.cases(level) + linear_attention.cases(level) + \
        expert_parallel.cases(level)
    for fn in _REGISTERED.values():
        everything += fn(level)
    order = {op: i for i, op in enumerate(CONTRACT)}
    chosen = [c for c in everything if ops is None or c.op in ops]
    return sorted(chosen, key=lambda c: order[c.op])


__all__ = ["Case", "catalog", "LEVELS", "register_cases"]
