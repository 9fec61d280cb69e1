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
from hal_ascend.limits import (CHUNK_GDR_HEAD_DIM, CHUNK_GDR_MAX_HEADS, CONV_DIM_MULTIPLE, CONV_WIDTH,
                               EMULATED_GDR_CHUNK, RECURRENT_GDR_MAX_HEAD_DIM, RECURRENT_GDR_MAX_HEADS,
                               RECURRENT_GDR_MAX_TOKENS, gdr_state_dtype)


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


# --- linear attention ---------------------------------------------------------------------------

def _gdr_common(op, query, key, value, beta, g, state, actual_seq_lengths, scale, state_name):
    """The shared argument rules of the two GDR ops (TND layout); returns (Nk, Nv, Dk, Dv, lengths)."""
    _contig(op, query=query, key=key, value=value, beta=beta, g=g, **{state_name: state})
    _need(all(t is not None for t in (beta, g, state, actual_seq_lengths, scale)), op,
          f"beta, g, {state_name}, actual_seq_lengths and scale are required")
    _need(query.dtype == key.dtype == value.dtype == beta.dtype == torch.bfloat16, op,
          "query, key, value and beta must be bfloat16")
    _need(state.dtype == gdr_state_dtype(), op, f"{state_name} must be {gdr_state_dtype()} (got {state.dtype})")
    _need(g.dtype == torch.float32, op, "g must be float32")
    _need(query.dim() == key.dim() == value.dim() == 3 and query.shape == key.shape, op,
          "query/key [T, Nk, Dk] and value [T, Nv, Dv] expected")
    T, Nk, Dk = query.shape
    Nv, Dv = value.shape[1], value.shape[2]
    _need(value.shape[0] == T and Nv % Nk == 0, op, "value must be [T, Nv, Dv] with Nv a multiple of Nk")
    _need(tuple(beta.shape) == (T, Nv) and tuple(g.shape) == (T, Nv), op, "beta and g must be [T, Nv]")
    _need(state.dim() == 4 and tuple(state.shape[1:]) == (Nv, Dv, Dk), op, f"{state_name} must be [N, Nv, Dv, Dk]")
    _need(actual_seq_lengths.dtype == torch.int32 and actual_seq_lengths.dim() == 1, op,
          "actual_seq_lengths must be [B] int32")
    lengths = actual_seq_lengths.tolist()
    _need(sum(lengths) == T, op, f"actual_seq_lengths sum to {sum(lengths)}, the inputs have T={T} tokens")
    return Nk, Nv, Dk, Dv, lengths


def _decayed_update(S, q, k, v, g, beta, scale):
    """One token of the gated delta rule for every head at once, in the ops' [Nv, Dv, Dk] state
    layout (S maps keys to values): S <- exp(g) S; S <- S + beta (v - S k) k^T; o = scale S q."""
    S = S * torch.exp(g)[:, None, None]
    u = beta[:, None] * (v - (S @ k[:, :, None])[..., 0])
    S = S + u[:, :, None] * k[:, None, :]
    return S, scale * (S @ q[:, :, None])[..., 0]


def _chunk(S, q, k, v, g, beta, scale):
    """One chunk of C tokens (the WY / UT form) for every head: S [Nv, Dv, Dk] the state at its
    start, q/k [C, Nv, Dk], v [C, Nv, Dv], g/beta [C, Nv] -> (o [C, Nv, Dv], S at its end).
    With gamma the within-chunk cumulative log-decay, u solves (I + A) u = beta (v - e^gamma S k),
    A[t, s] = beta_t e^(gamma_t - gamma_s) k_t.k_s for s < t; o_t = e^gamma_t S q_t +
    sum_{s<=t} e^(gamma_t - gamma_s) (k_s.q_t) u_s; S' = e^gamma_C S + sum_s e^(gamma_C - gamma_s) u_s k_s^T."""
    C = q.shape[0]
    gamma = torch.cumsum(g, 0).transpose(0, 1)                                   # [Nv, C]
    qh, kh, vh, bh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), beta.transpose(0, 1)
    diff = gamma[:, :, None] - gamma[:, None, :]                                 # [Nv, t, s]
    lower = torch.ones(C, C, dtype=torch.bool).tril()
    decay = torch.where(lower, torch.exp(torch.where(lower, diff, 0.0)), 0.0)
    strict = decay * (~torch.eye(C, dtype=torch.bool))
    A = bh[:, :, None] * strict * (kh @ kh.transpose(1, 2))
    rhs = bh[:, :, None] * (vh - torch.exp(gamma)[:, :, None] * (kh @ S.transpose(1, 2)))
    u = torch.linalg.solve_triangular(torch.eye(C, dtype=S.dtype) + A, rhs, upper=False)   # [Nv, C, Dv]
    o = torch.exp(gamma)[:, :, None] * (qh @ S.transpose(1, 2)) + (decay * (qh @ kh.transpose(1, 2))) @ u
    tail = torch.exp(gamma[:, -1:] - gamma)                                      # [Nv, C]
    S = torch.exp(gamma[:, -1])[:, None, None] * S + (u * tail[:, :, None]).transpose(1, 2) @ kh
    return (scale * o).transpose(0, 1), S


