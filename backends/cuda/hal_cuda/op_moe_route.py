"""``moe_route``: one fused Triton kernel per token (sigmoid/softmax, correction bias, group
selection, top-k, renormalize, scaling).

Selection works on the contract's rules: NaN scores rank below every number, ties go to the lower
index, and an already-picked entry is excluded by a mask (not by -inf, which would tie with real
-inf scores). A group scores its best expert without a bias and its best two summed with one.
Group scores, kept groups and the top-k are found by k rounds of
max-then-lowest-index, which for the small k of MoE routing (<= 8-16) is cheaper than a sort.
"""
import torch
import triton.language as tl

from hal_cuda._triton import jit, next_pow2


@jit
def _pick(key, avail, idx, BIG: tl.constexpr):
    """Index of the largest available key (ties -> lowest index)."""
    m = tl.max(tl.where(avail, key, float("-inf")), axis=0)
    return tl.min(tl.where(avail & (key == m), idx, BIG), axis=0)


@jit
def _route_kernel(x_ptr, bias_ptr, w_ptr, ids_ptr, E, scaling,
                  TOP_K: tl.constexpr, KP: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr,
                  TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    valid = e < E
    x = tl.load(x_ptr + t * E + e, mask=valid, other=0.0).to(tl.float32)
    if SOFTMAX:
        xm = tl.where(valid, x, float("-inf"))
        p = tl.exp(xm - tl.max(xm, axis=0))
        s = p / tl.sum(p, axis=0)
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
    c = s
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    c = tl.where(c != c, float("-inf"), c)
    avail = valid
    if N_GROUP > 1:
        per = E // N_GROUP
        grp = e // per
        gscore_keep = tl.zeros((BLOCK_E,), dtype=tl.int1)
        # group score: the best c without a bias, the sum of the best two with one (DeepSeek's Gate)
        gsum = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for g in tl.static_range(N_GROUP):
            ing = valid & (grp == g)
            first = _pick(c, ing, e, BLOCK_E)
            total = tl.max(tl.where(e == first, c, float("-inf")), axis=0)
            if HAS_BIAS:    # plus the second best (none when a group holds one expert)
                second = tl.max(tl.where(ing & (e != first), c, float("-inf")), axis=0)
                total = tl.where(per > 1, total + second, total)
            gsum = tl.where(e == g, total, gsum)
        gavail = e < N_GROUP
        for _ in tl.static_range(TOPK_GROUP):
            gbest = _pick(gsum, gavail, e, BLOCK_E)
            gavail = gavail & (e != gbest)
            gscore_keep = gscore_keep | (grp == gbest)
        avail = avail & gscore_keep
    # masked groups keep their place in the ranking as -inf (the reference masks them with -inf)
    key = tl.where(avail, c, float("-inf"))
    left = valid
    wsum = 0.0
    ks = tl.arange(0, KP)
    chosen = tl.zeros((KP,), dtype=tl.int32)
    weights = tl.zeros((KP,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = _pick(key, left, e, BLOCK_E)
        left = left & (e != best)
        wj = tl.sum(tl.where(e == best, s, 0.0), axis=0)
        chosen = tl.where(ks == j, best, chosen)
        weights = tl.where(ks == j, wj, weights)
        wsum += wj
    if RENORM:
        weights = weights / (wsum + 1e-20)
    weights = weights * scaling
    tl.store(w_ptr + t * TOP_K + ks, weights, mask=ks < TOP_K)
    tl.store(ids_ptr + t * TOP_K + ks, chosen, mask=ks < TOP_K)


def moe_route(router_logits, *, top_k, scoring, correction_bias, n_group, topk_group, renormalize, scaling_factor):
    T, E = router_logits.shape
    w = torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=router_logits.device)
    if T:
        _route_kernel[(T,)](router_logits.contiguous(), correction_bias if correction_bias is not None else router_logits,
                            w, ids, E, float(scaling_factor), TOP_K=top_k, KP=next_pow2(top_k),
                            SOFTMAX=scoring == "softmax", HAS_BIAS=correction_bias is not None, N_GROUP=n_group,
                            TOPK_GROUP=topk_group, RENORM=renormalize, BLOCK_E=next_pow2(max(E, n_group)))
    return w, ids
