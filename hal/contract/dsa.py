"""Contract family 2: DeepSeek Sparse Attention (lightning indexer + sparse attention)."""
from __future__ import annotations

from typing import Optional

import torch

from hal.contract import _checks as c
from hal.contract import _samples as smp
from hal.contract._spec import FloatBudget, SelectionBudget, TensorMeta, checked_mode, data_checks, op_spec
from hal.errors import ContractError

INDEXER_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


@op_spec(family="dsa", summary="lightning indexer: score[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h].k[b,s]) -> top-k "
         "visible key indices [B,S,top_k] int32, -1 tail", outputs={"indices": SelectionBudget()},
         meta=lambda a: (TensorMeta((a.q.shape[0], a.q.shape[1], a.top_k), torch.int32),),
         selection_scores="hal.conformance.scores:indexer_scores",
         sample=lambda g: ((smp.rnd(g, 2, 4, 2, 16), smp.rnd(g, 2, 8, 16), torch.rand(2, 4, 2, generator=g)),
                           dict(top_k=4, q_offset=torch.tensor([4, 2]), k_lengths=torch.tensor([8, 6]))))
def lightning_indexer(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, *, top_k: int, causal: bool = True,
                      q_offset: Optional[torch.Tensor] = None, k_lengths: Optional[torch.Tensor] = None,
                      q_scale: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None):
    """Select the top_k keys each query attends to (DeepSeek-V3.2 / GLM-5 DSA indexer).

    q [B, S, Hi, D], k [B, L, D] (one shared key head), weights [B, S, Hi] fp32 (the caller folds
    ``Hi^-0.5 * D^-0.5`` into them); q/k bf16, fp16 or fp32, or both float8_e4m3fn with
    q_scale [B, S, Hi] and k_scale [B, L] fp32 (dequantized value = fp8 value * scale, as
    DeepSeek-V3.2's ``fp8_index``).
    ``score[b,t,s] = sum_h weights[b,t,h] * relu(q[b,t,h] . k[b,s])`` in fp32.
    Visibility: key s is visible to query t iff ``s < k_lengths[b]`` and, when causal,
    ``s <= q_offset[b] + t``. k_lengths [B] int (default L for every batch); q_offset [B] int
    (default ``k_lengths[b] - S``: the queries are the last S positions of each sequence, the rule
    torch_npu calls sparse_mode 3 "rightDownCausal").
    Returns int32 [B, S, top_k]: the visible keys with the highest scores, descending, ties toward
    the lower index (a NaN score ranks below every number, -inf included, but its key stays
    visible and selectable); when fewer than top_k keys are visible the tail is -1 (valid entries
    first). 1 <= top_k <= max(L, 65536): top_k may exceed L. (DeepSeek-V3.2's Indexer returns ``min(top_k, L)`` columns and
    adds its causal mask as -inf, so invisible keys fill its tail where HAL writes -1.)
    """
    op = "lightning_indexer"
    c.tensor(op, "q", q, ndim=4, dtypes=INDEXER_DTYPES, dims="[B, S, Hi, D]")
    B, S, Hi, D = q.shape
    c.tensor(op, "k", k, ndim=3, dtypes=(q.dtype,), dims="[B, L, D] (same dtype as q)")
    if k.shape[0] != B or k.shape[2] != D:
        raise ContractError(op, "k", f"shape [B={B}, L, D={D}]", f"shape {tuple(k.shape)}")
    L = k.shape[1]
    c.tensor(op, "weights", weights, ndim=3, dtypes=(torch.float32,), dims="[B, S, Hi]")
    c.shape(op, "weights", weights, (B, S, Hi), "[B, S, Hi]")
    top_k_max = max(L, c.MAX_TOP_K)
    c.integer(op, "top_k", top_k, lo=1, hi=top_k_max,
              what=f"1 <= top_k <= {top_k_max} (the larger of L={L} and {c.MAX_TOP_K})")
    c.boolean(op, "causal", causal)
    for name, t in (("q_offset", q_offset), ("k_lengths", k_lengths)):
        if t is not None:
            c.tensor(op, name, t, ndim=1, dtypes=c.INT_DTYPES, dims="[B]")
            c.shape(op, name, t, (B,), "[B]")
    fp8 = q.dtype == torch.float8_e4m3fn
    for name, t, shp, dims in (("q_scale", q_scale, (B, S, Hi), "[B, S, Hi]"), ("k_scale", k_scale, (B, L), "[B, L]")):
        if fp8:
            if t is None:
                raise ContractError(op, name, f"fp32 scales {dims} (float8 q/k need them)", None)
            c.tensor(op, name, t, dtypes=(torch.float32,))
            c.shape(op, name, t, shp, dims)
        elif t is not None:
            raise ContractError(op, name, "None (scales only go with float8_e4m3fn q/k)", "a tensor")
    c.same_device(op, "q", q, k=k, weights=weights, q_offset=q_offset, k_lengths=k_lengths, q_scale=q_scale, k_scale=k_scale)
    if k_lengths is not None and data_checks(k_lengths):
        c.value_range(op, "k_lengths", k_lengths, 0, L, f"values in [0, L={L}]")
    for name, t in (("q_scale", q_scale), ("k_scale", k_scale)):
        if fp8 and data_checks(t):
            c.finite_positive_scales(op, name, t)


