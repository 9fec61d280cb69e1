"""Contract family 4: linear attention (Gated DeltaNet / Kimi Delta Attention and its short causal conv).

One op per function, not per algorithm: ``gated_delta_rule`` is defined by its token-by-token
recurrence, and the chunked form (prefill kernels) and the recurrent form (decode kernels) are two
ways of computing that one function. ``causal_conv1d`` likewise covers prefill and the
single-step update (T = 1 with a conv state) with one definition.
"""
from __future__ import annotations

from typing import Optional

import torch

from hal.contract import _checks as c
from hal.contract import _samples as smp
from hal.contract._spec import ExactBudget, FloatBudget, TensorMeta, data_checks, op_spec
from hal.errors import ContractError

CONV_ACTIVATIONS = ("none", "silu")


def _lengths_and_slots(op: str, B: int, T: int, state, state_name: str, state_indices, seq_lens):
    """Shared checks of the per-sequence arguments: ``seq_lens`` [B] in [0, T]; ``state_indices``
    [B] selecting rows of ``state`` (which it requires)."""
    if seq_lens is not None:
        c.tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=c.INT_DTYPES, dims="[B]")
        c.shape(op, "seq_lens", seq_lens, (B,), "[B]")
        if data_checks(seq_lens):
            c.value_range(op, "seq_lens", seq_lens, 0, T, f"values in [0, T={T}]")
    if state_indices is not None:
        if state is None:
            raise ContractError(op, "state_indices", f"None (it selects rows of {state_name}, which is None)",
                                "a tensor")
        c.tensor(op, "state_indices", state_indices, ndim=1, dtypes=c.INT_DTYPES, dims="[B]")
        c.shape(op, "state_indices", state_indices, (B,), "[B]")
        N = state.shape[0]
        if data_checks(state_indices):
            c.value_range(op, "state_indices", state_indices, 0, N - 1, f"values in [0, N={N}) (rows of {state_name})")


def _log_decay_values(op: str, g: torch.Tensor) -> None:
    """g must be finite and <= 0 (a data check: CPU or checked mode only)."""
    if not g.numel():
        return
    bad = ~(torch.isfinite(g) & (g <= 0))
    if bool(bad.any()):
        raise ContractError(op, "g", "finite log-decays <= 0", f"values such as {g[bad].flatten()[:3].tolist()}")


def _gdr_meta(a):
    B, T = a.q.shape[:2]
    Hv, Dv = a.v.shape[2], a.v.shape[3]
    return (TensorMeta((B, T, Hv, Dv), a.q.dtype), TensorMeta((B, Hv, a.q.shape[3], Dv), torch.float32))


def _gdr_sample(g):
    B, T, Hk, Hv, Dk, Dv = 2, 5, 1, 2, 8, 8
    return ((smp.rnd(g, B, T, Hk, Dk), smp.rnd(g, B, T, Hk, Dk), smp.rnd(g, B, T, Hv, Dv),
             -torch.rand(B, T, Hv, generator=g) * 0.5 - 0.01, torch.rand(B, T, Hv, generator=g) * 0.9 + 0.05),
            dict(scale=Dk ** -0.5, initial_state=smp.rnd(g, 3, Hv, Dk, Dv, scale=0.1),
                 state_indices=torch.tensor([2, 0]), seq_lens=torch.tensor([5, 3]), qk_l2norm=True))


@op_spec(family="linear_attention",
         summary="gated delta rule (Gated DeltaNet; KDA with per-channel g): S <- exp(g) S, S <- S + k (beta (v - S^T k))^T, "
                 "o = S^T (scale q) -> (out [B,T,Hv,Dv], final_state [B,Hv,Dk,Dv] fp32)",
         outputs={"out": FloatBudget(multiple=4.0, abs_floor=1e-4, calc_diff_floor=1e-6),
                  "final_state": FloatBudget(multiple=4.0, abs_floor=1e-4, calc_diff_floor=1e-6)},
         returns="tuple", meta=_gdr_meta, sample=_gdr_sample)