def npu_chunk_gated_delta_rule(query, key, value, *, beta=None, initial_state=None, actual_seq_lengths=None,
                               scale=None, g=None):
    """Chunked gated delta rule over packed sequences (TND): query/key [T, Nk, Dk], value
    [T, Nv, Dv], beta [T, Nv] (all bfloat16), g [T, Nv] float32 log-decays, initial_state
    [B, Nv, Dv, Dk] (the state maps keys to values; bfloat16 as documented, float32 under
    ``HAL_ASCEND_GDR_STATE_DTYPE=float32``), actual_seq_lengths [B] int32 (sum T).
    Value head h reads key head h // (Nv / Nk). Per sequence and token: S <- exp(g) S,
    S <- S + beta (v - S k) k^T, o = scale * S q -- the decay before the update (CANN's formula
    ``S_t = a_t S_{t-1} + b_t (v_t - a_t S_{t-1} k_t) k_t^T``). No l2norm of q/k inside (vllm-ascend
    normalizes them before the call). Returns (out [T, Nv, Dv] bfloat16, final_state
    [B, Nv, Dv, Dk] in initial_state's dtype). Limits: Dk = Dv = 128, Nk, Nv <= 64.
    Assumptions: chunks of 64 tokens carried in fp32, the state read and written in its own
    dtype; a sequence of length 0 keeps its initial state."""
    op = "npu_chunk_gated_delta_rule"
    Nk, Nv, Dk, Dv, lengths = _gdr_common(op, query, key, value, beta, g, initial_state, actual_seq_lengths, scale,
                                          "initial_state")
    _need(Dk == CHUNK_GDR_HEAD_DIM and Dv == CHUNK_GDR_HEAD_DIM, op, f"Dk={Dk}, Dv={Dv}: both must be 128")
    _need(Nk <= CHUNK_GDR_MAX_HEADS and Nv <= CHUNK_GDR_MAX_HEADS, op, f"Nk={Nk}, Nv={Nv}: at most 64 heads")
    _need(initial_state.shape[0] == len(lengths), op, "initial_state must have one row per sequence")
    rep = Nv // Nk
    q = query.float().repeat_interleave(rep, 1)
    k = key.float().repeat_interleave(rep, 1)
    v, gf, bf = value.float(), g.float(), beta.float()
    out = torch.zeros(query.shape[0], Nv, Dv)
    final = torch.empty_like(initial_state)
    start = 0
    for b, n in enumerate(lengths):
        S = initial_state[b].float()
        for c in range(start, start + n, EMULATED_GDR_CHUNK):
            e = min(c + EMULATED_GDR_CHUNK, start + n)
            out[c:e], S = _chunk(S, q[c:e], k[c:e], v[c:e], gf[c:e], bf[c:e], float(scale))
        final[b] = S.to(final.dtype)
        start += n
    return out.to(torch.bfloat16), final


