"""Cases for DeepSeek Sparse Attention (lightning_indexer, sparse_attention)."""
from __future__ import annotations

import torch

from hal.conformance.cases._case import Case, randn

# indexer: (name, B, S, L, Hi, D, top_k)
INDEXER_QUICK = [("S0", 1, 0, 16, 4, 32, 8), ("L1", 1, 1, 1, 4, 32, 4), ("prefill", 2, 24, 24, 4, 32, 8),
                 ("decode", 2, 1, 40, 4, 64, 16), ("fewer_visible_than_top_k", 1, 6, 10, 2, 16, 12)]
INDEXER_FULL = [("glm5_prefill", 1, 512, 4096, 32, 128, 2048), ("deepseek_v32_prefill", 1, 256, 4096, 64, 128, 2048),
                ("decode_64k", 2, 1, 65536, 64, 128, 2048)]
# attention: (name, B, S, L, Hq, Hk, Dqk, Dv, top_k)
ATTN_QUICK = [("S0", 1, 0, 8, 2, 2, 32, 32, 4), ("L1", 1, 1, 1, 2, 1, 32, 32, 4), ("MHA", 2, 6, 20, 4, 4, 32, 32, 8),
              ("GQA", 1, 5, 24, 8, 2, 64, 64, 12), ("MQA", 1, 4, 16, 4, 1, 32, 16, 6),
              ("MLA_576_512", 1, 2, 24, 4, 1, 576, 512, 8)]
# the float64 reference gathers K keys per query and head group: B * S * K * Hk * D values, so the
# full level keeps S small where Hk is large (MHA) -- about 1 GB of fp64 per case
ATTN_FULL = [("MLA_decode", 8, 1, 8192, 64, 1, 576, 512, 2048), ("MHA_prefill", 1, 32, 4096, 16, 16, 128, 128, 2048),
             ("GQA_prefill", 1, 64, 4096, 32, 8, 128, 128, 2048)]


def _indexer_case(name, B, S, L, Hi, D, top_k, *, dtype=torch.bfloat16, lengths=False, causal=True, nan_key=None,
                  q_offset=None, k_lengths=None):
    """An indexer case; ``q_offset`` / ``k_lengths`` (lists, one per batch) are passed as the
    models pass them (int64 tensors; int32 when ``q_offset`` is a tuple), ``lengths=True`` draws
    random k_lengths instead."""
    def build(g):
        from hal.backends.cpu import KERNELS
        q, k = randn(g, B, S, Hi, D), randn(g, B, L, D)
        if nan_key is not None:
            k[0, nan_key, 0] = float("nan")      # that key's scores are NaN: ranked last, still selectable
        w = torch.rand(B, S, Hi, generator=g) * (Hi ** -0.5 * D ** -0.5)
        kw = dict(top_k=top_k, causal=causal, q_offset=None, k_lengths=None, q_scale=None, k_scale=None)
        if lengths:
            kw["k_lengths"] = torch.randint(max(S, 1), L + 1, (B,), generator=g)
        if k_lengths is not None:
            kw["k_lengths"] = torch.tensor(k_lengths, dtype=torch.int64)
        if q_offset is not None:
            kw["q_offset"] = torch.tensor(q_offset, dtype=torch.int32 if isinstance(q_offset, tuple) else torch.int64)
        if dtype == torch.float8_e4m3fn:
            q8, qs = KERNELS["fp8_quantize"](q, group_size=D)
            k8, ks = KERNELS["fp8_quantize"](k, group_size=D)
            kw.update(q_scale=qs[..., 0].contiguous(), k_scale=ks[..., 0].contiguous())
            return (q8, k8, w), kw
        return (q.to(dtype), k.to(dtype), w), kw
    tags = ("fp8",) if dtype == torch.float8_e4m3fn else ()
    tags += ("nan",) if nan_key is not None else ()
    tags += ("q_offset",) if q_offset is not None else ()
    tags += ("k_lengths",) if (k_lengths is not None or lengths) else ()
    return Case("lightning_indexer", name, build, tags)


# How the models call the indexer (models/layers.py, Step): a batch of sequences with
# ``start[b]`` tokens already cached and ``n_new[b]`` new ones, right-padded to S queries;
# q_offset = start, k_lengths = start + n_new, keys in a cache of capacity L >= max(k_lengths).
MODEL_BATCHES = [("model_prefill_ragged", (0, 5, 12), (6, 3, 1), 6, 16),     # name, start, n_new, S, L
                 ("model_decode_ragged", (7, 19), (1, 1), 1, 24)]


def _model_batch(start, n_new):
    return list(start), [s + n for s, n in zip(start, n_new)]


