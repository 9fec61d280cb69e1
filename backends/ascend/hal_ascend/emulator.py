"""A CPU emulator of the torch_npu ops hal-ascend calls.

Semantics from the ops' documentation (torch_npu 2.13.0 ``_op_plugin_docs.py`` and the CANN
operator documentation it points to); signatures and outputs from the installed wheel itself:
:mod:`hal_ascend.schema` registers each function here under the op's exact schema from the
wheel's ``npu_native_functions_by_codegen.yaml`` and checks every result against the wheel's meta
function. The Python defaults below are used only when the wheel is absent (the emulator then
runs unbound and says so); ``tests/test_ascend_schema.py`` checks that they equal the schema's.

Each function checks the documented limits (:mod:`hal_ascend.limits`) and raises
:class:`NpuLimitError` on a violation, so a backend bug that real hardware would reject fails here
too. Where the documentation is silent the emulator states its assumption in the docstring (tie
order, NaN ranking, empty rows): those are assumptions about the hardware, to be confirmed on an NPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hal_ascend.limits import (FLOATS, GATING_MAX_EXPERTS, GMM_MAX_GROUPS, GROUP_SCORE_MAX, GROUP_SCORE_TOP2_SUM, HALF,
                               INDEXER_HEAD_DIM, INDEXER_MAX_HEADS, INIT_ROUTING_MAX_EXPERTS, SFA_ATTENTION_MODE,
                               SFA_NOPE_DIM, SFA_Q_HEADS, SFA_ROPE_DIM, SOFTMAX_GATING_MAX_K, SPARSE_COUNTS)


class NpuLimitError(RuntimeError):
    """A call outside a torch_npu op's documented limits."""

    def __init__(self, op: str, what: str):
        super().__init__(f"{op}: {what} (outside the documented limits of torch_npu.{op})")


def _need(cond: bool, op: str, what: str) -> None:
    if not cond:
        raise NpuLimitError(op, what)


def _contig(op: str, **tensors) -> None:
    for name, t in tensors.items():
        _need(t is None or t.is_contiguous(), op, f"{name} must be contiguous")