def _attention_meta(a):
    B, S, Hq, _ = a.q.shape
    out = TensorMeta((B, S, Hq, a.v.shape[3]), a.q.dtype)
    return (out, TensorMeta((B, S, Hq), torch.float32)) if a.return_lse else (out,)


@op_spec(family="dsa", summary="attention of each query over its selected keys only (fp32 softmax, GQA/MQA/MLA, "
         "-1 slots skipped) -> out [B,S,Hq,Dv] (+ lse [B,S,Hq])",
         outputs={"out": FloatBudget(abs_floor=1e-5), "lse": FloatBudget(abs_floor=1e-5)},
         returns="tuple", torch_fixed={"return_lse": True}, meta=_attention_meta,
         sample=lambda g: ((smp.rnd(g, 1, 2, 2, 16), smp.rnd(g, 1, 8, 1, 16), smp.rnd(g, 1, 8, 1, 16),
                            torch.tensor([[[0, 1, -1], [2, 3, 4]]], dtype=torch.int32)), dict(scale=0.25, return_lse=True)))
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, *, scale: float,
                     return_lse: bool = False):
    """Sparse attention over the keys listed in ``indices`` (shared by all heads of a query).

    q [B, S, Hq, Dqk], k [B, L, Hk, Dqk], v [B, L, Hk, Dv] (bf16/fp16/fp32, one dtype), Hk divides
    Hq (MHA, GQA, MQA; MLA absorbed = MQA with Hk=1, Dqk=576, Dv=512, v may be a view of k),
    indices [B, S, top_k] int32, -1 = unused slot.
    ``out[b,t,h] = softmax_j(scale * q[b,t,h] . k[b, idx_j, h // (Hq/Hk)]) @ v[b, idx_j, ...]``
    over the valid slots only, softmax in fp32; ``lse`` [B, S, Hq] fp32 natural-log logsumexp of
    the scaled scores. Unused (-1) slots contribute nothing and read no key or value row: NaN or
    Inf in rows no valid slot selects never reaches the output (FlashMLA's tests fill such rows
    with NaN). A query with no valid slot: out = 0, lse = -inf (FlashMLA's reference reports
    +inf there). Only -1 marks an unused slot (FlashMLA also skips any index outside [0, L)).
    L = 0 is legal (every slot -1).
    Returns out [B, S, Hq, Dv] in q's dtype, or (out, lse) when return_lse.
    Errors: indices >= L or < -1 (checked on CPU tensors, and on devices in checked mode);
    duplicate indices within a query are reported in checked mode (``HAL_CHECKED=1``).
    """
    op = "sparse_attention"
    c.tensor(op, "q", q, ndim=4, dtypes=c.FLOAT_DTYPES, dims="[B, S, Hq, Dqk]")
    B, S, Hq, Dqk = q.shape
    c.tensor(op, "k", k, ndim=4, dtypes=(q.dtype,), dims="[B, L, Hk, Dqk] (same dtype as q)")
    if k.shape[0] != B or k.shape[3] != Dqk:
        raise ContractError(op, "k", f"shape [B={B}, L, Hk, Dqk={Dqk}]", f"shape {tuple(k.shape)}")
    L, Hk = k.shape[1], k.shape[2]
    if Hk < 1 or Hq % Hk:
        raise ContractError(op, "k", f"a key head count Hk dividing Hq={Hq}", f"Hk={Hk}")
    c.tensor(op, "v", v, ndim=4, dtypes=(q.dtype,), dims="[B, L, Hk, Dv] (same dtype as q)")
    if tuple(v.shape[:3]) != (B, L, Hk):
        raise ContractError(op, "v", f"shape [B={B}, L={L}, Hk={Hk}, Dv]", f"shape {tuple(v.shape)}")
    c.tensor(op, "indices", indices, ndim=3, dtypes=(torch.int32,), dims="[B, S, top_k]")
    if tuple(indices.shape[:2]) != (B, S):
        raise ContractError(op, "indices", f"shape [B={B}, S={S}, top_k]", f"shape {tuple(indices.shape)}")
    c.number(op, "scale", scale)
    c.boolean(op, "return_lse", return_lse)
    c.same_device(op, "q", q, k=k, v=v, indices=indices)
    if indices.numel() and data_checks(indices):
        c.value_range(op, "indices", indices, -1, L - 1, f"values in [0, L={L}) or -1")
        if checked_mode():
            srt = indices.sort(dim=-1).values
            dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
            if bool(dup.any()):
                where = dup.nonzero()[0].tolist()
                raise ContractError(op, "indices", "no duplicate index within a query (checked mode)",
                                    f"a duplicate at [b={where[0]}, t={where[1]}]")
