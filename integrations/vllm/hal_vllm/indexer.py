"""vLLM's DSA indexer (``SparseAttnIndexer``) with its scoring and top-k run by HAL ``lightning_indexer``.

vLLM's CPU indexer path (``forward_cpu``; ``forward_native`` calls it on the CPU) reads the
indexer's paged FP8 key cache and, per query token, scores every key of that token's causal
context, ``score[s] = sum_h weights[h] * relu(q[h] . k[s]) * k_scale[s]``, then keeps the top-k
positions (``fp8_paged_mqa_logits_cpu`` + ``topk_transform_512_cpu``). ``HalSparseAttnIndexer``
keeps vLLM's metadata handling and computes that selection with HAL ``lightning_indexer`` (fp8 q
and k with per-key fp32 scales, per-token key lengths), writing the same buffer: the selected
positions, descending by score, -1 where fewer keys are visible. Unlike vLLM's CPU kernel it takes
any ``index_topk``, not only 512. The CUDA / ROCm / XPU paths are vLLM's (see docs/vllm.md).

The paged cache layout (vLLM's, as its ``fp8_paged_mqa_logits_torch`` reads it): cache
[num_blocks, block_size, ..., D + 4] bytes; flattened per block, the first ``block_size * D`` bytes
are the keys' e4m3 values (token-major), the next ``block_size * 4`` bytes their fp32 scales.
"""
from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.sparse_attn_indexer import SparseAttnIndexer
from vllm.platforms import current_platform
from vllm.v1.attention.backends.mla.indexer import DeepseekV32IndexerMetadata

from hal_vllm import runtime


