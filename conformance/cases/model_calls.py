"""The ``models`` level: the contract calls the built-in models really make, replayed as cases.

Each built-in model (``tiny-glm5``, ``tiny-deepseek-v32``, ``tiny-glm45``, ``tiny-qwen35``,
``tiny-kimi-linear``) generates
on the CPU reference for two prompts of different lengths (right padding, per-sequence ``q_offset``
/ ``k_lengths``, prefill then decode, both MLA forms; Qwen3.5 and Kimi Linear (whose KDA passes the
per-channel g [B, T, H, Dk]): ``seq_lens`` into
``causal_conv1d`` / ``gated_delta_rule``, the conv window and recurrent state carried into
decode). Every contract call is recorded with its arguments (cloned); the first call of each
distinct signature (op, argument shapes, dtypes and scalar values) becomes a case
``<model>/<n>_<op>``. A backend certified at this level has run
exactly the calls ``hal run`` makes, not only the catalog's hand-made shapes. The recording runs
once per process (a few seconds) and is deterministic: the models' weights come from fixed seeds.
"""
from __future__ import annotations

import functools

import torch

from hal.conformance.cases._case import Case

MODELS = ("tiny-glm5", "tiny-deepseek-v32", "tiny-glm45", "tiny-qwen35", "tiny-kimi-linear")
PROMPTS = ([1, 17, 42, 99, 5, 230, 311, 64, 77, 128, 9, 400], [3, 88, 150, 260, 18])
NEW_TOKENS = 2


def _clone(v):
    from hal.contract import DispatchPlan
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, DispatchPlan):
        return DispatchPlan(*(t.detach().clone() for t in v.tensors()), num_tokens=v.num_tokens, top_k=v.top_k,
                            align=v.align)
    return v


def _signature(op: str, args: tuple, kwargs: dict) -> tuple:
    from hal.contract import DispatchPlan

    def key(v):
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), v.dtype)
        if isinstance(v, DispatchPlan):
            return ("P",) + tuple(key(t) for t in v.tensors())
        return ("V", repr(v))
    return (op,) + tuple(key(a) for a in args) + tuple((k, key(v)) for k, v in sorted(kwargs.items()))


def record(model_name: str) -> list[tuple[str, tuple, dict]]:
    """The distinct contract calls ``model_name`` makes while generating :data:`NEW_TOKENS` tokens
    for :data:`PROMPTS` on the CPU reference: ``[(op, args, kwargs)]`` in call order, cloned."""
    import hal
    import hal.models as M
    from hal.contract import CONTRACT
    rt = hal.runtime("cpu")
    calls, seen = [], set()
    for op in CONTRACT:
        bound = getattr(rt, op)

        def recording(*args, __op=op, __bound=bound, **kwargs):
            sig = _signature(__op, args, kwargs)
            if sig not in seen:
                seen.add(sig)
                calls.append((__op, tuple(_clone(a) for a in args), {k: _clone(v) for k, v in kwargs.items()}))
            return __bound(*args, **kwargs)

        setattr(rt, op, recording)
    model = M.load(model_name, runtime=rt)
    M.generate(model, [list(p) for p in PROMPTS], max_new_tokens=NEW_TOKENS)
    return calls


@functools.lru_cache(maxsize=None)
def _recorded() -> tuple:
    return tuple((name, tuple(record(name))) for name in MODELS)


def cases() -> list[Case]:
    """One case per distinct recorded call of every built-in model."""
    out = []
    for name, calls in _recorded():
        for i, (op, args, kwargs) in enumerate(calls):
            out.append(Case(op, f"{name}/{i:02d}", lambda g, a=args, k=kwargs: (tuple(_clone(x) for x in a),
                                                                            {n: _clone(v) for n, v in k.items()}),
                            ("model", name)))
    return out