def npu_recurrent_gated_delta_rule(query, key, value, state, *, beta=None, scale=None, actual_seq_lengths=None,
                                   ssm_state_indices=None, num_accepted_tokens=None, g=None, gk=None):
    """Token-by-token gated delta rule with a state pool updated in place: query/key [T, Nk, Dk],
    value [T, Nv, Dv], beta [T, Nv] (bfloat16), g [T, Nv] float32, state [BlockNum, Nv, Dv, Dk]
    (in :func:`hal_ascend.limits.gdr_state_dtype`), actual_seq_lengths [B] int32 with
    1 <= L_i <= 8, ssm_state_indices [T] int32:
    ``state[ssm_state_indices[i]]`` is token i's state. Same per-token rule as
    :func:`npu_chunk_gated_delta_rule`. Returns out [T, Nv, Dv] bfloat16. Limits: Nk, Nv <= 256,
    Dk, Dv <= 256; gk (per-channel decay) unsupported.
    Assumptions (vLLM's convention, not spelled out in the docs): sequence b starts from
    ``state[ssm_state_indices[start_b + num_accepted_tokens[b] - 1]]`` (num_accepted_tokens None:
    1), and after each of its tokens the state is written to that token's slot."""
    op = "npu_recurrent_gated_delta_rule"
    Nk, Nv, Dk, Dv, lengths = _gdr_common(op, query, key, value, beta, g, state, actual_seq_lengths, scale, "state")
    _need(gk is None, op, "gk (per-channel decay) is not supported in this version")
    _need(Nk <= RECURRENT_GDR_MAX_HEADS and Nv <= RECURRENT_GDR_MAX_HEADS, op, f"Nk={Nk}, Nv={Nv}: at most 256 heads")
    _need(Dk <= RECURRENT_GDR_MAX_HEAD_DIM and Dv <= RECURRENT_GDR_MAX_HEAD_DIM, op,
          f"Dk={Dk}, Dv={Dv}: at most 256")
    _need(all(1 <= n <= RECURRENT_GDR_MAX_TOKENS for n in lengths), op,
          f"sequence lengths {lengths}: each must be in [1, {RECURRENT_GDR_MAX_TOKENS}]")
    T = query.shape[0]
    _need(ssm_state_indices is not None and ssm_state_indices.dtype == torch.int32
          and tuple(ssm_state_indices.shape) == (T,), op, "ssm_state_indices must be [T] int32")
    slots = ssm_state_indices.tolist()
    _need(all(0 <= s < state.shape[0] for s in slots), op, "ssm_state_indices outside [0, BlockNum)")
    accepted = [1] * len(lengths) if num_accepted_tokens is None else num_accepted_tokens.tolist()
    rep = Nv // Nk
    q = query.float().repeat_interleave(rep, 1)
    k = key.float().repeat_interleave(rep, 1)
    v, gf, bf = value.float(), g.float(), beta.float()
    out = torch.zeros(T, Nv, Dv)
    start = 0
    for n, a in zip(lengths, accepted):
        _need(1 <= a <= n, op, "num_accepted_tokens outside [1, L_i]")
        S = state[slots[start + a - 1]].float()
        for t in range(start, start + n):
            S, out[t] = _decayed_update(S, q[t], k[t], v[t], gf[t], bf[t], float(scale))
            state[slots[t]] = S.to(state.dtype)
        start += n
    return out.to(torch.bfloat16)


