"""hal-ascend's kernels: the contract's ops mapped onto torch_npu ops (through the seam), with the
layouts, dtypes and conventions converted, and ``supports`` rules that keep every call inside the
ops' documented limits (a declined call runs on the reference, recorded in the plan).
"""
from __future__ import annotations

import torch

from hal_ascend.npu import ops as npu

SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}
HALF = (torch.bfloat16, torch.float16)


# --- routing ------------------------------------------------------------------------------------

def route_supports(router_logits, *, top_k, scoring, correction_bias, n_group, topk_group, renormalize,
                   scaling_factor):
    E = router_logits.shape[1]
    if scoring == "softmax":
        if correction_bias is not None or n_group > 1:
            return "npu_moe_gating_top_k_softmax takes no correction bias and no groups"
        if top_k > 1024:
            return f"npu_moe_gating_top_k_softmax needs k <= 1024 (got {top_k})"
        return None
    if not renormalize:
        return "npu_moe_gating_top_k always renormalizes (renorm=0 is its only mode)"
    if E > 2048:
        return f"npu_moe_gating_top_k takes at most 2048 experts (got {E})"
    if E // n_group <= 2:
        return f"npu_moe_gating_top_k needs more than 2 experts per group (got {E // n_group})"
    if -(-(E // n_group) // 32) * 32 * n_group > 2048:
        return "npu_moe_gating_top_k: 32-aligned group size x group count exceeds 2048"
    return None


def moe_route(router_logits, *, top_k, scoring, correction_bias, n_group, topk_group, renormalize, scaling_factor):
    x = router_logits.float()                             # fp32 in, so y_out (x's dtype) is fp32
    if scoring == "softmax":
        w, ids, _ = npu().npu_moe_gating_top_k_softmax(x.contiguous(), None, k=top_k)
        w = w.float()
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * scaling_factor, ids.to(torch.int32)
    bias = correction_bias.float() if correction_bias is not None else None
    y, ids, _ = npu().npu_moe_gating_top_k(x, top_k, bias=bias, k_group=topk_group, group_count=n_group,
                                           group_select_mode=1, renorm=0, norm_type=1, out_flag=False,
                                           routed_scaling_factor=float(scaling_factor), eps=1e-20)
    return y.float(), ids.to(torch.int32)


# --- dispatch / experts / combine ---------------------------------------------------------------

def moe_dispatch(hidden, expert_ids, num_experts, *, align):
    """npu_moe_init_routing_v2 expands and sorts (counts mode); padding to align is added here."""
    from hal.contract.moe import DispatchPlan
    T, k = expert_ids.shape
    expanded, row_idx, counts, _ = npu().npu_moe_init_routing_v2(
        hidden, expert_ids.to(torch.int32).contiguous(), active_num=-1, expert_capacity=-1, expert_num=num_experts,
        drop_pad_mode=0, expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
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


def _dequant_weights(w, s):
    """[E, N, K] e4m3 + [E, ceil(N/128), ceil(K/128)] scales -> fp32 (the declared FP8 emulation)."""
    E, N, K = w.shape
    full = s.repeat_interleave(128, 1)[:, :N].repeat_interleave(128, 2)[:, :, :K]
    return w.float() * full


def _fake_quant_rows(x):
    """Per token per 128 channels e4m3 quantize-dequantize (the contract's activation quantization)."""
    from hal.backends.cpu import KERNELS
    q, s = KERNELS["fp8_quantize"](x, group_size=128, scale_format="fp32")
    return q.float() * s.repeat_interleave(128, -1)[..., : x.shape[-1]]


def moe_experts(plan, w_gate_up, w_down, *, activation, w_gate_up_scale, w_down_scale):
    """npu_grouped_matmul (counts group list) + npu_swiglu over the plan's real rows; FP8 weights
    run the declared emulation (dequantized to fp32, activations fake-quantized per 128 channels)."""
    dtype = plan.hidden.dtype
    real = torch.nonzero(plan.source >= 0).flatten()
    x = plan.hidden[real]
    counts = plan.tokens_per_expert.to(torch.int64)
    fp8 = w_gate_up_scale is not None
    if fp8:
        wg, wd = _dequant_weights(w_gate_up, w_gate_up_scale), _dequant_weights(w_down, w_down_scale)
        x_in = _fake_quant_rows(x)
    else:
        wg, wd, x_in = w_gate_up, w_down, x
        if x_in.dtype != wg.dtype:
            x_in, wg, wd = x_in.float(), wg.float(), wd.float()
    h = npu().npu_grouped_matmul([x_in.contiguous()], [wg.transpose(1, 2).contiguous()], group_list=counts,
                                 split_item=3, group_type=0, group_list_type=1)[0]
    a = npu().npu_swiglu(h.to(dtype).float() if fp8 else h.to(dtype), dim=-1).to(dtype)
    a_in = _fake_quant_rows(a) if fp8 else (a if a.dtype == wd.dtype else a.to(wd.dtype))
    y = npu().npu_grouped_matmul([a_in.contiguous()], [wd.transpose(1, 2).contiguous()], group_list=counts,
                                 split_item=3, group_type=0, group_list_type=1)[0]
    out = torch.zeros(plan.hidden.shape, dtype=dtype, device=plan.hidden.device)
    out[real] = y[: real.numel()].to(dtype)
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
    return route_supports(router_logits, top_k=top_k, scoring=scoring, correction_bias=correction_bias,
                          n_group=n_group, topk_group=topk_group, renormalize=renormalize,
                          scaling_factor=scaling_factor)


def moe_forward(hidden, router_logits, w_gate_up, w_down, *, top_k, scoring, correction_bias, n_group, topk_group,
                renormalize, scaling_factor, activation, w_gate_up_scale, w_down_scale):
    w, ids = moe_route(router_logits, top_k=top_k, scoring=scoring, correction_bias=correction_bias, n_group=n_group,
                       topk_group=topk_group, renormalize=renormalize, scaling_factor=scaling_factor)
    plan = moe_dispatch(hidden, ids, w_gate_up.shape[0], align=1)
    out = moe_experts(plan, w_gate_up, w_down, activation=activation, w_gate_up_scale=w_gate_up_scale,
                      w_down_scale=w_down_scale)
    return moe_combine(out, plan, w)


# --- DSA ----------------------------------------------------------------------------------------

def indexer_supports(q, k, weights, *, top_k, causal, q_offset, k_lengths, q_scale, k_scale):
    if q.dtype not in HALF:
        return f"npu_lightning_indexer takes bfloat16/float16 query and key (got {q.dtype})"
    if top_k not in SPARSE_COUNTS:
        return f"npu_lightning_indexer sparse_count must be 1-2048 or 3072..8192 in steps of 1024 (got {top_k})"
    if q_offset is not None:
        return "npu_lightning_indexer's rightDownCausal fixes q_offset = k_lengths - S; an explicit q_offset is not mapped"
    return None


def lightning_indexer(q, k, weights, *, top_k, causal, q_offset, k_lengths, q_scale, k_scale):
    B, S, Hi, D = q.shape
    lengths = None if k_lengths is None else k_lengths.to(torch.int32).contiguous()
    out = npu().npu_lightning_indexer(q.contiguous(), k.unsqueeze(2).contiguous(), weights.to(q.dtype).contiguous(),
                                      actual_seq_lengths_query=None, actual_seq_lengths_key=lengths,
                                      layout_query="BSND", layout_key="BSND", sparse_count=top_k,
                                      sparse_mode=3 if causal else 0)
    return out[:, :, 0, :].contiguous()


def attention_supports(q, k, v, indices, *, scale, return_lse):
    if q.dtype not in HALF:
        return f"npu_sparse_flash_attention takes bfloat16/float16 (got {q.dtype})"
    mla = k.shape[2] == 1 and q.shape[3] == 576 and v.shape[3] == 512
    if not mla and k.shape[3] != v.shape[3]:
        return "npu_sparse_flash_attention needs Dqk == Dv (or the MLA 512 + 64 rope split)"
    return None


def _lse(q, k, indices, scale):
    """The logsumexp npu_sparse_flash_attention does not return, from plain torch ops on the NPU."""
    B, S, Hq, _ = q.shape
    Hk = k.shape[2]
    valid = indices >= 0
    batch = torch.arange(B, device=q.device)[:, None, None]
    ks = k[batch, indices.clamp_min(0).long()].float().repeat_interleave(Hq // Hk, dim=3)     # [B, S, K, Hq, D]
    s = torch.einsum("bthd,btjhd->bthj", q.float(), ks) * scale
    return torch.logsumexp(s.masked_fill(~valid[:, :, None, :], float("-inf")), dim=-1)


def sparse_attention(q, k, v, indices, *, scale, return_lse):
    valid_first = torch.sort((indices < 0).to(torch.int8), dim=-1, stable=True).indices
    idx = indices.gather(-1, valid_first).unsqueeze(2).expand(-1, -1, k.shape[2], -1).contiguous()
    if k.shape[2] == 1 and q.shape[3] == 576 and v.shape[3] == 512:       # MLA: nope 512 + rope 64
        out = npu().npu_sparse_flash_attention(
            q[..., :512].contiguous(), k[..., :512].contiguous(), k[..., :512].contiguous(), idx, float(scale), 1,
            query_rope=q[..., 512:].contiguous(), key_rope=k[..., 512:].contiguous(), layout_query="BSND",
            layout_kv="BSND", sparse_mode=0)
    else:
        out = npu().npu_sparse_flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), idx, float(scale), 1,
                                               layout_query="BSND", layout_kv="BSND", sparse_mode=0)
    return (out, _lse(q, k, indices, scale)) if return_lse else out
