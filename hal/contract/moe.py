"""Contract family 1: expert dispatch (MoE routing, permutation, grouped expert FFN, combine)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from hal.contract import _checks as c
from hal.contract import _samples as smp
from hal.contract._spec import ExactBudget, FloatBudget, SelectionBudget, TensorMeta, data_checks, op_spec
from hal.errors import ContractError

SCORINGS = ("sigmoid", "softmax")
ACTIVATIONS = ("silu",)


@dataclasses.dataclass
class DispatchPlan:
    """The result of ``moe_dispatch``: token copies permuted so each expert's rows are contiguous.

    - ``hidden`` [N, H]: the permuted rows (input dtype); padding rows are zero.
    - ``tokens_per_expert`` [E] int32: real (unpadded) rows per expert.
    - ``offsets`` [E+1] int32: start of each expert's segment (segments padded to ``align``);
      ``offsets[-1] == N``.
    - ``source`` [N] int64: for each row, ``t * top_k + slot`` of the token copy it holds; -1 on
      padding rows.
    - ``num_tokens`` (T), ``top_k`` (k), ``align``: the dispatch parameters.
    """

    hidden: torch.Tensor
    tokens_per_expert: torch.Tensor
    offsets: torch.Tensor
    source: torch.Tensor
    num_tokens: int
    top_k: int
    align: int = 1

    @property
    def num_experts(self) -> int:
        return int(self.tokens_per_expert.shape[0])

    def to(self, device) -> "DispatchPlan":
        """The same plan with every tensor moved to ``device``."""
        return dataclasses.replace(
            self, hidden=self.hidden.to(device), tokens_per_expert=self.tokens_per_expert.to(device),
            offsets=self.offsets.to(device), source=self.source.to(device))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden, tokens_per_expert, offsets, source): the plan as the torch.library ops carry it."""
        return self.hidden, self.tokens_per_expert, self.offsets, self.source