def npu_fused_causal_conv1d(x, weight, conv_states, *, query_start_loc=None, cache_indices=None,
                            initial_state_mode=None, bias=None, num_accepted_tokens=None, activation="None",
                            pad_slot_id=-1, run_mode=0, residual_connection=0, max_query_len=-1,
                            num_computed_tokens=None, block_idx_first_scheduled_token=None,
                            block_idx_last_scheduled_token=None, initial_state_idx=None, block_size=128,
                            conv_mode="default"):
    """Depthwise causal conv1d over packed sequences, continuing from and updating a window pool
    in place: x [cu_seq_len, dim] (float16/bfloat16, dim % 128 == 0) with query_start_loc
    [batch + 1] (or x [batch, seq_len, dim]), weight [K = 3, dim] (x's dtype: assumption),
    conv_states [N, K-1, dim] (x's dtype), cache_indices [batch]: sequence b continues from
    ``conv_states[cache_indices[b]]`` (oldest row first) and that row becomes the last K-1 rows
    of cat(window, x_b); ``cache_indices[b] == pad_slot_id`` skips sequence b.
    ``y[t] = sum_j weight[j] * xs[t + j]`` (weight[K-1] meets the current token), plus x when
    residual_connection = 1. Returns y (x's shape and dtype). Emulated: the default mode without
    APC, bias, activation, initial_state_mode, run_mode or num_accepted_tokens (the docs mark
    bias, activation, initial_state_mode and run_mode "not supported yet").
    Assumptions: fp32 accumulation; rows of a skipped sequence are 0."""
    op = "npu_fused_causal_conv1d"
    _contig(op, x=x, weight=weight, conv_states=conv_states)
    _need(x.dtype in HALF and weight.dtype == x.dtype and conv_states.dtype == x.dtype, op,
          "x, weight and conv_states must share a float16/bfloat16 dtype")
    _need(x.dim() in (2, 3), op, "x must be [cu_seq_len, dim] or [batch, seq_len, dim]")
    D = x.shape[-1]
    _need(D % CONV_DIM_MULTIPLE == 0, op, f"dim={D} must be a multiple of {CONV_DIM_MULTIPLE}")
    _need(weight.dim() == 2 and tuple(weight.shape) == (CONV_WIDTH, D), op, f"weight must be [3, dim={D}]")
    _need(conv_states.dim() == 3 and tuple(conv_states.shape[1:]) == (CONV_WIDTH - 1, D), op,
          "conv_states must be [N, 2, dim]")
    _need(bias is None and initial_state_mode is None and num_accepted_tokens is None and run_mode == 0
          and activation == "None" and conv_mode == "default" and residual_connection in (0, 1), op,
          "bias / activation / initial_state_mode / run_mode / num_accepted_tokens / pangu mode are not emulated")
    _need(all(t is None for t in (num_computed_tokens, block_idx_first_scheduled_token,
                                  block_idx_last_scheduled_token, initial_state_idx)), op, "APC is not emulated")
    if x.dim() == 2:
        _need(query_start_loc is not None and query_start_loc.dim() == 1, op, "a 2-D x needs query_start_loc")
        bounds = query_start_loc.tolist()
        _need(bounds[0] == 0 and bounds[-1] == x.shape[0] and all(a <= b for a, b in zip(bounds, bounds[1:])), op,
              "query_start_loc must rise from 0 to cu_seq_len")
        rows = x
    else:
        L = x.shape[1]
        bounds = [b * L for b in range(x.shape[0] + 1)]
        rows = x.reshape(-1, D)
    B = len(bounds) - 1
    slots = list(range(B)) if cache_indices is None else cache_indices.tolist()
    _need(len(slots) == B, op, "cache_indices must have one entry per sequence")
    w = weight.float()
    y = torch.zeros(rows.shape, dtype=torch.float32)
    for b in range(B):
        if slots[b] == pad_slot_id:
            continue
        _need(0 <= slots[b] < conv_states.shape[0], op, "cache_indices outside the conv_states rows")
        seq = rows[bounds[b]:bounds[b + 1]]
        xs = torch.cat([conv_states[slots[b]], seq]).float()
        n = seq.shape[0]
        for j in range(CONV_WIDTH):
            y[bounds[b]:bounds[b + 1]] += w[j] * xs[j:j + n]
        if residual_connection:
            y[bounds[b]:bounds[b + 1]] += seq.float()
        conv_states[slots[b]] = torch.cat([conv_states[slots[b]], seq])[n:]
    return y.to(x.dtype).reshape(x.shape)


IMPLS = {f.__name__: f for f in (npu_chunk_gated_delta_rule, npu_recurrent_gated_delta_rule, npu_fused_causal_conv1d,
                                 npu_moe_gating_top_k, npu_moe_gating_top_k_softmax, npu_moe_init_routing_v2,
                                 npu_grouped_matmul, npu_swiglu, npu_lightning_indexer, npu_sparse_flash_attention,
                                 npu_moe_finalize_routing)}

from hal_ascend.emulator_mc2 import IMPLS as _MC2_IMPLS  # noqa: E402 - it uses the helpers above

IMPLS.update(_MC2_IMPLS)
