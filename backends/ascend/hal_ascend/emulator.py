"""A CPU emulator of the torch_npu ops hal-ascend calls, written from their documentation
(torch_npu 2.13.0 ``_op_plugin_docs.py``; output shapes as in its meta registrations).

Each function checks the documented limits and raises :class:`NpuLimitError` on a violation, so a
backend bug that real hardware would reject fails here too. Where the documentation is silent
the emulator states its assumption in the docstring (tie order, NaN ranking, the unused rows of
an output): those are assumptions about the hardware, to be confirmed on a real NPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}


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


def npu_moe_gating_top_k(x, k, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1, group_select_mode=0,
                         renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0, eps=1e-20):
    """norm (0 softmax / 1 sigmoid) -> (+bias for selection) -> group top-k -> top-k; yOut =
    norm[ids] / (sum + eps) * routed_scaling_factor. Returns (y_out [T, k] x.dtype, expert_idx [T, k]
    int32, norm_out [T, E] fp32)."""
    op = "npu_moe_gating_top_k"
    _need(x.dim() == 2 and x.dtype in FLOATS, op, "x must be 2-D float16/bfloat16/float32")
    T, E = x.shape
    _need(E <= 2048, op, f"expert count {E} > 2048")
    _need(group_count > 0 and E % group_count == 0 and E // group_count > 2, op,
          f"x.shape[-1]={E} must divide by group_count={group_count} into groups of more than 2")
    _need(-(-(E // group_count) // 32) * 32 * group_count <= 2048, op, "32-aligned group size x group_count > 2048")
    _need(1 <= k_group <= group_count, op, f"k_group={k_group} outside [1, group_count]")
    _need(1 <= k <= E // group_count * k_group, op, f"k={k} outside [1, E / group_count * k_group]")
    _need(renorm == 0, op, "only renorm=0 is supported")
    _need(norm_type in (0, 1) and group_select_mode in (0, 1), op, "norm_type / group_select_mode must be 0 or 1")
    _need(input_ids is None and tid2eid is None, op, "hash mode is not emulated")
    if bias is not None:
        _need(bias.dim() == 1 and bias.shape[0] == E and bias.dtype == x.dtype, op, "bias must be [E] with x's dtype")
    xf = x.float()
    s = torch.softmax(xf, -1) if norm_type == 0 else torch.sigmoid(xf)
    c = s if bias is None else s + bias.float()
    c = torch.where(torch.isnan(c), float("-inf"), c)
    if group_count > 1:
        g = c.view(T, group_count, E // group_count)
        gscore = g.max(-1).values if group_select_mode == 0 else g.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros(T, group_count, dtype=torch.bool).scatter_(1, _ranked(gscore, k_group), True)
        c = c.masked_fill(~keep.repeat_interleave(E // group_count, 1), float("-inf"))
    ids = _ranked(c, k)
    w = s.gather(1, ids)
    y = w / (w.sum(-1, keepdim=True) + eps) * routed_scaling_factor
    return y.to(x.dtype), ids.to(torch.int32), s


def npu_moe_gating_top_k_softmax(x, finished=None, k=1):
    """softmax(x) then top-k: (y [.., k] x.dtype, expert_idx int32, row_idx int32)."""
    op = "npu_moe_gating_top_k_softmax"
    _need(x.dim() in (2, 3) and x.dtype in FLOATS, op, "x must be 2-D/3-D float16/bfloat16/float32")
    _need(0 < k <= x.shape[-1] and k <= 1024, op, f"k={k} outside (0, min(E, 1024)]")
    _need(finished is None, op, "finished rows are not emulated")
    s = torch.softmax(x.float(), -1)
    ids = _ranked(s, k)
    rows = torch.arange(x.numel() // x.shape[-1]).view(*x.shape[:-1], 1)
    row_idx = (torch.arange(k).view(*([1] * (x.dim() - 1)), k) * (x.numel() // x.shape[-1]) + rows).to(torch.int32)
    return s.gather(-1, ids).to(x.dtype), ids.to(torch.int32), row_idx


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1, expert_num=-1,
                            drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False, quant_mode=-1,
                            active_expert_range=(), row_idx_type=0):
    """Expand token copies sorted by expert. Returns (expanded_x [R*K, H], expanded_row_idx [R*K]
    int32, expert_tokens [E] int64 counts, expanded_scale). Copies whose expert lies outside
    active_expert_range are not expanded. row_idx_type 0 (gather): expanded_row_idx[r*K + k] is the
    row of expanded_x holding that copy, -1 when it is not expanded. Assumptions: copies of one
    expert keep their (row, k) order; the rows past the expanded ones are left zero."""
    op = "npu_moe_init_routing_v2"
    _need(x.dim() == 2 and x.dtype in FLOATS + (torch.int8,), op, "x must be 2-D float16/bfloat16/float32/int8")
    _need(expert_idx.dim() == 2 and expert_idx.dtype == torch.int32 and expert_idx.shape[0] == x.shape[0], op,
          "expert_idx must be [NUM_ROWS, K] int32")
    _need(0 < expert_num <= 10240, op, f"expert_num={expert_num} outside (0, 10240]")
    _need(drop_pad_mode == 0, op, "only drop_pad_mode=0 is supported")
    _need(expert_tokens_num_type in (1, 2) and expert_tokens_num_flag, op,
          "expert_tokens_num_type must be 1 or 2 with expert_tokens_num_flag=True")
    _need(quant_mode in (-1, 1) and scale is None and offset is None and quant_mode == -1, op,
          "only the unquantized mode (quant_mode=-1, no scale/offset) is emulated")
    _need(row_idx_type == 0, op, "only row_idx_type=0 is emulated")
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
    return expanded, row_idx, counts, torch.empty(0)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       output_dtype=None, tuning_config=None):
    """y_i = x_i @ weight_i, the single-tensor grouped form: x=[X [M, K]], weight=[W [G, K, N]],
    group_list [G] (group_list_type 0: cumulative ends, 1: counts), group_type 0 (split M),
    split_item 2 or 3 -> [Y [M, N]]. Rows past the last group are undefined on the device: the
    emulator fills them with NaN so a caller that reads them is caught."""
    op = "npu_grouped_matmul"
    _need(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)) and len(x) == 1 and len(weight) == 1, op,
          "only the single-tensor grouped form (x=[X], weight=[W]) is emulated")
    X, W = x[0], weight[0]
    _need(X.dtype in FLOATS and W.dtype == X.dtype, op, "x and weight must share a float16/bfloat16/float32 dtype")
    _need(X.dim() == 2 and W.dim() == 3 and W.shape[1] == X.shape[1], op, "x [M, K] and weight [G, K, N] expected")
    _need(split_item in (2, 3) and group_type == 0, op, "split_item must be 2 or 3 with group_type=0")
    _need(group_list is not None and group_list.dim() == 1 and group_list.shape[0] == W.shape[0], op,
          "group_list must be a 1-D tensor with one entry per group")
    _need(group_list.dtype == torch.int64 and group_list_type in (0, 1), op, "group_list int64 with group_list_type 0/1")
    _need(all(v is None for v in (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale)), op,
          "quantized / biased variants are not emulated")
    counts = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))
    _need(bool((counts >= 0).all()) and int(counts.sum()) <= X.shape[0], op, "group_list exceeds the rows of x")
    out = torch.full((X.shape[0], W.shape[2]), float("nan"), dtype=output_dtype or X.dtype)
    start = 0
    for g, n in enumerate(counts.tolist()):
        out[start:start + n] = (X[start:start + n].float() @ W[g].float()).to(out.dtype)
        start += n
    return [out]


def npu_swiglu(x, dim=-1):
    """swish(A) * B with A, B the two halves of x along dim (fp32/fp16/bf16, 1-8 dims)."""
    _need(x.dtype in FLOATS and 1 <= x.dim() <= 8, "npu_swiglu", "x must be 1-8-D float32/float16/bfloat16")
    a, b = x.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


def _causal_visible(S1, S2, q_len, kv_len, sparse_mode):
    t = torch.arange(S1).view(S1, 1)
    s = torch.arange(S2).view(1, S2)
    vis = (s < kv_len) & (t < q_len)
    if sparse_mode == 3:                                   # rightDownCausal: the last query sees the last key
        vis = vis & (s <= t + (kv_len - q_len))
    return vis


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3):
    """score[b,t,s] = sum_n weights[b,t,n] * relu(query[b,t,n] . key[b,s]) (fp32), top sparse_count
    visible keys per query, -1 for the unused tail (valid entries first). query [B, S1, N1, D],
    key [B, S2, N2=1, D], weights [B, S1, N1]; bfloat16/float16; BSND only. Output
    [B, S1, N2, sparse_count] int32. Assumptions: ties to the lower index, NaN last; queries past
    actual_seq_lengths_query get -1."""
    op = "npu_lightning_indexer"
    _contig(op, query=query, key=key, weights=weights)
    _need(layout_query == "BSND" and layout_key == "BSND" and block_table is None, op, "only BSND without paging")
    _need(query.dtype in HALF and key.dtype in HALF and weights.dtype in HALF, op,
          "query, key and weights must be bfloat16 or float16")
    _need(query.dim() == 4 and key.dim() == 4 and key.shape[2] == 1, op, "query [B,S1,N1,D], key [B,S2,1,D] expected")
    B, S1, N1, D = query.shape
    S2 = key.shape[1]
    _need(key.shape[0] == B and key.shape[3] == D and tuple(weights.shape) == (B, S1, N1), op, "shapes disagree")
    _need(sparse_count in SPARSE_COUNTS, op, f"sparse_count={sparse_count} not in 1-2048, 3072, ..., 8192")
    _need(sparse_mode in (0, 3), op, f"sparse_mode={sparse_mode} not in (0, 3)")
    for name, t, lim in (("actual_seq_lengths_query", actual_seq_lengths_query, S1),
                         ("actual_seq_lengths_key", actual_seq_lengths_key, S2)):
        if t is not None:
            _need(t.dtype == torch.int32 and t.shape == (B,), op, f"{name} must be [B] int32")
            _need(bool(((t >= 0) & (t <= lim)).all()), op, f"{name} outside [0, {lim}]")
    out = torch.full((B, S1, 1, sparse_count), -1, dtype=torch.int32)
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
        picked = torch.where(torch.arange(n) < vis.sum(-1, keepdim=True), order[:, :n], -1)
        out[b, :, 0, :n] = picked.to(torch.int32)
    return out


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, sparse_block_size, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None, key_rope=None,
                               layout_query="BSND", layout_kv="BSND", sparse_mode=3):
    """Attention of each query over the keys in sparse_indices [B, S1, N2, K] (valid entries first,
    -1 after), fp32 softmax with scale_value; MLA split: query/key hold the 512 "nope" dims and
    query_rope/key_rope the 64 rope dims (scores add both). query [B, S1, N1, D], key/value
    [B, S2, N2, D] bf16/fp16, BSND. sparse_mode 0 (all selected) or 3 (rightDownCausal on top).
    Output [B, S1, N1, Dv] in query's dtype; a query with no valid index gives 0 (assumption)."""
    op = "npu_sparse_flash_attention"
    _contig(op, query=query, key=key, value=value, sparse_indices=sparse_indices, query_rope=query_rope,
            key_rope=key_rope)
    _need(layout_query == "BSND" and layout_kv == "BSND" and block_table is None, op, "only BSND without paging")
    _need(all(t.dtype in HALF for t in (query, key, value)), op, "query/key/value must be bfloat16 or float16")
    _need(sparse_indices.dtype == torch.int32 and sparse_indices.dim() == 4, op, "sparse_indices [B,S1,N2,K] int32")
    _need(sparse_mode in (0, 3) and sparse_block_size == 1, op, "sparse_mode 0/3 with sparse_block_size 1 expected")
    B, S1, N1, D = query.shape
    S2, N2 = key.shape[1], key.shape[2]
    _need(N1 % N2 == 0 and tuple(sparse_indices.shape[:3]) == (B, S1, N2), op, "head counts / index shape disagree")
    valid = sparse_indices >= 0
    _need(bool((valid[..., 1:] <= valid[..., :-1]).all()), op, "valid indices must come first, -1 after")
    _need(bool((sparse_indices < S2).all()), op, "an index >= the key length")
    if query_rope is not None:
        _need(key_rope is not None and query_rope.shape[:3] == query.shape[:3], op, "query_rope/key_rope disagree")
    idx = sparse_indices.clamp_min(0).long()
    G = N1 // N2
    out = torch.zeros(B, S1, N1, value.shape[3], dtype=query.dtype)
    for b in range(B):
        for n2 in range(N2):
            sel = idx[b, :, n2]                                                   # [S1, K]
            k = key[b, :, n2].float()[sel]                                        # [S1, K, D]
            v = value[b, :, n2].float()[sel]
            q = query[b, :, n2 * G:(n2 + 1) * G].float()                          # [S1, G, D]
            s = torch.einsum("tgd,tkd->tgk", q, k)
            if query_rope is not None:
                s = s + torch.einsum("tgd,tkd->tgk", query_rope[b, :, n2 * G:(n2 + 1) * G].float(),
                                     key_rope[b, :, n2].float()[sel])
            s = (s * scale_value).masked_fill(~valid[b, :, n2][:, None, :], float("-inf"))
            any_valid = valid[b, :, n2].any(-1)[:, None, None]
            p = torch.where(any_valid, torch.softmax(s, -1), 0.0)
            out[b, :, n2 * G:(n2 + 1) * G] = torch.einsum("tgk,tkd->tgd", p, v).to(query.dtype)
    return out


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