def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
                     scale: float, initial_state: Optional[torch.Tensor] = None,
                     state_indices: Optional[torch.Tensor] = None, seq_lens: Optional[torch.Tensor] = None,
                     qk_l2norm: bool = False):
    """The gated delta rule over a batch of sequences (Qwen3-Next / Qwen3.5 Gated DeltaNet; Kimi
    Delta Attention when g is per channel), with its recurrent state carried in and out.

    q, k [B, T, Hk, Dk], v [B, T, Hv, Dv] (one dtype: bf16, fp16 or fp32), Hk divides Hv: value
    head h reads query/key head ``h // (Hv / Hk)`` (consecutive value heads share a key head, as
    transformers' ``repeat_interleave``). g fp32 log-decay, [B, T, Hv] (one per head, Gated
    DeltaNet) or [B, T, Hv, Dk] (one per key channel, KDA); every value finite and <= 0 (checked
    on CPU tensors and in checked mode). beta [B, T, Hv] in q's dtype or fp32. scale: the query
    scale (the models pass ``Dk ** -0.5``).
    With ``qk_l2norm`` q and k are first normalized per head in fp32:
    ``x / sqrt(sum(x * x) + 1e-6)`` (FLA's and transformers' ``use_qk_l2norm_in_kernel``).
    The state of each (sequence b, value head h) is a [Dk, Dv] matrix S; token t of sequence b,
    in order, computes (d = exp(g[b,t,h]) broadcast over rows, or exp(g[b,t,h,:]) per row)::

        S = d * S                                     # decay first, then the delta update
        u = beta[b,t,h] * (v[b,t,h] - S^T k[b,t,h])   # [Dv]
        S = S + outer(k[b,t,h], u)
        out[b,t,h] = S^T (scale * q[b,t,h])           # [Dv], read after the update

    in fp32 (the reference: fp64 in its float64 evaluation); out is returned in q's dtype.
    Initial state: zeros when ``initial_state`` is None; else ``initial_state`` fp32 [B, Hv, Dk, Dv],
    or, with ``state_indices`` [B] int (values in [0, N)), a pool [N, Hv, Dk, Dv] from which
    sequence b starts at row ``state_indices[b]`` (decode with per-sequence state slots; rows may
    repeat). Variable lengths: ``seq_lens`` [B] int in [0, T] (default T) -- sequence b is
    ``t < seq_lens[b]`` (right padding): padded positions give out = 0 and leave the state alone.
    Returns ``(out [B, T, Hv, Dv], final_state [B, Hv, Dk, Dv] fp32)``: the state after each
    sequence's last token (its initial state when its length is 0). Inputs are never modified;
    the caller writes final_state back to its slots. T = 0 and B = 0 are legal.
    Chunked == recurrent: splitting the sequence into chunks of any size C (C need not divide T),
    computing each chunk's outputs from the state at its start plus its own tokens (the
    WY / UT-transform form FLA uses) and carrying the state to the next chunk gives the same
    function; the chunk size is not part of the contract, and a call split into two calls (the
    first's final_state as the second's initial_state) equals one call. Hence one op, not two
    (chunked prefill, recurrent decode): they are two algorithms for this one function, so one
    definition, one budget and one case catalog hold a backend to both, and the backend picks
    per call (e.g. the recurrence for a few tokens per sequence, chunks for a prefill).
    Stability: the recurrence stays bounded when ``0 <= beta * |k|^2 <= 2`` (l2-normalized k and
    beta in [0, 1], as the models use it); it is not checked. NaN / Inf in q, k, v, beta or the
    initial state propagate through the affected (sequence, head).
    """
    op = "gated_delta_rule"
    c.tensor(op, "q", q, ndim=4, dtypes=c.FLOAT_DTYPES, dims="[B, T, Hk, Dk]")
    B, T, Hk, Dk = q.shape
    if Hk < 1 or Dk < 1:
        raise ContractError(op, "q", "Hk >= 1 and Dk >= 1", f"shape {tuple(q.shape)}")
    c.tensor(op, "k", k, ndim=4, dtypes=(q.dtype,), dims="[B, T, Hk, Dk] (same dtype as q)")
    c.shape(op, "k", k, (B, T, Hk, Dk), "[B, T, Hk, Dk] (as q)")
    c.tensor(op, "v", v, ndim=4, dtypes=(q.dtype,), dims="[B, T, Hv, Dv] (same dtype as q)")
    Hv, Dv = v.shape[2], v.shape[3]
    if tuple(v.shape[:2]) != (B, T) or Hv < 1 or Hv % Hk or Dv < 1:
        raise ContractError(op, "v", f"shape [B={B}, T={T}, Hv, Dv] with Hv a multiple of Hk={Hk}, Dv >= 1",
                            f"shape {tuple(v.shape)}")
    c.tensor(op, "g", g, dtypes=(torch.float32,))
    if tuple(g.shape) not in ((B, T, Hv), (B, T, Hv, Dk)):
        raise ContractError(op, "g", f"shape ({B}, {T}, {Hv}) [B, T, Hv] or ({B}, {T}, {Hv}, {Dk}) [B, T, Hv, Dk]",
                            f"shape {tuple(g.shape)}")
    c.tensor(op, "beta", beta, ndim=3, dtypes=tuple(dict.fromkeys((q.dtype, torch.float32))),
             dims="[B, T, Hv]")
    c.shape(op, "beta", beta, (B, T, Hv), "[B, T, Hv]")
    c.number(op, "scale", scale)
    if initial_state is not None:
        c.tensor(op, "initial_state", initial_state, ndim=4, dtypes=(torch.float32,), dims="[B or N, Hv, Dk, Dv]")
        if state_indices is None:
            c.shape(op, "initial_state", initial_state, (B, Hv, Dk, Dv), "[B, Hv, Dk, Dv]")
        elif tuple(initial_state.shape[1:]) != (Hv, Dk, Dv) or initial_state.shape[0] < 1:
            raise ContractError(op, "initial_state", f"shape [N >= 1, Hv={Hv}, Dk={Dk}, Dv={Dv}] (a pool of state slots)",
                                f"shape {tuple(initial_state.shape)}")
    c.boolean(op, "qk_l2norm", qk_l2norm)
    c.same_device(op, "q", q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, state_indices=state_indices,
                  seq_lens=seq_lens)
    _lengths_and_slots(op, B, T, initial_state, "initial_state", state_indices, seq_lens)
    if data_checks(g):
        _log_decay_values(op, g)