def gather_paged_keys(kv_cache: torch.Tensor, page_table: torch.Tensor, head_dim: int, length: int):
    """Keys and scales of each row's context from vLLM's paged indexer cache.

    kv_cache: [num_blocks, block_size, ..., head_dim + 4] (uint8 or e4m3 bytes); page_table
    [R, P] int (row r's logical block j lives in physical block page_table[r, j]); length: how
    many positions to gather (<= P * block_size). Returns (k [R, length, head_dim] e4m3,
    k_scale [R, length] fp32); positions past a row's own length hold whatever its pages hold.
    """
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[1]
    flat = kv_cache.view(torch.uint8).reshape(num_blocks, -1)
    if flat.shape[1] != block_size * (head_dim + 4):
        raise ValueError(f"hal-vllm indexer: kv_cache: expected {head_dim + 4} bytes per key "
                         f"(head_dim {head_dim} e4m3 values + an fp32 scale), got {flat.shape[1] // block_size}")
    rows = page_table.shape[0]
    pages = -(-length // block_size)
    blocks = flat[page_table[:, :pages].long().clamp_min(0)]              # [R, pages, bs * (D + 4)]
    values = blocks[..., :block_size * head_dim].contiguous().view(torch.float8_e4m3fn)
    scales = blocks[..., block_size * head_dim:].contiguous().view(torch.float32)
    k = values.reshape(rows, pages * block_size, head_dim)[:, :length]
    k_scale = scales.reshape(rows, pages * block_size)[:, :length]
    return k, k_scale


def paged_topk(q_fp8: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, seq_lens: torch.Tensor,
               page_table: torch.Tensor, top_k: int) -> torch.Tensor:
    """The indexer's selection for R query tokens, by HAL ``lightning_indexer``.

    q_fp8 [R, Hi, D] e4m3 (its per-token scale already folded into ``weights``), weights [R, Hi]
    fp32, seq_lens [R] int (token r sees context positions [0, seq_lens[r])), page_table [R, P].
    Returns int32 [R, top_k]: positions in the token's context, highest score first, -1 tail.
    """
    rows, heads, head_dim = q_fp8.shape
    if rows == 0:
        return torch.empty(0, top_k, dtype=torch.int32, device=q_fp8.device)
    length = max(int(seq_lens.max().item()), 1)
    k, k_scale = gather_paged_keys(kv_cache, page_table, head_dim, length)
    ones = torch.ones(rows, 1, heads, dtype=torch.float32, device=q_fp8.device)
    out = runtime.get().lightning_indexer(q_fp8.unsqueeze(1), k, weights.float().unsqueeze(1), top_k=top_k,
                                          causal=False, k_lengths=seq_lens.to(torch.int32), q_scale=ones,
                                          k_scale=k_scale)
    runtime.after_call()
    return out[:, 0]


class HalSparseAttnIndexer(SparseAttnIndexer):
    """``SparseAttnIndexer`` whose CPU path selects keys with HAL (see the module doc)."""

    def forward_native(self, hidden_states, q_quant, k, weights):
        if current_platform.is_cpu():
            return self.forward_cpu(hidden_states, q_quant, k, weights)
        return super().forward_native(hidden_states, q_quant, k, weights)

    def forward_cpu(self, hidden_states, q_quant, k, weights):
        if self.use_fp4_cache or not isinstance(q_quant, torch.Tensor):
            raise NotImplementedError("hal-vllm indexer: the FP4 indexer cache is not supported (HAL's "
                                      "lightning_indexer takes e4m3 keys)")
        if self.dcp_world_size > 1 or self.use_pcp:
            raise NotImplementedError("hal-vllm indexer: context parallelism is not supported")
        if not self.skip_k_cache_insert:
            raise NotImplementedError("hal-vllm indexer: skip_k_cache_insert=False (prefill context "
                                      "parallelism) is not supported, as in vLLM's CPU path")
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata[self.k_cache.prefix]
        if not isinstance(metadata, DeepseekV32IndexerMetadata):
            return self.topk_indices_buffer        # profiling / dummy run, as vLLM's path
        return self.select(hidden_states.shape[0], q_quant, weights, metadata)

    def select(self, num_tokens: int, q_quant: torch.Tensor, weights: torch.Tensor,
               metadata: DeepseekV32IndexerMetadata) -> torch.Tensor:
        """Fill ``topk_indices_buffer`` for one step from ``metadata`` (what forward_cpu does once it
        has the metadata): decode tokens first, then the prefill chunks, as vLLM lays them out."""
        kv_cache = self.k_cache.kv_cache
        buffer = self.topk_indices_buffer
        top_k = self.topk_tokens
        buffer[:num_tokens] = -1
        if metadata.num_prefills > 0:
            for chunk in metadata.prefill.chunks:
                lo, hi = chunk.token_start, chunk.token_end
                lens = (chunk.cu_seqlen_ke - chunk.cu_seqlen_ks).to(torch.int32)
                cu = chunk.local_cu_seq_lens if chunk.local_cu_seq_lens is not None else chunk.cu_seq_lens
                req = torch.searchsorted(cu, chunk.cu_seqlen_ks, right=True) - 1
                buffer[lo:hi, :top_k] = paged_topk(q_quant[lo:hi], kv_cache, weights[lo:hi], lens,
                                                   chunk.block_table[req], top_k)
        if metadata.num_decodes > 0:
            decode = metadata.decode
            if decode.requires_padding:
                raise NotImplementedError("hal-vllm indexer: speculative decoding (padded decode) is not supported")
            n = metadata.num_decode_tokens
            lens = decode.seq_lens[:, -1] if decode.seq_lens.ndim == 2 else decode.seq_lens
            buffer[:n, :top_k] = paged_topk(q_quant[:n], kv_cache, weights[:n], lens.to(torch.int32),
                                            decode.block_table[:n], top_k)
        return buffer


def register() -> str:
    """Register :class:`HalSparseAttnIndexer` in place of ``SparseAttnIndexer``."""
    SparseAttnIndexer.register_oot(HalSparseAttnIndexer)
    return "SparseAttnIndexer (CPU path) -> HAL lightning_indexer"