def _indexer_cases(level):
    shapes = INDEXER_QUICK if level == "quick" else INDEXER_FULL
    out = [_indexer_case(*s) for s in shapes]
    if level == "quick":
        out += [_indexer_case("fp32_k_lengths", 2, 5, 20, 2, 32, 6, dtype=torch.float32, lengths=True),
                _indexer_case("fp16_noncausal", 1, 4, 12, 2, 32, 5, dtype=torch.float16, causal=False),
                _indexer_case("fp8", 1, 8, 32, 4, 64, 8, dtype=torch.float8_e4m3fn),
                _indexer_case("nan_key", 1, 4, 10, 2, 32, 12, dtype=torch.float32, nan_key=3),
                # chunked prefill: the queries start at q_offset, every key of the cache is valid
                _indexer_case("q_offset_int32", 2, 4, 12, 2, 32, 6, dtype=torch.float32, q_offset=(8, 3))]
        for name, start, n_new, S, L in MODEL_BATCHES:
            q_off, lens = _model_batch(start, n_new)
            out.append(_indexer_case(name, len(start), S, L, 4, 32, 8, q_offset=q_off, k_lengths=lens))
        q_off, lens = _model_batch(*MODEL_BATCHES[0][1:3])
        out.append(_indexer_case("fp8_model_prefill_ragged", 3, 6, 16, 4, 64, 8, dtype=torch.float8_e4m3fn,
                                 q_offset=q_off, k_lengths=lens))
    else:
        out += [_indexer_case("fp8_prefill", 1, 256, 4096, 64, 128, 2048, dtype=torch.float8_e4m3fn)]
    return out


def _attn_case(name, B, S, L, Hq, Hk, Dqk, Dv, top_k, *, dtype=torch.bfloat16, nan=False, return_lse=True,
               start=None, n_new=None):
    """A sparse-attention case whose indices come from the reference indexer, as a model's do;
    with ``start`` / ``n_new`` (one per batch) the indexer sees the models' q_offset and
    per-sequence key lengths, so each batch has its own -1 tails."""
    def build(g):
        from hal.backends.cpu import KERNELS
        q = randn(g, B, S, Hq, Dqk, dtype=dtype)
        k = randn(g, B, L, Hk, Dqk, dtype=dtype)
        v = k[..., :Dv] if name.startswith("MLA") else randn(g, B, L, Hk, Dv, dtype=dtype)
        # indices as a model produces them: the indexer's causal top-k (with -1 tails)
        iq, ik = randn(g, B, S, 2, 16), randn(g, B, L, 16)
        kw = {}
        if start is not None:
            q_off, lens = _model_batch(start, n_new)
            kw = dict(q_offset=torch.tensor(q_off), k_lengths=torch.tensor(lens))
        idx = KERNELS["lightning_indexer"](iq, ik, torch.rand(B, S, 2, generator=g), top_k=top_k, causal=True, **kw)
        if nan and S > 0:
            q[0, 0, 0, 0] = float("nan")
        return (q, k, v, idx), dict(scale=Dqk ** -0.5, return_lse=return_lse)
    tags = ("nan",) if nan else ()
    tags += ("q_offset", "k_lengths") if start is not None else ()
    tags += () if return_lse else ("no_lse",)
    return Case("sparse_attention", name, build, tags)


def _attn_cases(level):
    shapes = ATTN_QUICK if level == "quick" else ATTN_FULL
    out = [_attn_case(*s) for s in shapes]
    if level == "quick":
        out += [_attn_case("fp32_GQA", 1, 3, 10, 4, 2, 16, 16, 4, dtype=torch.float32),
                _attn_case("fp16_MQA", 1, 3, 10, 4, 1, 16, 16, 4, dtype=torch.float16),
                _attn_case("nan_query", 1, 3, 10, 2, 2, 16, 16, 4, dtype=torch.float32, nan=True),
                _attn_case("GQA_out_only", 2, 3, 12, 4, 2, 32, 32, 6, return_lse=False),
                _attn_case("L0_every_slot_unused", 1, 2, 0, 2, 1, 16, 16, 3, dtype=torch.float32)]
        for name, start, n_new, S, L in MODEL_BATCHES:
            out.append(_attn_case(name, len(start), S, L, 4, 2, 32, 32, 8, start=start, n_new=n_new))
        out.append(_attn_case("MLA_model_decode_ragged", 2, 1, 24, 4, 1, 576, 512, 8, start=(7, 19), n_new=(1, 1)))
    return out


def cases(level: str) -> list[Case]:
    return _indexer_cases(level) + _attn_cases(level)