def _conv_meta(a):
    B, T, D = a.x.shape
    return (TensorMeta((B, T, D), a.x.dtype), TensorMeta((B, a.weight.shape[1] - 1, D), a.x.dtype))


def _conv_sample(g):
    B, T, D, K = 2, 5, 8, 4
    return ((smp.rnd(g, B, T, D), smp.rnd(g, D, K, scale=0.5)),
            dict(bias=smp.rnd(g, D, scale=0.1), conv_state=smp.rnd(g, 3, K - 1, D), state_indices=torch.tensor([1, 2]),
                 seq_lens=torch.tensor([5, 2]), activation="silu"))


@op_spec(family="linear_attention",
         summary="depthwise causal conv1d over time with a conv-state cache (prefill and single-step update), optional "
                 "SiLU -> (out [B,T,D], new_state [B,K-1,D])",
         outputs={"out": FloatBudget(abs_floor=1e-5), "new_state": ExactBudget()},
         returns="tuple", meta=_conv_meta, sample=_conv_sample)
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                  conv_state: Optional[torch.Tensor] = None, state_indices: Optional[torch.Tensor] = None,
                  seq_lens: Optional[torch.Tensor] = None, activation: str = "none"):
    """Depthwise causal 1-D convolution over time, continuing from a cached window (the short
    convolution in front of Gated DeltaNet / KDA; transformers' ``causal_conv1d_fn`` and
    ``causal_conv1d_update``).

    x [B, T, D] (bf16, fp16 or fp32; channels last), weight [D, K] (any float dtype: the
    checkpoint's ``conv1d.weight`` [D, 1, K] squeezed), bias [D] or None (any float dtype).
    Each sequence b continues from the K-1 inputs that preceded it, oldest first: zeros when
    ``conv_state`` is None, else ``conv_state`` [B, K-1, D] (x's dtype) or, with
    ``state_indices`` [B] int (values in [0, N)), row ``state_indices[b]`` of a pool
    [N, K-1, D]. With ``xs = cat(previous window, x[b, :seq_lens[b]])`` (K-1 + len rows)::

        out[b, t, d] = act(bias[d] + sum_{j<K} weight[d, j] * xs[t + j, d])     t < seq_lens[b]

    (weight[:, K-1] multiplies the current token: PyTorch's ``conv1d`` with K-1 zeros of left
    padding), in fp32, act = identity (``"none"``) or SiLU ``y * sigmoid(y)`` (``"silu"``),
    cast to x's dtype; padded positions (t >= seq_lens[b], default seq_lens = T) give 0.
    Returns ``(out [B, T, D], new_state [B, K-1, D])``: new_state (x's dtype) is the last K-1 rows
    of xs -- the window the next call continues from (bit-exact copies of inputs; the previous
    window itself when seq_lens[b] = 0). Prefill is a call with T tokens, the decode step one
    with T = 1 and the cached window: one definition. Inputs are never modified; T = 0, B = 0
    and K = 1 (an empty window) are legal.
    """
    op = "causal_conv1d"
    c.tensor(op, "x", x, ndim=3, dtypes=c.FLOAT_DTYPES, dims="[B, T, D]")
    B, T, D = x.shape
    if D < 1:
        raise ContractError(op, "x", "D >= 1 channels", f"shape {tuple(x.shape)}")
    c.tensor(op, "weight", weight, ndim=2, dtypes=c.FLOAT_DTYPES, dims="[D, K]")
    if weight.shape[0] != D or weight.shape[1] < 1:
        raise ContractError(op, "weight", f"shape [D={D}, K >= 1]", f"shape {tuple(weight.shape)}")
    K = weight.shape[1]
    if bias is not None:
        c.tensor(op, "bias", bias, ndim=1, dtypes=c.FLOAT_DTYPES, dims="[D]")
        c.shape(op, "bias", bias, (D,), "[D]")
    if conv_state is not None:
        c.tensor(op, "conv_state", conv_state, ndim=3, dtypes=(x.dtype,), dims="[B or N, K-1, D] (x's dtype)")
        if state_indices is None:
            c.shape(op, "conv_state", conv_state, (B, K - 1, D), "[B, K-1, D]")
        elif tuple(conv_state.shape[1:]) != (K - 1, D) or conv_state.shape[0] < 1:
            raise ContractError(op, "conv_state", f"shape [N >= 1, K-1={K - 1}, D={D}] (a pool of windows)",
                                f"shape {tuple(conv_state.shape)}")
    c.choice(op, "activation", activation, CONV_ACTIVATIONS)
    c.same_device(op, "x", x, weight=weight, bias=bias, conv_state=conv_state, state_indices=state_indices,
                  seq_lens=seq_lens)
    _lengths_and_slots(op, B, T, conv_state, "conv_state", state_indices, seq_lens)