def _ranked(key: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k indices, descending. Assumption (undocumented): ties to the lower index, NaN last."""
    key = torch.where(torch.isnan(key), float("-inf"), key)
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]


def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    """norm (0 softmax / 1 sigmoid) -> selection score (+bias) -> keep the k_group best of
    group_count groups (group score: 0 = the group's max, 1 = the sum of its top 2) -> top-k;
    yOut = norm[ids] / (sum + eps) * routed_scaling_factor. Returns (y_out [T, k] x.dtype,
    expert_idx [T, k] int32, norm_out [T, E] fp32: the norm's output when out_flag, else undefined
    (NaN here: assumption))."""
    op = "npu_moe_gating_top_k"
    _need(x.dim() == 2 and x.dtype in FLOATS, op, "x must be 2-D float16/bfloat16/float32")
    T, E = x.shape
    _need(E <= GATING_MAX_EXPERTS, op, f"expert count {E} > {GATING_MAX_EXPERTS}")
    _need(group_count > 0 and E % group_count == 0 and E // group_count > 2, op,
          f"x.shape[-1]={E} must divide by group_count={group_count} into groups of more than 2")
    _need(-(-(E // group_count) // 32) * 32 * group_count <= GATING_MAX_EXPERTS, op,
          "32-aligned group size x group_count > 2048")
    _need(1 <= k_group <= group_count, op, f"k_group={k_group} outside [1, group_count]")
    _need(1 <= k <= E // group_count * k_group, op, f"k={k} outside [1, E / group_count * k_group]")
    _need(renorm == 0, op, "only renorm=0 is supported")
    _need(norm_type in (0, 1), op, f"norm_type={norm_type} not in (0 softmax, 1 sigmoid)")
    _need(group_select_mode in (GROUP_SCORE_MAX, GROUP_SCORE_TOP2_SUM), op,
          f"group_select_mode={group_select_mode} not in (0 max, 1 top-2 sum)")
    _need(input_ids is None and tid2eid is None, op, "hash mode is not emulated")
    if bias is not None:
        _need(bias.dim() == 1 and bias.shape[0] == E and bias.dtype == x.dtype, op, "bias must be [E] with x's dtype")
    xf = x.float()
    s = torch.softmax(xf, -1) if norm_type == 0 else torch.sigmoid(xf)
    c = s if bias is None else s + bias.float()
    c = torch.where(torch.isnan(c), float("-inf"), c)
    if group_count > 1:
        g = c.view(T, group_count, E // group_count)
        gscore = g.max(-1).values if group_select_mode == GROUP_SCORE_MAX else g.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros(T, group_count, dtype=torch.bool).scatter_(1, _ranked(gscore, k_group), True)
        c = c.masked_fill(~keep.repeat_interleave(E // group_count, 1), float("-inf"))
    ids = _ranked(c, k)
    w = s.gather(1, ids)
    y = w / (w.sum(-1, keepdim=True) + eps) * routed_scaling_factor
    return y.to(x.dtype), ids.to(torch.int32), (s if out_flag else torch.full_like(s, float("nan")))


def npu_moe_gating_top_k_softmax(x, finished=None, k=1):
    """softmax(x) then top-k: (y [.., k] x.dtype, expert_idx int32, row_idx int32)."""
    op = "npu_moe_gating_top_k_softmax"
    _need(x.dim() in (2, 3) and x.dtype in FLOATS, op, "x must be 2-D/3-D float16/bfloat16/float32")
    _need(0 < k <= x.shape[-1] and k <= SOFTMAX_GATING_MAX_K, op, f"k={k} outside (0, min(E, 1024)]")
    _need(finished is None, op, "finished rows are not emulated")
    s = torch.softmax(x.float(), -1)
    ids = _ranked(s, k)
    rows = torch.arange(x.numel() // x.shape[-1]).view(*x.shape[:-1], 1)
    row_idx = (torch.arange(k).view(*([1] * (x.dim() - 1)), k) * (x.numel() // x.shape[-1]) + rows).to(torch.int32)
    return s.gather(-1, ids).to(x.dtype), ids.to(torch.int32), row_idx


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1, expert_num=-1,
                            drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False, quant_mode=-1,
                            active_expert_range=(), row_idx_type=0, x_dtype=None):
    """Expand token copies sorted by expert. Returns (expanded_x [R*K, H], expanded_row_idx [R*K]
    int32, expert_tokens [E] int64 counts, expanded_scale [R*K] fp32, unused without quantization:
    zeros). Copies whose expert lies outside active_expert_range are not expanded. row_idx_type 0
    (gather): expanded_row_idx[r*K + k] is the row of expanded_x holding that copy, -1 when it is
    not expanded. Assumptions: copies of one expert keep their (row, k) order; the rows past the
    expanded ones are left zero."""
    op = "npu_moe_init_routing_v2"
    _need(x.dim() == 2 and x.dtype in FLOATS + (torch.int8,), op, "x must be 2-D float16/bfloat16/float32/int8")
    _need(expert_idx.dim() == 2 and expert_idx.dtype == torch.int32 and expert_idx.shape[0] == x.shape[0], op,
          "expert_idx must be [NUM_ROWS, K] int32")
    _need(0 < expert_num <= INIT_ROUTING_MAX_EXPERTS, op, f"expert_num={expert_num} outside (0, 10240]")
    _need(drop_pad_mode == 0, op, "only drop_pad_mode=0 is supported")
    _need(expert_tokens_num_type in (1, 2) and expert_tokens_num_flag, op,
          "expert_tokens_num_type must be 1 or 2 with expert_tokens_num_flag=True")
    _need(quant_mode == -1 and scale is None and offset is None and x_dtype is None, op,
          "only the unquantized mode (quant_mode=-1, no scale/offset/x_dtype) is emulated")
    _need(row_idx_type == 0, op, "only row_idx_type=0 is emulated")
    _need(active_num <= 0, op, "active_num > 0 (a cap on the expanded rows) is not emulated")
    start, end = tuple(active_expert_range) if active_expert_range else (0, expert_num)
    _need(0 <= start < end <= expert_num, op, "active_expert_range must satisfy 0 <= start < end <= expert_num")
    _need(bool((expert_idx < expert_num).all()), op, "an expert id exceeds expert_num")
    R, K = expert_idx.shape
    flat = expert_idx.reshape(-1).long()
    active = (flat >= start) & (flat < end)
    copies = torch.nonzero(active).flatten()
    order = copies[torch.sort(flat[copies], stable=True).indices]
    expanded = torch.zeros(R * K, x.shape[1], dtype=x.dtype)
    expanded[: order.numel()] = x[order // K]
    row_idx = torch.full((R * K,), -1, dtype=torch.int32)
    row_idx[order] = torch.arange(order.numel(), dtype=torch.int32)
    counts = torch.bincount(flat[active] - start, minlength=end - start).to(torch.int64)
    if expert_tokens_num_type == 2:
        pairs = torch.zeros(expert_num, 2, dtype=torch.int64)
        nz = torch.nonzero(counts).flatten()
        pairs[: nz.numel(), 0], pairs[: nz.numel(), 1] = nz + start, counts[nz]
        counts = pairs
    return expanded, row_idx, counts, torch.zeros(R * K, dtype=torch.float32)


def _weight_layout_ok(w: torch.Tensor) -> bool:
    """A [G, K, N] weight either contiguous or the transposed view of a contiguous [G, N, K] (the
    layout torch_npu's meta function recognizes as a transposed weight); nothing else."""
    G, K, N = w.shape
    if w.is_contiguous():
        return True
    return w.stride(1) == 1 and w.stride(2) == K and (G == 1 or w.stride(0) == K * N)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None):
    """y_i = x_i @ weight_i, the single-tensor grouped form: x=[X [M, K]], weight=[W [G, K, N]]
    (contiguous, or the transposed view of a contiguous [G, N, K]), group_list [G] int64
    (group_list_type 0: cumulative ends, 1: counts) covering exactly the M rows, G <= 1024,
    group_type 0 (split M), split_item 2 or 3 -> [Y [M, N]] in x's dtype (fp32 accumulation:
    assumption)."""
    op = "npu_grouped_matmul"
    _need(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)) and len(x) == 1 and len(weight) == 1, op,
          "only the single-tensor grouped form (x=[X], weight=[W]) is emulated")
    X, W = x[0], weight[0]
    _need(X.dtype in FLOATS and W.dtype == X.dtype, op, "x and weight must share a float16/bfloat16/float32 dtype")
    _need(X.dim() == 2 and W.dim() == 3 and W.shape[1] == X.shape[1], op, "x [M, K] and weight [G, K, N] expected")
    _need(X.is_contiguous(), op, "x must be contiguous")
    _need(_weight_layout_ok(W), op, "weight must be contiguous [G, K, N] or the transposed view of a contiguous "
          f"[G, N, K] (got strides {tuple(W.stride())})")
    _need(split_item in (2, 3) and group_type == 0, op, "split_item must be 2 or 3 with group_type=0")
    _need(W.shape[0] <= GMM_MAX_GROUPS, op, f"{W.shape[0]} groups > {GMM_MAX_GROUPS}")
    _need(group_list is not None and group_list.dim() == 1 and group_list.shape[0] == W.shape[0], op,
          "group_list must be a 1-D tensor with one entry per group")
    _need(group_list.dtype == torch.int64 and group_list_type in (0, 1), op, "group_list int64 with group_list_type 0/1")
    _need(all(v is None for v in (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
                                  activation_input, activation_quant_scale, activation_quant_offset, tuning_config,
                                  output_dtype, x_dtype, weight_dtype, scale_dtype, per_token_scale_dtype)), op,
          "quantized / biased / typed variants are not emulated")
    _need(act_type == 0, op, "fused activations (act_type != 0) are not emulated")
    counts = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))
    _need(bool((counts >= 0).all()), op, "group_list has a negative group size")
    _need(int(counts.sum()) == X.shape[0], op, f"group_list covers {int(counts.sum())} rows, x has {X.shape[0]} "
          "(sum(group_list) must equal the rows of x)")
    out = torch.empty((X.shape[0], W.shape[2]), dtype=X.dtype)
    start = 0
    for g, n in enumerate(counts.tolist()):
        out[start:start + n] = (X[start:start + n].float() @ W[g].float()).to(out.dtype)
        start += n
    return [out]


