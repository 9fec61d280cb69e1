"""hal-ascend's kernels: the contract's ops mapped onto torch_npu ops (through the seam), with the
layouts, dtypes and conventions converted, and ``*_supports`` rules that keep every call inside the
ops' documented limits (:mod:`hal_ascend.limits`; a declined call runs on the reference, recorded
in the plan). Every torch_npu call here binds to the torch_npu 2.13.0 schema (docs/ascend.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hal import blockscale

from hal_ascend.limits import (FLOATS, GATING_MAX_EXPERTS, GMM_MAX_GROUPS, GROUP_SCORE_MAX, GROUP_SCORE_TOP2_SUM, HALF,
                               INDEXER_HEAD_DIM, INDEXER_MAX_HEADS, INIT_ROUTING_MAX_EXPERTS, SFA_NOPE_DIM, SFA_Q_HEADS,
                               SFA_ROPE_DIM, SOFTMAX_GATING_MAX_K, SPARSE_COUNTS)
from hal_ascend.limits import (CHUNK_GDR_HEAD_DIM, CHUNK_GDR_MAX_HEADS, CONV_DIM_MULTIPLE, CONV_SOCS, CONV_WIDTH,
                               GDR_STATE_DTYPE_ENV, RECURRENT_GDR_MAX_HEAD_DIM, RECURRENT_GDR_MAX_HEADS,
                               RECURRENT_GDR_MAX_TOKENS, gdr_state_dtype)
from hal_ascend.npu import functions as npu

# FP8 experts (declared emulation): the most dequantized fp32 weight bytes held at once
FP8_DEQUANT_BUDGET_BYTES = 256 << 20
# fp32 DSA (the fused ops take bf16/fp16 only): the most bytes of scores / gathered keys per query chunk
FP32_DSA_CHUNK_BYTES = 256 << 20


# --- routing ------------------------------------------------------------------------------------

def group_select_mode(correction_bias) -> int:
    """npu_moe_gating_top_k's group score for the contract's rule: the group's max selection score
    without a correction bias (mode 0), the sum of its top 2 with one (mode 1)."""
    return GROUP_SCORE_MAX if correction_bias is None else GROUP_SCORE_TOP2_SUM


def route_supports(router_logits, *, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
                   scaling_factor):
    E = router_logits.shape[1]
    if scoring == "softmax" and correction_bias is None and n_group == 1:
        if top_k > SOFTMAX_GATING_MAX_K:
            return f"npu_moe_gating_top_k_softmax needs k <= {SOFTMAX_GATING_MAX_K} (got {top_k})"
        return None
    op = "npu_moe_gating_top_k"
    if E > GATING_MAX_EXPERTS:
        return f"{op} takes at most {GATING_MAX_EXPERTS} experts (got {E})"
    if E // n_group <= 2:
        return f"{op} needs more than 2 experts per group (got {E // n_group})"
    if -(-(E // n_group) // 32) * 32 * n_group > GATING_MAX_EXPERTS:
        return f"{op}: 32-aligned group size x group count exceeds {GATING_MAX_EXPERTS}"
    return None


def moe_route(router_logits, *, top_k, scoring, correction_bias, n_group, topk_group, renormalize, scaling_factor):
    """Softmax without bias or groups: npu_moe_gating_top_k_softmax (+ renormalize / scale here);
    otherwise npu_moe_gating_top_k (norm_type 1 sigmoid / 0 softmax, group_select_mode from
    :func:`group_select_mode`); without renormalize the weights are norm_out (out_flag=True) at
    the selected ids, scaled. Logits and bias go in as fp32, so the weights come out fp32."""
    x = router_logits.float().contiguous()
    if scoring == "softmax" and correction_bias is None and n_group == 1:
        w, ids, _ = npu().npu_moe_gating_top_k_softmax(x, None, top_k)
        w = w.float()
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * scaling_factor, ids.to(torch.int32)
    bias = correction_bias.float() if correction_bias is not None else None
    y, ids, norm = npu().npu_moe_gating_top_k(x, top_k, bias=bias, k_group=topk_group, group_count=n_group,
                                              group_select_mode=group_select_mode(correction_bias), renorm=0,
                                              norm_type=1 if scoring == "sigmoid" else 0, out_flag=not renormalize,
                                              routed_scaling_factor=float(scaling_factor), eps=1e-20)
    if not renormalize:                                  # y_out is always renormalized: weights from norm_out
        return norm.float().gather(1, ids.long()) * scaling_factor, ids.to(torch.int32)
    return y.float(), ids.to(torch.int32)


# --- dispatch / experts / combine ---------------------------------------------------------------

def dispatch_supports(hidden, expert_ids, num_experts, *, align):
    if num_experts > INIT_ROUTING_MAX_EXPERTS:
        return f"npu_moe_init_routing_v2 takes at most {INIT_ROUTING_MAX_EXPERTS} experts (got {num_experts})"
    return None


def moe_dispatch(hidden, expert_ids, num_experts, *, align):
    """npu_moe_init_routing_v2 expands and sorts (counts mode); padding to align is added here."""
    from hal.contract.moe import DispatchPlan
    T, k = expert_ids.shape
    if T == 0 or k == 0:
        z = torch.zeros(num_experts, dtype=torch.int32, device=hidden.device)
        return DispatchPlan(hidden.new_zeros((0, hidden.shape[1])), z, torch.zeros(num_experts + 1, dtype=torch.int32,
                            device=hidden.device), torch.zeros(0, dtype=torch.int64, device=hidden.device), T, k, align)
    expanded, row_idx, counts, _ = npu().npu_moe_init_routing_v2(
        hidden.contiguous(), expert_ids.to(torch.int32).contiguous(), active_num=-1, expert_capacity=-1,
        expert_num=num_experts, drop_pad_mode=0, expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, num_experts], row_idx_type=0)
    counts = counts.to(torch.int64)
    padded = (counts + align - 1) // align * align
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=hidden.device)
    offsets[1:] = torch.cumsum(padded, 0)
    N = int(offsets[-1])                                  # data-dependent plan size: one host sync
    unpadded_start = torch.cumsum(counts, 0) - counts
    row_idx = row_idx.long()
    copies = torch.nonzero(row_idx >= 0).flatten()
    dense_row = row_idx[copies]                           # row in expanded_x
    expert = torch.searchsorted(torch.cumsum(counts, 0), dense_row, right=True)
    dst = offsets[expert] + (dense_row - unpadded_start[expert])
    source = torch.full((N,), -1, dtype=torch.int64, device=hidden.device)
    source[dst] = copies
    out = torch.zeros((N, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    out[dst] = expanded[dense_row]
    return DispatchPlan(out, counts.to(torch.int32), offsets.to(torch.int32), source, T, k, align)


def gmm_weight(w: torch.Tensor) -> torch.Tensor:
    """A contract expert weight [E, N, K] as npu_grouped_matmul's operand [E, K, N], never copied:
    the storage :meth:`AscendBackend.prepare_weights` laid out (contiguous [E, K, N], NZ on an NPU)
    when ``w`` is its view, else the transposed view of the contract layout (the form the op
    recognizes as a transposed weight)."""
    t = w.transpose(1, 2)
    base = w._base
    if base is not None and t.is_contiguous() and tuple(base.shape) == tuple(t.shape) \
            and base.data_ptr() == t.data_ptr():
        return base
    return t


def _dequant_weights(w, s):
    """[U, N, K] e4m3 + [U, ceil(N/128), ceil(K/128)] scales -> fp32 (the declared FP8 emulation)."""
    return blockscale.dequantize(w, s)


def _fake_quant_rows(x):
    """Per token per 128 channels e4m3 quantize-dequantize (the contract's activation quantization)."""
    from hal.backends.cpu import KERNELS
    q, s = KERNELS["fp8_quantize"](x, group_size=128, scale_format="fp32")
    return blockscale.dequantize(q, s, 1, 128)


def experts_supports(plan, w_gate_up, w_down, *, activation, w_gate_up_scale, w_down_scale):
    x, w = plan.hidden.dtype, w_gate_up.dtype
    if w_gate_up_scale is None and x != w and not (w == torch.float32 and x in FLOATS):
        return (f"npu_grouped_matmul takes x and weight of one dtype: {x} activations with {w} weights would need "
                "a per-call weight copy")
    return None


def _swiglu_ffn(x, wg, wd, counts, dtype, fp8):
    """Both grouped GEMMs and the SwiGLU between them for rows x grouped by counts (int64, sum =
    rows). wg / wd: the op's [G, K, N] operands."""
    x_in = _fake_quant_rows(x) if fp8 else (x if x.dtype == wg.dtype else x.to(wg.dtype))
    h = npu().npu_grouped_matmul([x_in.contiguous()], [wg], group_list=counts, split_item=3, group_type=0,
                                 group_list_type=1)[0]
    a = npu().npu_swiglu(h.to(dtype).float() if fp8 else h.to(dtype), dim=-1).to(dtype)
    a_in = _fake_quant_rows(a) if fp8 else (a if a.dtype == wd.dtype else a.to(wd.dtype))
    return npu().npu_grouped_matmul([a_in.contiguous()], [wd], group_list=counts, split_item=3, group_type=0,
                                    group_list_type=1)[0]


def _expert_chunks(counts_host, per_expert_bytes, fp8):
    """Ranges of experts for one pair of grouped GEMMs each: at most GMM_MAX_GROUPS experts; with
    FP8 only experts that got rows, at most FP8_DEQUANT_BUDGET_BYTES of dequantized weights."""
    if not fp8:
        return [list(range(i, min(i + GMM_MAX_GROUPS, len(counts_host))))
                for i in range(0, len(counts_host), GMM_MAX_GROUPS)]
    cap = max(1, min(GMM_MAX_GROUPS, FP8_DEQUANT_BUDGET_BYTES // max(1, per_expert_bytes)))
    used = [e for e, n in enumerate(counts_host) if n > 0]
    return [used[i:i + cap] for i in range(0, len(used), cap)]


def moe_experts(plan, w_gate_up, w_down, *, activation, w_gate_up_scale, w_down_scale):
    """npu_grouped_matmul (counts group list) + npu_swiglu over the plan's real rows, weights taken
    as laid out (no per-call copy: :func:`gmm_weight`). FP8 weights run the declared emulation:
    only the experts that got rows are dequantized to fp32, a bounded chunk at a time, and the
    activations are fake-quantized per 128 channels."""
    dtype = plan.hidden.dtype
    E = w_gate_up.shape[0]
    fp8 = w_gate_up_scale is not None
    counts = plan.tokens_per_expert.to(torch.int64)
    if plan.align == 1:                                  # every row is a token copy
        real, x = None, plan.hidden
    else:
        real = torch.nonzero(plan.source >= 0).flatten()
        x = plan.hidden[real]
    if x.shape[0] == 0:
        return torch.zeros(plan.hidden.shape, dtype=dtype, device=plan.hidden.device)
    if not fp8 and E <= GMM_MAX_GROUPS:                   # one pair of calls, no host sync
        y = _swiglu_ffn(x, gmm_weight(w_gate_up), gmm_weight(w_down), counts, dtype, False)
    else:
        counts_host = counts.tolist()
        starts = [0]
        for n in counts_host:
            starts.append(starts[-1] + n)
        per_expert = 4 * (w_gate_up.shape[1] * w_gate_up.shape[2] + w_down.shape[1] * w_down.shape[2])
        parts = []
        for chunk in _expert_chunks(counts_host, per_expert, fp8):
            lo, hi = starts[chunk[0]], starts[chunk[-1] + 1]
            if hi == lo:
                continue
            if fp8:
                idx = torch.tensor(chunk, device=w_gate_up.device)
                wg = _dequant_weights(w_gate_up[idx], w_gate_up_scale[idx]).transpose(1, 2)
                wd = _dequant_weights(w_down[idx], w_down_scale[idx]).transpose(1, 2)
                group = counts[idx]
            else:
                wg, wd = gmm_weight(w_gate_up[chunk[0]:chunk[-1] + 1]), gmm_weight(w_down[chunk[0]:chunk[-1] + 1])
                group = counts[chunk[0]:chunk[-1] + 1]
            parts.append(_swiglu_ffn(x[lo:hi], wg, wd, group, dtype, fp8))
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
    if real is None:
        return y.to(dtype)
    out = torch.zeros(plan.hidden.shape, dtype=dtype, device=plan.hidden.device)
    out[real] = y.to(dtype)
    return out


def moe_combine(expert_out, plan, weights):
    """Plain torch ops on the NPU, sync-free (:func:`hal.portable.moe_combine`); see docs/ascend.md
    for why this, not npu_moe_finalize_routing, is the default."""
    from hal.portable import moe_combine as portable
    return portable(expert_out, plan, weights)


def finalize_supports(expert_out, plan, weights):
    if plan.hidden.shape[0] != plan.num_tokens * plan.top_k:
        return "npu_moe_finalize_routing needs one row per token copy (no -1 ids, no padding: align 1)"
    return None


def moe_combine_finalize(expert_out, plan, weights):
    """npu_moe_finalize_routing: the fused combine (its scales take the rows' dtype)."""
    T, k = plan.num_tokens, plan.top_k
    dst = torch.empty(T * k, dtype=torch.int32, device=expert_out.device)
    copy = plan.source                                                 # row r holds copy t * k + slot
    dst[(copy % k) * T + copy // k] = torch.arange(copy.numel(), dtype=torch.int32, device=expert_out.device)
    return npu().npu_moe_finalize_routing(expert_out.contiguous(), None, None, None, weights.to(expert_out.dtype),
                                          dst, None, drop_pad_mode=0, k=k)


def forward_supports(hidden, router_logits, w_gate_up, w_down, *, top_k, scoring, correction_bias, n_group, topk_group,
                     renormalize, scaling_factor, activation, w_gate_up_scale, w_down_scale):
    return (route_supports(router_logits, top_k=top_k, scoring=scoring, correction_bias=correction_bias,
                           n_group=n_group, topk_group=topk_group, renormalize=renormalize,
                           scaling_factor=scaling_factor)
            or dispatch_supports(hidden, None, w_gate_up.shape[0], align=1)
            or experts_supports(_PlanDtype(hidden.dtype), w_gate_up, w_down, activation=activation,
                                w_gate_up_scale=w_gate_up_scale, w_down_scale=w_down_scale))


class _PlanDtype:
    """What experts_supports reads of a plan (its rows' dtype), for moe_forward's check."""

    def __init__(self, dtype):
        self.hidden = torch.empty(0, dtype=dtype)


def moe_forward(hidden, router_logits, w_gate_up, w_down, *, top_k, scoring, correction_bias, n_group, topk_group,
                renormalize, scaling_factor, activation, w_gate_up_scale, w_down_scale):
    w, ids = moe_route(router_logits, top_k=top_k, scoring=scoring, correction_bias=correction_bias, n_group=n_group,
                       topk_group=topk_group, renormalize=renormalize, scaling_factor=scaling_factor)
    plan = moe_dispatch(hidden, ids, w_gate_up.shape[0], align=1)
    out = moe_experts(plan, w_gate_up, w_down, activation=activation, w_gate_up_scale=w_gate_up_scale,
                      w_down_scale=w_down_scale)
    return moe_combine(out, plan, w)


# --- DSA: lightning indexer ---------------------------------------------------------------------

def sparse_count_for(top_k: int):
    """The smallest sparse_count the indexer takes that is >= top_k (None above 8192)."""
    return min((c for c in SPARSE_COUNTS if c >= top_k), default=None)


def indexer_supports(q, k, weights, *, top_k, causal, q_offset, k_lengths, q_scale, k_scale):
    op = "npu_lightning_indexer"
    if q.dtype in TORCH_OP_INDEXER_DTYPES:
        return None                                      # torch ops on the NPU (_torch_indexer)
    if sparse_count_for(top_k) is None:
        return f"{op} sparse_count must be 1-2048 or 3072..8192 in steps of 1024 (got top_k={top_k})"
    if q.shape[3] > INDEXER_HEAD_DIM:
        return f"{op} needs head dim D = {INDEXER_HEAD_DIM} on Atlas A2/A3 (got {q.shape[3]}; smaller D is zero-padded)"
    if q.shape[2] > INDEXER_MAX_HEADS:
        return f"{op} takes at most {INDEXER_MAX_HEADS} query heads on Atlas A2/A3 (got {q.shape[2]})"
    return None


def causal_lengths(S: int, k_len: torch.Tensor, q_offset: torch.Tensor):
    """The contract's causal rule ``s < k_lengths[b] and s <= q_offset[b] + t`` as the op's
    rightDownCausal (last valid query on last valid key): (actual_seq_lengths_query,
    actual_seq_lengths_key), both [B] int32. Query rows t >= actual_seq_lengths_query[b] ("tail
    rows": q_offset[b] + t >= k_lengths[b], they see all k_lengths[b] keys) are not covered by
    them; they exist only when k_lengths - q_offset < S, never for S = 1."""
    k_len = k_len.to(torch.int64)
    q_len = (k_len - q_offset.to(torch.int64)).clamp(1, S)
    k_eff = torch.minimum((q_offset.to(torch.int64) + q_len).clamp_min(0), k_len)
    return q_len.to(torch.int32), k_eff.to(torch.int32)


# q/k dtypes npu_lightning_indexer does not take, run as the contract's arithmetic in torch ops
TORCH_OP_INDEXER_DTYPES = (torch.float32, torch.float8_e4m3fn)


def _torch_indexer(q, k, weights, *, top_k, causal, q_offset, k_lengths, q_scale, k_scale):
    """fp32 or fp8 (with scales) q/k, which the fused op does not take: the contract's arithmetic
    in torch ops on the device (the reference kernel's code), a chunk of queries at a time so the
    [B, chunk, Hi, L] fp32 scores stay within FP32_DSA_CHUNK_BYTES."""
    from hal.backends.cpu import KERNELS
    B, S, Hi, _ = q.shape
    L = k.shape[1]
    k_len = torch.full((B,), L, dtype=torch.int64, device=q.device) if k_lengths is None else k_lengths.long()
    offset = k_len - S if q_offset is None else q_offset.long()
    step = max(1, FP32_DSA_CHUNK_BYTES // max(1, 4 * B * Hi * L))
    return torch.cat([KERNELS["lightning_indexer"](q[:, t:t + step], k, weights[:, t:t + step], top_k=top_k,
                                                   causal=causal, q_offset=offset + t, k_lengths=k_len,
                                                   q_scale=None if q_scale is None else q_scale[:, t:t + step],
                                                   k_scale=k_scale)
                      for t in range(0, S, step)], 1)


def lightning_indexer(q, k, weights, *, top_k, causal, q_offset, k_lengths, q_scale, k_scale):
    """npu_lightning_indexer (BSND; sparse_mode 3 rightDownCausal or 0), q_offset / k_lengths as
    actual_seq_lengths_query / actual_seq_lengths_key (:func:`causal_lengths`); tail rows, when a
    batch has any, from a second call with sparse_mode 0. D < 128 is zero-padded to 128 (scores
    unchanged). fp32 / fp8 q/k: :func:`_torch_indexer`."""
    B, S, Hi, D = q.shape
    L = k.shape[1]
    if B * S == 0 or L == 0:
        return torch.full((B, S, top_k), -1, dtype=torch.int32, device=q.device)
    if q.dtype in TORCH_OP_INDEXER_DTYPES:
        return _torch_indexer(q, k, weights, top_k=top_k, causal=causal, q_offset=q_offset, k_lengths=k_lengths,
                              q_scale=q_scale, k_scale=k_scale)
    if D < INDEXER_HEAD_DIM:
        q, k = F.pad(q, (0, INDEXER_HEAD_DIM - D)), F.pad(k, (0, INDEXER_HEAD_DIM - D))
    qc, kc, wc = q.contiguous(), k.unsqueeze(2).contiguous(), weights.to(q.dtype).contiguous()
    count = sparse_count_for(top_k)
    k_len = (torch.full((B,), L, dtype=torch.int32, device=q.device) if k_lengths is None
             else k_lengths.to(torch.int32))

    def call(q_lens, k_lens, mode):
        idx, _ = npu().npu_lightning_indexer(qc, kc, wc, actual_seq_lengths_query=q_lens, actual_seq_lengths_key=k_lens,
                                            layout_query="BSND", layout_key="BSND", sparse_count=count,
                                            sparse_mode=mode)
        return idx[:, :, 0, :top_k]

    if not causal:
        return call(None, k_len.contiguous(), 0).contiguous()
    if q_offset is None:
        return call(None, k_len.contiguous(), 3).contiguous()
    q_len, k_eff = causal_lengths(S, k_len, q_offset)
    out = call(q_len.contiguous(), k_eff.contiguous(), 3)
    if S > 1 and bool((q_len < S).any()):                # one host sync, only for multi-token steps
        tail = torch.arange(S, device=q.device).view(1, S, 1) >= q_len.view(B, 1, 1)
        out = torch.where(tail, call(None, k_len.contiguous(), 0), out)
    return out.contiguous()


# --- DSA: sparse attention ----------------------------------------------------------------------

def _is_mla_view(k, v) -> bool:
    """v is k[..., :512] of a [B, L, 1, 576] k (the MLA absorbed layout: one KV tensor)."""
    return (k.shape[2] == 1 and k.shape[3] == SFA_NOPE_DIM + SFA_ROPE_DIM and v.shape[3] == SFA_NOPE_DIM
            and v.data_ptr() == k.data_ptr() and v.stride() == k.stride())


def _packed_fits(Dqk, Dv) -> bool:
    return max(Dqk - SFA_ROPE_DIM, 0) + Dv <= SFA_NOPE_DIM


def attention_supports(q, k, v, indices, *, scale, return_lse):
    op = "npu_sparse_flash_attention"
    if q.dtype == torch.float32:
        return None                                      # torch ops on the NPU (_fp32_attention)
    if q.dtype not in HALF:
        return f"{op} takes bfloat16/float16 (got {q.dtype})"
    Hq, Hk = q.shape[2], k.shape[2]
    if Hq // Hk not in SFA_Q_HEADS:
        return f"{op} takes 1, 2, 4, ..., 128 query heads per KV head (got {Hq // Hk})"
    if _is_mla_view(k, v):
        return None
    if not _packed_fits(q.shape[3], v.shape[3]):
        return (f"{op} takes only the MLA shape (one KV tensor, 512 + 64 rope, V = K[..., :512]); other shapes are "
                f"packed into it, which needs max(Dqk - 64, 0) + Dv <= 512 (got Dqk={q.shape[3]}, Dv={v.shape[3]})")
    return None


def _sfa(qn, qr, kn, kr, idx, scale, return_lse):
    return npu().npu_sparse_flash_attention(qn, kn, kn, idx, float(scale), query_rope=qr, key_rope=kr,
                                            sparse_block_size=1, layout_query="BSND", layout_kv="BSND", sparse_mode=0,
                                            attention_mode=2, return_softmax_lse=return_lse)


def _lse(mx, sm):
    """softmax_max + log(softmax_sum), [B', N2, S, G] -> [B', S, N2 * G]."""
    lse = mx + torch.log(sm)
    Bp, N2, S, G = lse.shape
    return lse.permute(0, 2, 1, 3).reshape(Bp, S, N2 * G)


def _fp32_attention(q, k, v, indices, *, scale, return_lse):
    """fp32, which the fused op does not take: the contract's arithmetic in torch ops on the device
    (the reference kernel's code), a chunk of queries at a time so the gathered [B, chunk, K, Hk,
    Dqk + Dv] keys and values stay within FP32_DSA_CHUNK_BYTES."""
    from hal.backends.cpu import KERNELS
    B, S, _, Dqk = q.shape
    K, Hk, Dv = indices.shape[-1], k.shape[2], v.shape[3]
    step = max(1, FP32_DSA_CHUNK_BYTES // max(1, 4 * B * K * Hk * (Dqk + Dv)))
    parts = [KERNELS["sparse_attention"](q[:, t:t + step], k, v, indices[:, t:t + step], scale=scale, return_lse=True)
             for t in range(0, S, step)]
    out = torch.cat([p[0] for p in parts], 1)
    return (out, torch.cat([p[1] for p in parts], 1)) if return_lse else out


def sparse_attention(q, k, v, indices, *, scale, return_lse):
    """npu_sparse_flash_attention, attention_mode 2 (MLA absorbed), sparse_mode 0, indices reordered
    valid-first. The MLA shape ([B, L, 1, 576] k, v = k[..., :512]) maps directly; any other shape
    is packed into it: KV heads folded into the batch, q.k in the 64 rope columns (and the nope
    columns before them), v in the nope columns after them, zeros elsewhere (a per-call copy of
    K/V). lse = softmax_max + log(softmax_sum) from the op (return_softmax_lse). fp32:
    :func:`_fp32_attention`."""
    B, S, Hq, Dqk = q.shape
    L, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    K = indices.shape[-1]
    valid = indices >= 0
    if B * S == 0 or L == 0 or K == 0:
        out = torch.zeros(B, S, Hq, Dv, dtype=q.dtype, device=q.device)
        lse = torch.full((B, S, Hq), float("-inf"), device=q.device)
        return (out, lse) if return_lse else out
    if q.dtype == torch.float32:
        return _fp32_attention(q, k, v, indices, scale=scale, return_lse=return_lse)
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    idx = indices.gather(-1, order)
    any_valid = valid.any(-1)                                                 # [B, S]
    if _is_mla_view(k, v):
        out, mx, sm = _sfa(q[..., :SFA_NOPE_DIM].contiguous(), q[..., SFA_NOPE_DIM:].contiguous(),
                           k[..., :SFA_NOPE_DIM].contiguous(), k[..., SFA_NOPE_DIM:].contiguous(),
                           idx.unsqueeze(2).contiguous(), scale, return_lse)
        lse = _lse(mx, sm) if return_lse else None
    else:
        G, r = Hq // Hk, min(SFA_ROPE_DIM, Dqk)
        n = Dqk - r
        qh = q.view(B, S, Hk, G, Dqk).permute(0, 2, 1, 3, 4).reshape(B * Hk, S, G, Dqk)
        qn = q.new_zeros(B * Hk, S, G, SFA_NOPE_DIM)
        qr = q.new_zeros(B * Hk, S, G, SFA_ROPE_DIM)
        qn[..., :n], qr[..., :r] = qh[..., :n], qh[..., n:]
        kh, vh = k.permute(0, 2, 1, 3).reshape(B * Hk, L, 1, Dqk), v.permute(0, 2, 1, 3).reshape(B * Hk, L, 1, Dv)
        kn = k.new_zeros(B * Hk, L, 1, SFA_NOPE_DIM)
        kr = k.new_zeros(B * Hk, L, 1, SFA_ROPE_DIM)
        kn[..., :n], kn[..., n:n + Dv], kr[..., :r] = kh[..., :n], vh, kh[..., n:]
        ih = idx.unsqueeze(1).expand(B, Hk, S, K).reshape(B * Hk, S, 1, K).contiguous()
        o, mx, sm = _sfa(qn, qr, kn, kr, ih, scale, return_lse)
        out = o[..., n:n + Dv].reshape(B, Hk, S, G, Dv).permute(0, 2, 1, 3, 4).reshape(B, S, Hq, Dv)
        lse = _lse(mx, sm).view(B, Hk, S, G).permute(0, 2, 1, 3).reshape(B, S, Hq) if return_lse else None
    out = torch.where(any_valid[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    if not return_lse:
        return out.contiguous()
    return out.contiguous(), torch.where(any_valid[:, :, None], lse, float("-inf")).float()


# --- linear attention: gated delta rule ---------------------------------------------------------

GDR_SOCS = ("A2", "A3", "unknown")          # the GDR ops' documented chips (unknown: A2/A3 limits applied)


def gdr_op_for(T: int) -> str:
    """The rule choosing the NPU op: ``npu_recurrent_gated_delta_rule`` when T <= 8 (every
    sequence then fits its 1..8-token limit: decode and speculative decode), else
    ``npu_chunk_gated_delta_rule`` (prefill). Known from the shapes alone: no host sync."""
    return "recurrent" if T <= RECURRENT_GDR_MAX_TOKENS else "chunk"


def gdr_supports(q, k, v, g, beta, *, scale, initial_state, state_indices, seq_lens, qk_l2norm, soc="A3"):
    """None, or why the call lies outside the torch_npu GDR ops' documented limits."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    if B * T == 0:
        return None                                      # no token: no op call (see gated_delta_rule)
    if soc not in GDR_SOCS:
        return ("npu_chunk_gated_delta_rule / npu_recurrent_gated_delta_rule are documented for Atlas A2/A3 only "
                f"(not {soc})")
    if q.dtype != torch.bfloat16:
        return f"the torch_npu gated delta rule ops take bfloat16 q/k/v only (got {q.dtype})"
    if beta.dtype != torch.bfloat16:
        return (f"the torch_npu gated delta rule ops take beta in bfloat16 (got {beta.dtype}; rounding it would change "
                "the result)")
    if g.dim() == 4:
        return ("per-channel g (KDA): npu_recurrent_gated_delta_rule's gk is 'not supported in this version' and "
                "npu_chunk_gated_delta_rule takes one decay per head")
    if gdr_state_dtype() != torch.float32:
        return ("the torch_npu 2.13 gated delta rule ops take and return the state in bfloat16 (documented); the "
                "contract's final_state is float32 and its budget (1e-4 abs) is below bfloat16 rounding. Set "
                f"{GDR_STATE_DTYPE_ENV}=float32 only for an op build that takes a float32 state")
    if qk_l2norm:
        return ("qk_l2norm: the torch_npu gated delta rule ops do not normalize q/k, and keys normalized outside them "
                "reach the op rounded to bfloat16, an error in final_state above the contract's budget (1e-4 abs); "
                "hand in l2-normalized q/k with qk_l2norm=False")
    if gdr_op_for(T) == "recurrent":
        if max(Hk, Hv) > RECURRENT_GDR_MAX_HEADS or max(Dk, Dv) > RECURRENT_GDR_MAX_HEAD_DIM:
            return (f"npu_recurrent_gated_delta_rule takes at most {RECURRENT_GDR_MAX_HEADS} heads and head dims "
                    f"<= {RECURRENT_GDR_MAX_HEAD_DIM} (got Hk={Hk}, Hv={Hv}, Dk={Dk}, Dv={Dv})")
        return None
    if max(Dk, Dv) > CHUNK_GDR_HEAD_DIM:
        return (f"npu_chunk_gated_delta_rule needs Dk = Dv = {CHUNK_GDR_HEAD_DIM} (smaller ones are zero-padded; "
                f"got Dk={Dk}, Dv={Dv})")
    if max(Hk, Hv) > CHUNK_GDR_MAX_HEADS:
        return f"npu_chunk_gated_delta_rule takes at most {CHUNK_GDR_MAX_HEADS} heads (got Hk={Hk}, Hv={Hv})"
    return None


def _l2norm(x):
    xf = x.float()
    return xf / torch.sqrt((xf * xf).sum(-1, keepdim=True) + 1e-6)


def gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, state_indices, seq_lens, qk_l2norm):
    """The ops take packed tokens (TND) with per-sequence ``actual_seq_lengths``, bfloat16
    q/k/v/beta, fp32 g, and a state ``[N, Hv, Dv, Dk]`` (the contract's ``[.., Dk, Dv]``
    transposed) in :func:`hal_ascend.limits.gdr_state_dtype`. Here: starting states gathered
    from the pool by ``state_indices`` (zeros without one), q/k l2-normalized in fp32 first when
    ``qk_l2norm`` (the ops do not), the live tokens (``t < seq_lens[b]``) packed, sequences of
    length 0 left out (they keep their state; one host sync finds them). T <= 8
    (:func:`gdr_op_for`): npu_recurrent_gated_delta_rule on a scratch pool with one slot per
    token (ssm_state_indices = arange; sequence b starts at its first token's slot, and its final
    state is its last token's slot); else npu_chunk_gated_delta_rule, Dk/Dv < 128 zero-padded to
    128 (zero key / value columns leave every output and state entry unchanged)."""
    fn = npu()
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    sd, dev = gdr_state_dtype(), q.device
    if initial_state is None:
        start = torch.zeros(B, Hv, Dk, Dv, dtype=torch.float32, device=dev)
    else:
        start = (initial_state if state_indices is None else initial_state[state_indices.long()]).float()
    final = start.clone()                                # sequences of length 0 keep their state, bit for bit
    out = torch.zeros(B, T, Hv, Dv, dtype=q.dtype, device=dev)
    lengths = (torch.full((B,), T, device=dev) if seq_lens is None else seq_lens.to(dev)).long()
    live = torch.nonzero(lengths > 0).flatten() if B * T else lengths.new_zeros(0)
    if live.numel() == 0:
        return out, final
    S0 = start[live].transpose(-1, -2).to(sd)             # [n, Hv, Dv, Dk]: the ops' layout and dtype
    mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
    if qk_l2norm:
        q, k = _l2norm(q).to(q.dtype), _l2norm(k).to(k.dtype)
    qp, kp, vp = q[mask].contiguous(), k[mask].contiguous(), v[mask].contiguous()
    gp, bp = g[mask].float().contiguous(), beta[mask].contiguous()
    lens = lengths[live]
    lens32 = lens.to(torch.int32)
    if gdr_op_for(T) == "recurrent":
        starts = torch.cumsum(lens, 0) - lens
        pool = torch.zeros(qp.shape[0], Hv, Dv, Dk, dtype=sd, device=dev)
        pool[starts] = S0
        slots = torch.arange(qp.shape[0], dtype=torch.int32, device=dev)
        o = fn.npu_recurrent_gated_delta_rule(qp, kp, vp, pool, beta=bp, scale=float(scale), actual_seq_lengths=lens32,
                                              ssm_state_indices=slots, g=gp)
        last = pool[starts + lens - 1]
    else:
        P = CHUNK_GDR_HEAD_DIM
        qp, kp, vp = F.pad(qp, (0, P - Dk)), F.pad(kp, (0, P - Dk)), F.pad(vp, (0, P - Dv))
        o, st = fn.npu_chunk_gated_delta_rule(qp, kp, vp, beta=bp, initial_state=F.pad(S0, (0, P - Dk, 0, P - Dv)),
                                              actual_seq_lengths=lens32, scale=float(scale), g=gp)
        o, last = o[..., :Dv], st[:, :, :Dv, :Dk]
    out[mask] = o.to(q.dtype)
    final[live] = last.transpose(-1, -2).float()
    return out, final.contiguous()


# --- linear attention: causal conv1d ------------------------------------------------------------

def conv_supports(x, weight, *, bias, conv_state, state_indices, seq_lens, activation, soc="A3"):
    """None, or why the call lies outside npu_fused_causal_conv1d's documented limits."""
    op = "npu_fused_causal_conv1d"
    if x.shape[0] * x.shape[1] == 0:
        return None                                      # no token: no op call (see causal_conv1d)
    if soc not in CONV_SOCS:
        return f"{op} is documented for the Ascend 950 only (this is Atlas {soc})"
    if x.dtype not in HALF:
        return f"{op} takes float16/bfloat16 x only (got {x.dtype})"
    if weight.dtype != x.dtype:
        return (f"{op} takes the weight in x's dtype (got {weight.dtype} with {x.dtype} x; rounding it would change "
                "the result)")
    if weight.shape[1] > CONV_WIDTH:
        return f"{op} takes kernel width K = {CONV_WIDTH} only (got K={weight.shape[1]}; a narrower K is zero-padded)"
    if bias is not None:
        return f"{op}: bias is 'not supported yet' (torch_npu 2.13 documentation)"
    if activation != "none":
        return f"{op}: activation is 'not supported yet' (torch_npu 2.13 documentation)"
    return None


def causal_conv1d(x, weight, *, bias, conv_state, state_indices, seq_lens, activation):
    """npu_fused_causal_conv1d on packed tokens: x [sum L, D] with query_start_loc [B + 1], weight
    as its [3, D] (the contract's [D, K] transposed; K < 3 gets zero taps in front, with zero rows
    in front of the window), a scratch window pool [B, 2, D] (gathered by ``state_indices``,
    zeros without a conv_state) that the op updates in place, cache_indices = arange(B) with
    pad_slot_id -1 for sequences of length 0 (the op skips them: they keep their window). D is
    zero-padded to a multiple of 128 (depthwise: padded channels never reach real ones)."""
    B, T, D = x.shape
    K, W = weight.shape[1], CONV_WIDTH
    Dp = -(-D // CONV_DIM_MULTIPLE) * CONV_DIM_MULTIPLE
    dev = x.device
    if B * T == 0:                                       # nothing to convolve: each window stays as it was
        rows = x.new_zeros(B, K - 1, D) if conv_state is None else (
            conv_state if state_indices is None else conv_state[state_indices.long()])
        return x.new_zeros(B, T, D), rows.clone()
    window = x.new_zeros(B, W - 1, Dp)
    if conv_state is not None and K > 1:
        rows = conv_state if state_indices is None else conv_state[state_indices.long()]
        window[:, W - K:, :D] = rows
    out = torch.zeros(B, T, D, dtype=x.dtype, device=dev)
    lengths = (torch.full((B,), T, device=dev) if seq_lens is None else seq_lens.to(dev)).long()
    mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
    xp = F.pad(x[mask], (0, Dp - D)).contiguous()
    if xp.shape[0]:
        taps = x.new_zeros(W, Dp)
        taps[W - K:, :D] = weight.t().to(x.dtype)
        bounds = torch.zeros(B + 1, dtype=torch.int32, device=dev)
        bounds[1:] = torch.cumsum(lengths, 0).to(torch.int32)
        slots = torch.where(lengths > 0, torch.arange(B, device=dev), -1).to(torch.int32)
        y = npu().npu_fused_causal_conv1d(xp, taps, window, query_start_loc=bounds, cache_indices=slots,
                                          activation="None", pad_slot_id=-1, max_query_len=T)
        out[mask] = y[:, :D]
    return out, window[:, W - K:, :D].contiguous()


# --- expert parallelism: the MC2 op pair (hal_ascend.ep_mc2) --------------------------------------
from hal_ascend.ep_mc2 import combine_supports as ep_combine_supports  # noqa: E402,F401 - kernels.py lists every op
from hal_ascend.ep_mc2 import dispatch_supports as ep_dispatch_supports  # noqa: E402,F401
from hal_ascend.ep_mc2 import ep_combine, ep_dispatch  # noqa: E402,F401