def _route_args(op, router_logits, top_k, scoring, correction_bias, n_group, topk_group,
                renormalize, scaling_factor):
    c.tensor(op, "router_logits", router_logits, ndim=2, dtypes=c.FLOAT_DTYPES, dims="[T, E]")
    E = router_logits.shape[1]
    if E < 1:
        raise ContractError(op, "router_logits", "at least one expert (E >= 1)", f"shape {tuple(router_logits.shape)}")
    c.choice(op, "scoring", scoring, SCORINGS)
    n_group = c.integer(op, "n_group", n_group, lo=1)
    if E % n_group:
        raise ContractError(op, "n_group", f"a divisor of the expert count E={E}", n_group)
    c.integer(op, "topk_group", topk_group, lo=1, hi=n_group, what=f"1 <= topk_group <= n_group={n_group}")
    kept = topk_group * (E // n_group)
    c.integer(op, "top_k", top_k, lo=1, hi=kept,
              what=f"1 <= top_k <= {kept} (E={E}" + (f", {topk_group} kept groups of {E // n_group})" if n_group > 1 else ")"))
    if correction_bias is not None:
        c.tensor(op, "correction_bias", correction_bias, ndim=1, dtypes=c.FLOAT_DTYPES, dims="[E]")
        c.shape(op, "correction_bias", correction_bias, (E,), "[E]")
        c.same_device(op, "router_logits", router_logits, correction_bias=correction_bias)
    c.boolean(op, "renormalize", renormalize)
    c.number(op, "scaling_factor", scaling_factor)


def _sample_plan(g, T=4, k=2, E=4, H=16) -> DispatchPlan:
    return DispatchPlan(*smp.plan_fields(g, T, k, E, H), num_tokens=T, top_k=k)


def _route_meta(a):
    T = a.router_logits.shape[0]
    return TensorMeta((T, a.top_k), torch.float32), TensorMeta((T, a.top_k), torch.int32)


@op_spec(family="moe", summary="router logits [T,E] -> top-k expert weights [T,k] fp32 and ids [T,k] int32 "
         "(sigmoid/softmax, correction bias, group-limited, renormalized, scaled)",
         outputs={"weights": FloatBudget(abs_floor=1e-6), "expert_ids": SelectionBudget()},
         meta=_route_meta, returns="tuple", selection_scores="hal.conformance.scores:route_scores",
         paired={"weights": "expert_ids"},
         sample=lambda g: ((smp.rnd(g, 4, 8),), dict(top_k=2, correction_bias=smp.rnd(g, 8), n_group=2, topk_group=1)))
def moe_route(router_logits: torch.Tensor, *, top_k: int, scoring: str = "sigmoid",
              correction_bias: Optional[torch.Tensor] = None, n_group: int = 1, topk_group: int = 1,
              renormalize: bool = True, scaling_factor: float = 1.0):
    """Pick each token's top-k experts.

    router_logits [T, E] fp32/bf16/fp16 (computed in fp32); correction_bias [E] or None.
    sigmoid: ``s = sigmoid(logits)``; softmax: ``s = softmax(logits, -1)``. Selection score
    ``c = s + correction_bias`` (the bias only selects, it never weights). If ``n_group > 1``,
    the experts form n_group equal consecutive groups and each group gets a score, as DeepSeek's
    ``Gate`` does: without a correction_bias the group's maximum ``c`` (DeepSeek-V2's
    group_limited_greedy), with one the sum of its two highest ``c`` (DeepSeek-V3 / V3.2, GLM;
    the highest alone when a group holds one expert); a NaN counts as -inf there. The
    ``topk_group`` best groups are kept (equal group scores: the lower group index wins) and the
    other groups' experts are never selected (as if their score were -inf, but below every kept
    expert). ``ids = topk(c, top_k)`` over the kept
    experts, ordered by descending ``c``, ties toward the lower expert index; ``w = s[ids]``; if
    renormalize ``w /= w.sum(-1) + 1e-20``; ``w *= scaling_factor``. A NaN selection score ranks
    below every number, -inf included (it is picked only when no kept expert with a number is
    left), and its weight carries the NaN (with renormalize, the whole row's weights).
    Returns ``(weights [T, k] fp32, expert_ids [T, k] int32)``.
    Errors: top_k < 1 or > the experts in the kept groups, n_group not dividing E, topk_group
    outside [1, n_group], bias of the wrong shape.
    """
    _route_args("moe_route", router_logits, top_k, scoring, correction_bias, n_group, topk_group,
                renormalize, scaling_factor)


@op_spec(family="moe", summary="permute token copies so each expert's rows are contiguous "
         "(stable by expert, token, slot; segments padded to align) -> DispatchPlan",
         outputs={"hidden": ExactBudget(), "tokens_per_expert": ExactBudget(), "offsets": ExactBudget(),
                  "source": ExactBudget()}, returns="plan",
         meta=lambda a: (TensorMeta((None, a.hidden.shape[1]), a.hidden.dtype), TensorMeta((a.num_experts,), torch.int32),
                         TensorMeta((a.num_experts + 1,), torch.int32), TensorMeta((None,), torch.int64)),
         sample=lambda g: ((smp.rnd(g, 4, 16), torch.randint(-1, 4, (4, 2), generator=g, dtype=torch.int32), 4),
                           dict(align=2)))
def moe_dispatch(hidden: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, *, align: int = 1):
    """Group token copies by expert.

    hidden [T, H] (any float dtype), expert_ids [T, k] int32/int64 with values in [0, E) or -1
    ("no expert": produces no row), num_experts 1 <= E <= 65536, 1 <= align <= 1024.
    Rows are ordered by expert, then token, then slot (stable). Each expert's segment is padded
    with zero rows to a multiple of ``align``. Returns a :class:`DispatchPlan` with hidden [N, H],
    tokens_per_expert [E] int32 (unpadded counts), offsets [E+1] int32 (padded segment starts),
    source [N] int64 (``t * k + slot``, -1 on padding rows).
    """
    op = "moe_dispatch"
    c.tensor(op, "hidden", hidden, ndim=2, dtypes=c.FLOAT_DTYPES, dims="[T, H]")
    c.tensor(op, "expert_ids", expert_ids, ndim=2, dtypes=c.INT_DTYPES, dims="[T, k]")
    if expert_ids.shape[0] != hidden.shape[0]:
        raise ContractError(op, "expert_ids", f"T={hidden.shape[0]} rows (as hidden)", f"shape {tuple(expert_ids.shape)}")
    c.same_device(op, "hidden", hidden, expert_ids=expert_ids)
    c.integer(op, "num_experts", num_experts, lo=1, hi=c.MAX_EXPERTS)
    c.integer(op, "align", align, lo=1, hi=c.MAX_ALIGN)
    if data_checks(expert_ids):
        c.value_range(op, "expert_ids", expert_ids, -1, num_experts - 1, f"values in [0, {num_experts}) or -1")


def _plan(op: str, plan) -> None:
    if not isinstance(plan, DispatchPlan):
        raise ContractError(op, "plan", "a hal.DispatchPlan (from moe_dispatch)", type(plan).__name__)
    c.tensor(op, "plan.hidden", plan.hidden, ndim=2, dtypes=c.FLOAT_DTYPES, dims="[N, H]")
    c.tensor(op, "plan.tokens_per_expert", plan.tokens_per_expert, ndim=1, dtypes=(torch.int32,), dims="[E]")
    E = plan.tokens_per_expert.shape[0]
    c.tensor(op, "plan.offsets", plan.offsets, ndim=1, dtypes=(torch.int32,), dims="[E+1]")
    c.shape(op, "plan.offsets", plan.offsets, (E + 1,), "[E+1]")
    c.tensor(op, "plan.source", plan.source, ndim=1, dtypes=(torch.int64,), dims="[N]")
    N = plan.hidden.shape[0]
    c.shape(op, "plan.source", plan.source, (N,), "[N] (rows of plan.hidden)")
    if E > c.MAX_EXPERTS:
        raise ContractError(op, "plan.tokens_per_expert", f"at most {c.MAX_EXPERTS} experts", f"shape {(E,)}")
    T = c.integer(op, "plan.num_tokens", plan.num_tokens, lo=0)
    k = c.integer(op, "plan.top_k", plan.top_k, lo=0, hi=c.MAX_TOP_K)
    align = c.integer(op, "plan.align", plan.align, lo=1, hi=c.MAX_ALIGN)
    c.same_device(op, "plan.hidden", plan.hidden, **{"plan.tokens_per_expert": plan.tokens_per_expert,
                                                     "plan.offsets": plan.offsets, "plan.source": plan.source})
    if data_checks(plan.offsets):
        _plan_data(op, plan, E, N, T, k, align)


def _plan_data(op: str, plan, E: int, N: int, T: int, k: int, align: int) -> None:
    """A plan is bookkeeping the kernels trust (they index with it): it must be exactly what
    moe_dispatch makes. Segment e is ``offsets[e] .. offsets[e+1]``, ``ceil(counts[e] / align) *
    align`` rows long; its first ``counts[e]`` rows hold token copies (``source`` in [0, T*k), each
    copy at most once) and the rest are padding (``source == -1``)."""
    counts, starts = plan.tokens_per_expert.long(), plan.offsets.long()
    if E and int(counts.min()) < 0:
        raise ContractError(op, "plan.tokens_per_expert", "counts >= 0", f"a count {int(counts.min())}")
    padded = (counts + align - 1) // align * align
    if int(starts[0]) != 0 or int(starts[-1]) != N or not torch.equal(starts[1:] - starts[:-1], padded):
        raise ContractError(op, "plan.offsets", f"segment starts from 0 to N={N}, segment e holding "
                            f"ceil(tokens_per_expert[e] / align={align}) * align rows (as moe_dispatch makes them)",
                            starts[:9].tolist())
    c.value_range(op, "plan.source", plan.source, -1, T * k - 1, f"values in [0, T*k={T * k}) or -1")
    # real rows: +1 where a segment starts, -1 where its real rows end, summed along the rows
    edges = torch.zeros(N + 1, dtype=torch.int64, device=starts.device)
    edges.index_add_(0, starts[:-1], torch.ones_like(counts)).index_add_(0, starts[:-1] + counts, -torch.ones_like(counts))
    real = edges.cumsum(0)[:N] > 0
    if not torch.equal(plan.source >= 0, real):
        row = int((real != (plan.source >= 0)).nonzero()[0, 0])
        raise ContractError(op, "plan.source", "a token copy (>= 0) on each segment's first tokens_per_expert rows "
                            "and -1 on its padding rows", f"source[{row}] = {int(plan.source[row])}")
    copies = plan.source[real].sort().values
    if bool((copies[1:] == copies[:-1]).any()):
        raise ContractError(op, "plan.source", "each token copy t*k+slot on at most one row", "a repeated copy")


def _experts_weights(op, E, H, ref_name, ref, w_gate_up, w_down, activation, w_gate_up_scale, w_down_scale):
    """Check expert weights (and fp8 scales) for E experts of hidden size H on ``ref``'s device."""
    c.tensor(op, "w_gate_up", w_gate_up, ndim=3, dtypes=(torch.bfloat16, torch.float16, torch.float32, c.FP8), dims="[E, 2I, H]")
    c.tensor(op, "w_down", w_down, ndim=3, dtypes=(w_gate_up.dtype,), dims="[E, H, I] (same dtype as w_gate_up)")
    two_i = w_gate_up.shape[1]
    if two_i % 2 or two_i == 0:
        raise ContractError(op, "w_gate_up", "an even, non-zero 2I (gate and up stacked)", f"shape {tuple(w_gate_up.shape)}")
    I = two_i // 2
    c.shape(op, "w_gate_up", w_gate_up, (E, 2 * I, H), f"[E={E}, 2I, H={H}]")
    c.shape(op, "w_down", w_down, (E, H, I), f"[E={E}, H={H}, I={I}]")
    c.choice(op, "activation", activation, ACTIVATIONS)
    c.same_device(op, ref_name, ref, w_gate_up=w_gate_up, w_down=w_down)
    fp8 = w_gate_up.dtype == c.FP8
    for name, s, rows, cols in (("w_gate_up_scale", w_gate_up_scale, 2 * I, H), ("w_down_scale", w_down_scale, H, I)):
        if fp8:
            if s is None:
                raise ContractError(op, name, "128x128 block scales (float8 weights need them)", None)
            c.tensor(op, name, s, ndim=3, dtypes=(torch.float32,))
            c.shape(op, name, s, (E, c.ceil_div(rows, 128), c.ceil_div(cols, 128)), "[E, ceil(rows/128), ceil(cols/128)]")
            c.same_device(op, ref_name, ref, **{name: s})
            if data_checks(s):
                c.finite_positive_scales(op, name, s)
        elif s is not None:
            raise ContractError(op, name, "None (scales only go with float8_e4m3fn weights)", "a tensor")


@op_spec(family="moe", summary="grouped SwiGLU expert FFN over a DispatchPlan (bf16, or fp8 weights with "
         "128x128 block scales) -> [N, H]", outputs={"out": FloatBudget(abs_floor=1e-5)},
         meta=lambda a: (TensorMeta(tuple(a.plan.hidden.shape), a.plan.hidden.dtype),),
         sample=lambda g: ((_sample_plan(g), smp.rnd(g, 4, 16, 16, scale=0.1), smp.rnd(g, 4, 16, 8, scale=0.1)), {}))
def moe_experts(plan: DispatchPlan, w_gate_up: torch.Tensor, w_down: torch.Tensor, *, activation: str = "silu",
                w_gate_up_scale: Optional[torch.Tensor] = None, w_down_scale: Optional[torch.Tensor] = None):
    """Run each expert's SwiGLU FFN on its rows of the plan.

    For expert e's rows x: ``h = x @ w_gate_up[e].T`` ([2I]), ``g, u = h.chunk(2)``,
    ``y = (silu(g) * u) @ w_down[e].T``. w_gate_up [E, 2I, H], w_down [E, H, I], both bf16 / fp16
    / fp32, or both float8_e4m3fn with 128x128 block scales w_gate_up_scale [E, ceil(2I/128),
    ceil(H/128)] and w_down_scale [E, ceil(H/128), ceil(I/128)] fp32; with fp8 weights the
    activations (x and ``silu(g) * u``) are quantized per token per 128 channels as
    ``fp8_quantize`` does and each GEMM is an ``fp8_gemm``.
    Working precision (what a bf16 kernel does and the reference mirrors): GEMMs accumulate in
    fp32; ``h`` and ``silu(g) * u`` are rounded to the activation dtype between the GEMMs.
    Padding rows (source == -1) produce zeros. Returns [N, H] in plan.hidden's dtype.
    """
    op = "moe_experts"
    _plan(op, plan)
    _experts_weights(op, plan.num_experts, plan.hidden.shape[1], "plan.hidden", plan.hidden, w_gate_up, w_down,
                     activation, w_gate_up_scale, w_down_scale)


@op_spec(family="moe", summary="out[t] = sum_slot weights[t,slot] * expert_out[row(t,slot)] (fp32 accumulate) -> [T, H]",
         outputs={"out": FloatBudget(abs_floor=1e-6)},
         meta=lambda a: (TensorMeta((a.plan.num_tokens, a.expert_out.shape[1]), a.expert_out.dtype),),
         sample=lambda g: ((smp.rnd(g, 8, 16), _sample_plan(g), torch.rand(4, 2, generator=g)), {}))
def moe_combine(expert_out: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor):
    """Weighted sum of each token's expert outputs.

    expert_out [N, H] (rows as in plan), weights [T, k] fp32 (from moe_route).
    ``out[t] = sum_slot weights[t, slot] * expert_out[row(t, slot)]`` accumulated in fp32 in slot
    order; returned [T, H] in expert_out's dtype. Token copies with no expert (-1 ids) contribute
    nothing; a token with no expert gets zeros.
    """
    op = "moe_combine"
    _plan(op, plan)
    c.tensor(op, "expert_out", expert_out, ndim=2, dtypes=c.FLOAT_DTYPES, dims="[N, H]")
    c.shape(op, "expert_out", expert_out, (plan.hidden.shape[0], plan.hidden.shape[1]), "[N, H] (as plan.hidden)")
    c.tensor(op, "weights", weights, ndim=2, dtypes=c.FLOAT_DTYPES, dims="[T, k]")
    c.shape(op, "weights", weights, (plan.num_tokens, plan.top_k), "[T, k] (as the plan was dispatched)")
    c.same_device(op, "expert_out", expert_out, weights=weights, **{"plan.source": plan.source})


@op_spec(family="moe", summary="route -> dispatch -> experts -> combine, fused where a backend can -> [T, H]",
         outputs={"out": FloatBudget(abs_floor=1e-5)},
         meta=lambda a: (TensorMeta(tuple(a.hidden.shape), a.hidden.dtype),),
         sample=lambda g: ((smp.rnd(g, 4, 128), smp.rnd(g, 4, 4), smp.fp8_codes(g, 4, 32, 128), smp.fp8_codes(g, 4, 128, 16)),
                           dict(top_k=2, w_gate_up_scale=smp.scales(g, 4, 1, 1), w_down_scale=smp.scales(g, 4, 1, 1))))
def moe_forward(hidden: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, *,
                top_k: int, scoring: str = "sigmoid", correction_bias: Optional[torch.Tensor] = None,
                n_group: int = 1, topk_group: int = 1, renormalize: bool = True, scaling_factor: float = 1.0,
                activation: str = "silu", w_gate_up_scale: Optional[torch.Tensor] = None,
                w_down_scale: Optional[torch.Tensor] = None):
    """The routed-expert half of a MoE layer: ``moe_route`` -> ``moe_dispatch`` -> ``moe_experts``
    -> ``moe_combine``.

    hidden [T, H], router_logits [T, E]; the routing keywords are ``moe_route``'s, the weight
    arguments ``moe_experts``'. Returns [T, H] in hidden's dtype. Backends may fuse; results must
    match the composition within ``moe_experts``' tolerance.
    """
    op = "moe_forward"
    c.tensor(op, "hidden", hidden, ndim=2, dtypes=c.FLOAT_DTYPES, dims="[T, H]")
    _route_args(op, router_logits, top_k, scoring, correction_bias, n_group, topk_group, renormalize, scaling_factor)
    if router_logits.shape[0] != hidden.shape[0]:
        raise ContractError(op, "router_logits", f"T={hidden.shape[0]} rows (as hidden)", f"shape {tuple(router_logits.shape)}")
    c.same_device(op, "hidden", hidden, router_logits=router_logits)
    _experts_weights(op, router_logits.shape[1], hidden.shape[1], "hidden", hidden, w_gate_up, w_down, activation,
                     w_gate_up_scale, w_down_scale)