def npu_swiglu(self, dim=-1):
    """swish(A) * B with A, B the two halves of self along dim (fp32/fp16/bf16, 1-8 dims)."""
    x = self
    _need(x.dtype in FLOATS and 1 <= x.dim() <= 8, "npu_swiglu", "x must be 1-8-D float32/float16/bfloat16")
    a, b = x.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


def _causal_visible(S1, S2, q_len, kv_len, sparse_mode):
    t = torch.arange(S1).view(S1, 1)
    s = torch.arange(S2).view(1, S2)
    vis = (s < kv_len) & (t < q_len)
    if sparse_mode == 3:                                   # rightDownCausal: the last valid query sees the last key
        vis = vis & (s <= t + (kv_len - q_len))
    return vis


_INT64_MAX = 9223372036854775807


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=_INT64_MAX, next_tokens=_INT64_MAX, return_value=False):
    """score[b,t,s] = sum_n weights[b,t,n] * relu(query[b,t,n] . key[b,s]) (fp32), top sparse_count
    visible keys per query, -1 for the unused tail (valid entries first). query [B, S1, N1, D] with
    D = 128 and N1 <= 64 (A2/A3), key [B, S2, N2=1, D], weights [B, S1, N1]; bfloat16/float16;
    BSND only. sparse_mode 3 (rightDownCausal) aligns the last valid query
    (actual_seq_lengths_query[b]) with the last valid key (actual_seq_lengths_key[b]).
    Returns (sparse_indices [B, S1, N2, sparse_count] int32, sparse_values: the selected scores in
    query's dtype, same shape, when return_value, else an empty [0] tensor).
    Assumptions: ties to the lower index, NaN last; queries past actual_seq_lengths_query get -1;
    the value of a -1 slot is -inf."""
    op = "npu_lightning_indexer"
    _contig(op, query=query, key=key, weights=weights)
    _need(layout_query == "BSND" and layout_key == "BSND" and block_table is None, op, "only BSND without paging")
    _need(query.dtype in HALF and key.dtype in HALF and weights.dtype in HALF, op,
          "query, key and weights must be bfloat16 or float16")
    _need(query.dim() == 4 and key.dim() == 4 and key.shape[2] == 1, op, "query [B,S1,N1,D], key [B,S2,1,D] expected")
    B, S1, N1, D = query.shape
    S2 = key.shape[1]
    _need(D == INDEXER_HEAD_DIM, op, f"head dim D={D}, must be {INDEXER_HEAD_DIM}")
    _need(N1 <= INDEXER_MAX_HEADS, op, f"{N1} query heads > {INDEXER_MAX_HEADS}")
    _need(key.shape[0] == B and key.shape[3] == D and tuple(weights.shape) == (B, S1, N1), op, "shapes disagree")
    _need(sparse_count in SPARSE_COUNTS, op, f"sparse_count={sparse_count} not in 1-2048, 3072, ..., 8192")
    _need(sparse_mode in (0, 3), op, f"sparse_mode={sparse_mode} not in (0, 3)")
    _need(pre_tokens == _INT64_MAX and next_tokens == _INT64_MAX, op, "pre_tokens / next_tokens are not emulated")
    for name, t, lim in (("actual_seq_lengths_query", actual_seq_lengths_query, S1),
                         ("actual_seq_lengths_key", actual_seq_lengths_key, S2)):
        if t is not None:
            _need(t.dtype == torch.int32 and tuple(t.shape) == (B,), op, f"{name} must be [B] int32")
            _need(bool(((t >= 0) & (t <= lim)).all()), op, f"{name} outside [0, {lim}]")
    out = torch.full((B, S1, 1, sparse_count), -1, dtype=torch.int32)
    vals = torch.full((B, S1, 1, sparse_count), float("-inf"), dtype=query.dtype)
    for b in range(B):
        q_len = S1 if actual_seq_lengths_query is None else int(actual_seq_lengths_query[b])
        kv_len = S2 if actual_seq_lengths_key is None else int(actual_seq_lengths_key[b])
        logits = torch.einsum("tnd,sd->tns", query[b].float(), key[b, :, 0].float())
        score = (weights[b].float()[..., None] * torch.relu(logits)).sum(1)          # [S1, S2]
        vis = _causal_visible(S1, S2, q_len, kv_len, sparse_mode)
        score = torch.where(torch.isnan(score), float("-inf"), score)
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        order = order.gather(-1, torch.sort(vis.gather(-1, order).to(torch.int8), dim=-1, descending=True,
                                            stable=True).indices)
        n = min(sparse_count, S2)
        valid = torch.arange(n) < vis.sum(-1, keepdim=True)
        out[b, :, 0, :n] = torch.where(valid, order[:, :n], -1).to(torch.int32)
        vals[b, :, 0, :n] = torch.where(valid, score.gather(-1, order[:, :n]), float("-inf")).to(query.dtype)
    return out, (vals if return_value else torch.empty(0, dtype=query.dtype))


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                               sparse_mode=3, pre_tokens=_INT64_MAX, next_tokens=_INT64_MAX, attention_mode=0,
                               return_softmax_lse=False, sinks=None):
    """MLA-absorbed sparse attention (attention_mode 2: value is key): each query attends to the
    keys in sparse_indices [B, S1, N2=1, K] (valid entries first, -1 after) with scores
    scale_value * (query . key + query_rope . key_rope) and an fp32 softmax. query [B, S1, N1, 512]
    with N1 in {1, 2, 4, ..., 128}, query_rope [B, S1, N1, 64], key = value [B, S2, 1, 512],
    key_rope [B, S2, 1, 64]; bf16/fp16; BSND; sparse_mode 0; sparse_block_size 1.
    Returns (out [B, S1, N1, 512] query dtype, softmax_max, softmax_sum), the last two
    [B, N2, S1, N1/N2] fp32 (the max of the scaled scores and the sum of exp(score - max)) when
    return_softmax_lse, else empty [0] fp32. Assumption: a query with no valid index gives out 0,
    softmax_max -inf, softmax_sum 0."""
    op = "npu_sparse_flash_attention"
    _contig(op, query=query, key=key, value=value, sparse_indices=sparse_indices, query_rope=query_rope,
            key_rope=key_rope)
    _need(layout_query == "BSND" and layout_kv == "BSND" and block_table is None, op, "only BSND without paging")
    _need(attention_mode == SFA_ATTENTION_MODE, op, f"attention_mode={attention_mode}: only 2 (MLA absorbed) is supported")
    _need(value is not None and value.data_ptr() == key.data_ptr() and value.shape == key.shape
          and value.stride() == key.stride(), op, "attention_mode 2 takes value = key (one KV tensor)")
    _need(all(t is not None and t.dtype in HALF for t in (query, key, query_rope, key_rope)), op,
          "query/key/query_rope/key_rope must be given, bfloat16 or float16")
    _need(sparse_indices.dtype == torch.int32 and sparse_indices.dim() == 4, op, "sparse_indices [B,S1,N2,K] int32")
    _need(sparse_mode == 0 and sparse_block_size == 1, op, "sparse_mode 0 with sparse_block_size 1 expected "
          "(sparse_mode 3 is not emulated)")
    _need(actual_seq_lengths_query is None and actual_seq_lengths_kv is None and sinks is None
          and pre_tokens == _INT64_MAX and next_tokens == _INT64_MAX, op,
          "actual_seq_lengths / sinks / pre_tokens / next_tokens are not emulated")
    B, S1, N1, D = query.shape
    S2, N2 = key.shape[1], key.shape[2]
    _need(D == SFA_NOPE_DIM and key.shape[3] == SFA_NOPE_DIM, op, f"query/key head dim {D}/{key.shape[3]}, must be 512")
    _need(tuple(query_rope.shape) == (B, S1, N1, SFA_ROPE_DIM) and tuple(key_rope.shape) == (B, S2, N2, SFA_ROPE_DIM),
          op, "query_rope [B,S1,N1,64] and key_rope [B,S2,N2,64] expected")
    _need(N2 == 1, op, f"{N2} KV heads: exactly one is supported")
    _need(N1 in SFA_Q_HEADS, op, f"{N1} query heads: must be 1, 2, 4, ..., 128")
    _need(tuple(sparse_indices.shape[:3]) == (B, S1, N2), op, "sparse_indices shape disagrees with query/key")
    valid = sparse_indices >= 0
    _need(bool((valid[..., 1:] <= valid[..., :-1]).all()), op, "valid indices must come first, -1 after")
    _need(bool((sparse_indices < S2).all()), op, "an index >= the key length")
    idx = sparse_indices.clamp_min(0).long()
    out = torch.zeros(B, S1, N1, D, dtype=query.dtype)
    mx = torch.full((B, N2, S1, N1 // N2), float("-inf"))
    sm = torch.zeros(B, N2, S1, N1 // N2)
    for b in range(B):
        sel = idx[b, :, 0]                                                     # [S1, K]
        kv = key[b, :, 0].float()[sel]                                         # [S1, K, 512]
        s = torch.einsum("tgd,tkd->tgk", query[b].float(), kv)
        s = s + torch.einsum("tgd,tkd->tgk", query_rope[b].float(), key_rope[b, :, 0].float()[sel])
        s = (s * scale_value).masked_fill(~valid[b, :, 0][:, None, :], float("-inf"))
        m = s.amax(-1)                                                         # [S1, N1]
        e = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)[..., None])
        z = e.sum(-1)
        p = torch.where(z[..., None] > 0, e / z.clamp_min(1e-30)[..., None], 0.0)
        out[b] = torch.einsum("tgk,tkd->tgd", p, kv).to(query.dtype)
        mx[b, 0], sm[b, 0] = m, z
    if not return_softmax_lse:
        mx, sm = torch.empty(0), torch.empty(0)
    return out, mx, sm


def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                             export_for_source_row, drop_pad_mode=0, k=1):
    """out[i] = skip1[i] + skip2[i] + sum_k scales[i, k] * (rows[src_to_dst[i + k * NUM_ROWS]] +
    bias[expert[i, k]]). rows [NUM_ROWS * K, H] float16/bfloat16/float32; scales [NUM_ROWS, K] with
    the rows' dtype; src_to_dst int32 in [0, NUM_ROWS * K) (drop_pad_mode 0: every copy has a row).
    Assumption (undocumented): the sum accumulates in fp32 and is rounded to the rows' dtype."""
    op = "npu_moe_finalize_routing"
    rows = expanded_permuted_rows
    _need(rows.dim() == 2 and rows.dtype in FLOATS, op, "expanded_permuted_rows must be 2-D float16/bfloat16/float32")
    _need(drop_pad_mode == 0, op, "only drop_pad_mode=0 is supported")
    _need(skip2 is not None or skip1 is None, op, "skip1 needs skip2")
    R = rows.shape[0]
    K = scales.shape[1] if scales is not None else k
    _need(R % K == 0, op, "expanded_permuted_rows must have NUM_ROWS * K rows")
    T = R // K
    _need(scales is None or (scales.dtype == rows.dtype and tuple(scales.shape) == (T, K)), op,
          "scales must be [NUM_ROWS, K] with the rows' dtype")
    _need(expanded_src_to_dst_row.dtype == torch.int32 and expanded_src_to_dst_row.shape == (R,), op,
          "expanded_src_to_dst_row must be [NUM_ROWS * K] int32")
    _need(bool(((expanded_src_to_dst_row >= 0) & (expanded_src_to_dst_row < R)).all()), op,
          "expanded_src_to_dst_row values must lie in [0, NUM_ROWS * K)")
    _need(bias is None or export_for_source_row is not None, op, "bias needs export_for_source_row")
    dst = expanded_src_to_dst_row.long().view(K, T)                  # index i + k * NUM_ROWS
    picked = rows.float()[dst]                                       # [K, T, H]
    if bias is not None:
        picked = picked + bias.float()[export_for_source_row.long().t()]
    w = scales.float().t()[..., None] if scales is not None else 1.0
    out = (picked * w).sum(0)
    for s in (skip1, skip2):
        if s is not None:
            out = out + s.float()
    return out.to(rows.dtype)


IMPLS = {f.__name__: f for f in (npu_moe_gating_top_k, npu_moe_gating_top_k_softmax, npu_moe_init_routing_v2,
                                 npu_grouped_matmul, npu_swiglu, npu_lightning_indexer, npu_sparse_flash_attention,
                                 npu_moe_finalize_routing)}
