"""HAL's CPU reference against the field's own reference code (issue 17).

Each ``peer_*`` function is this project's plain-torch transcription of a function in another
repository, cited above it with the commit that was read. The tests compare HAL's reference with
them: bitwise where the peer is exact (fp8 codes, scales, routing ids and weights), by the peer's
own closeness check (DeepGEMM's ``calc_diff``, FlashMLA's ``check_is_allclose``) where it sums in
another order. Where HAL and a peer differ by a convention, the test converts one side and then
compares, so the convention is asserted, not skipped (docs/compatibility.md lists them).
"""
from __future__ import annotations

import math

import pytest
import torch

from hal import ops
from hal.backends.cpu._fp8 import ceil_to_ue8m0, dequantize_weight

FP8 = torch.float8_e4m3fn
INF, NAN = float("inf"), float("nan")


def codes(q: torch.Tensor) -> torch.Tensor:
    """The uint8 bit patterns of an e4m3 tensor (what "bitwise equal" compares)."""
    return q.contiguous().view(torch.uint8)


def fbits(s: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of an fp32 tensor."""
    return s.float().contiguous().view(torch.int32)


def assert_at_most_one_code_apart(a: torch.Tensor, b: torch.Tensor, max_fraction: float) -> None:
    """e4m3 tensors equal except in at most ``max_fraction`` of the values, each one grid step apart
    with the same sign (consecutive magnitudes are consecutive codes in e4m3)."""
    ca, cb = codes(a).int(), codes(b).int()
    differ = ca != cb
    assert differ.float().mean().item() <= max_fraction
    assert bool(((ca[differ] >> 7) == (cb[differ] >> 7)).all())
    assert bool(((ca[differ] & 0x7F) - (cb[differ] & 0x7F)).abs().eq(1).all())


# ==== DeepGEMM: github.com/deepseek-ai/DeepGEMM @ 54e22612409371d6364144b69086735beb54e98b =========

# deep_gemm/utils/math.py: ceil_to_ue8m0
def peer_ceil_to_ue8m0(sf: torch.Tensor) -> torch.Tensor:
    """fp32 [...] -> 2^(e - 127) where e = the biased exponent of |sf| plus one when its mantissa is
    not zero, clamped to [1, 254]."""
    raw = sf.abs().float().view(torch.int32)
    exponent = ((raw >> 23) & 0xFF) + (raw & 0x7FFFFF).bool().int()
    return (exponent.clamp(1, 254) << 23).view(torch.float32)


# deep_gemm/utils/math.py: per_token_cast_to_fp8 (use_packed_ue8m0=False)
def peer_per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128, reciprocal: bool = True):
    """x [m, n] -> (codes [m, n] e4m3, sf [m, ceil(n / gran_k)] fp32): zero-padded groups of gran_k,
    sf = amax.clamp(1e-4) / 448 (ceil_to_ue8m0 when asked), codes = x * (1 / sf).
    ``reciprocal=False`` applies HAL's (and DeepSeek-V3.2's) ``x / sf`` instead: the conversion."""
    m, n = x.shape
    groups = -(-n // gran_k)
    padded = torch.zeros(m, groups * gran_k, dtype=x.dtype)
    padded[:, :n] = x
    tiles = padded.view(m, groups, gran_k)
    sf = tiles.abs().float().amax(dim=2).clamp(1e-4) / 448.0
    if use_ue8m0:
        sf = peer_ceil_to_ue8m0(sf)
    scaled = tiles * (1.0 / sf[:, :, None]) if reciprocal else tiles / sf[:, :, None]
    return scaled.to(FP8).view(m, groups * gran_k)[:, :n].contiguous(), sf


# deep_gemm/utils/math.py: per_block_cast_to_fp8
def peer_per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128, reciprocal: bool = True):
    """x [m, n] -> (codes [m, n] e4m3, sf [ceil(m/gran_k), ceil(n/gran_k)] fp32), one scale per
    zero-padded gran_k x gran_k tile; ``reciprocal`` as in :func:`peer_per_token_cast_to_fp8`."""
    m, n = x.shape
    bm, bn = -(-m // gran_k), -(-n // gran_k)
    padded = torch.zeros(bm * gran_k, bn * gran_k, dtype=x.dtype)
    padded[:m, :n] = x
    tiles = padded.view(bm, gran_k, bn, gran_k)
    sf = tiles.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4) / 448.0
    if use_ue8m0:
        sf = peer_ceil_to_ue8m0(sf)
    scaled = tiles * (1.0 / sf) if reciprocal else tiles / sf
    return scaled.to(FP8).view(bm * gran_k, bn * gran_k)[:m, :n].contiguous(), sf.view(bm, bn)


# deep_gemm/testing/numeric.py: calc_diff
def peer_calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 <x, y> / (|x|^2 + |y|^2) in float64 (0 when both are all zero)."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def _just_above_powers_of_two(exponents: range) -> torch.Tensor:
    """fp32 [len] amax values nextafter(448 * 2^e): their scale amax/448 lies just above 2^e."""
    exact = (448.0 * torch.exp2(torch.tensor(list(exponents), dtype=torch.float64))).float()
    return torch.nextafter(exact, torch.tensor(INF))


def test_ue8m0_bitwise_equal_to_deepgemm_for_every_exponent():
    e = torch.arange(-126, 128, dtype=torch.float64)
    p = torch.exp2(e)
    # 2^e, just above it, 1.5 * 2^e and just below 2^(e+1): all exact in fp32 for e in [-126, 127]
    s = torch.stack([p, p * (1 + 2.0 ** -23), p * 1.5, p * (2 - 2.0 ** -23)]).float()
    got = ceil_to_ue8m0(s)
    assert torch.equal(fbits(got), fbits(peer_ceil_to_ue8m0(s)))
    # independent expectation: 2^e stays, anything above it becomes 2^(e+1), saturating at 2^127
    up = torch.exp2(torch.clamp(e + 1, max=127)).float()
    want = torch.stack([p.float(), up, up, up])
    assert torch.equal(fbits(got), fbits(want))
    # subnormal scales round up to the smallest normal power of two, as DeepGEMM clamps them
    tiny = torch.tensor([2.0 ** -149, 1.5 * 2.0 ** -130, 2.0 ** -127], dtype=torch.float32)
    assert torch.equal(fbits(ceil_to_ue8m0(tiny)), fbits(peer_ceil_to_ue8m0(tiny)))
    assert ceil_to_ue8m0(tiny).tolist() == [2.0 ** -126] * 3
    # the defect these inputs catch: exp2(ceil(log2 s)) in fp32 rounds s just above 2^e down to 2^e
    old = torch.exp2(torch.ceil(torch.log2(s[1])))
    assert int((old != want[1]).sum()) > 200


def test_ue8m0_non_finite_convention():
    # HAL: a non-finite scale stays non-finite (so the group's NaN/Inf shows); DeepGEMM clamps to 2^127
    s = torch.tensor([INF, NAN], dtype=torch.float32)
    got, peer = ceil_to_ue8m0(s), peer_ceil_to_ue8m0(s)
    assert math.isinf(got[0].item()) and math.isnan(got[1].item())
    converted = torch.where(torch.isfinite(got), got, torch.tensor(2.0 ** 127))
    assert torch.equal(fbits(converted), fbits(peer))


def test_fp8_quantize_ue8m0_just_above_powers_of_two_equals_deepgemm():
    # every exponent a scale can take through the op: amax in [1e-4, fp32 max] -> s in [2^-22, 2^119]
    exps = range(-22, 120)
    amax = _just_above_powers_of_two(exps)
    g = torch.Generator().manual_seed(17)
    rows = len(exps)
    x = torch.zeros(rows, 300)                      # groups: [0, 128) amax, [128, 256) zero, [256, 300) tiny
    x[:, :128] = (torch.rand(rows, 128, generator=g) * 2 - 1) * amax[:, None]
    x[torch.arange(rows), torch.randint(0, 128, (rows,), generator=g)] = amax * torch.where(
        torch.rand(rows, generator=g) < 0.5, -1.0, 1.0)
    x[:, 256:] = torch.randn(rows, 44, generator=g) * 1e-30
    q, s = ops.fp8_quantize(x, scale_format="ue8m0")
    pq, ps = peer_per_token_cast_to_fp8(x, use_ue8m0=True)
    assert torch.equal(fbits(s), fbits(ps)) and torch.equal(codes(q), codes(pq))
    e = torch.tensor(list(exps), dtype=torch.float64)
    assert torch.equal(s[:, 0].double(), torch.exp2(e + 1))          # rounded up, never down
    floor = 2.0 ** -22                                                 # ue8m0 of 1e-4 / 448
    assert s[:, 1:].eq(floor).all() and q[:, 128:].float().eq(0).all()
    assert q[:, :128].float().abs().amax(1).le(448).all() and q[:, :128].float().abs().amax(1).ge(224).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_quantize_random_equals_deepgemm_per_token(dtype, ue8m0):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 1000, generator=g) * torch.exp2(torch.randint(-12, 12, (64, 1), generator=g))).to(dtype)
    x[5, 128:256] = 0                                  # a zero group
    x[9, 256:384] = 1e-7                               # a tiny group (below the 1e-4 amax floor)
    q, s = ops.fp8_quantize(x, scale_format="ue8m0" if ue8m0 else "fp32")
    pq, ps = peer_per_token_cast_to_fp8(x, use_ue8m0=ue8m0)
    assert torch.equal(fbits(s), fbits(ps))                            # scales: bitwise
    # codes: DeepGEMM multiplies by 1/s, HAL divides; with HAL's division the transcription is bitwise
    dq, _ = peer_per_token_cast_to_fp8(x, use_ue8m0=ue8m0, reciprocal=False)
    assert torch.equal(codes(q), codes(dq))
    if ue8m0:                                          # 1/s is exact for a power of two: no difference
        assert torch.equal(codes(q), codes(pq))
    else:                                              # otherwise: rare, one code apart
        assert_at_most_one_code_apart(q, pq, 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_quantize_weight_equals_deepgemm_per_block(dtype):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(200, 300, generator=g) * 0.02).to(dtype)          # partial tiles on both axes
    w[:128, 128:256] = 0                                               # a zero tile
    w[128:, :128] = 1e-6                                               # a tiny tile (partial in N)
    q, s = ops.fp8_quantize_weight(w)
    pq, ps = peer_per_block_cast_to_fp8(w, use_ue8m0=False)
    assert s.shape == ps.shape == (2, 3) and torch.equal(fbits(s), fbits(ps))
    dq, _ = peer_per_block_cast_to_fp8(w, use_ue8m0=False, reciprocal=False)
    assert torch.equal(codes(q), codes(dq))
    assert_at_most_one_code_apart(q, pq, 1e-3)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_gemm_within_deepgemm_calc_diff(ue8m0):
    # DeepGEMM's test reference is the unquantized product in fp32; its fp8 x fp8 bound is 1e-3
    g = torch.Generator().manual_seed(11)
    a = torch.randn(48, 300, generator=g).bfloat16()
    b = torch.randn(200, 300, generator=g).bfloat16()
    ref = a.float() @ b.float().T
    out = ops.fp8_gemm(*ops.fp8_quantize(a, scale_format="ue8m0" if ue8m0 else "fp32"),
                       *ops.fp8_quantize_weight(b), out_dtype=torch.float32)
    diff = peer_calc_diff(out, ref)
    assert 0 < diff < 1e-3
    assert peer_calc_diff(out, -ref) > 1.9                              # the metric can fail


def test_calc_diff_transcription_by_hand():
    # x = [1, 0], y = [0, 1]: 1 - 0 = 1; x = y: 0; x = -y: 2; both zero: 0
    assert peer_calc_diff(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert peer_calc_diff(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert peer_calc_diff(torch.tensor([3.0, 4.0]), torch.tensor([-3.0, -4.0])) == 2.0
    assert peer_calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0


# ==== DeepSeek-V3.2-Exp: github.com/deepseek-ai/DeepSeek-V3.2-Exp @ 3b99a5350d260b7c2a357e82362305509e2d0724

V32_FP8_MAX_INV = torch.tensor(1 / 448, dtype=torch.float32)         # the kernel's fp8_max_inv, in fp32


# inference/kernel.py: act_quant (act_quant_kernel with fast_round_scale when scale_fmt is set)
def peer_act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None):
    """x [..., N] (N a multiple of block_size) -> (codes e4m3, s [..., N / block_size] fp32):
    amax clamped to 1e-4; s = amax * fp32(1/448), or with a scale_fmt the power of two
    2^(ceil-log2 read from the bits of amax * fp32(1/448)); codes = clamp(x / s, -448, 448)."""
    assert x.shape[-1] % block_size == 0
    tiles = x.float().unflatten(-1, (-1, block_size))
    amax = tiles.abs().amax(-1).clamp_min(1e-4)
    s = amax * V32_FP8_MAX_INV
    if scale_fmt is not None:
        raw = s.view(torch.int32)
        log2_ceil = ((raw >> 23) & 0xFF) - 127 + ((raw & 0x7FFFFF) != 0).int()
        s = ((log2_ceil + 127) << 23).view(torch.float32)
    y = (tiles / s[..., None]).clamp(-448.0, 448.0).to(FP8)
    return y.flatten(-2), s


# inference/kernel.py: fp8_gemm (fp8_gemm_kernel: per 128-wide K block, dot in fp32, then scaled)
def peer_fp8_gemm(a, a_s, b, b_s):
    """a [M, K] e4m3, a_s [M, ceil(K/128)], b [N, K] e4m3, b_s [ceil(N/128), ceil(K/128)] -> fp32 [M, N]:
    sum over K blocks of (a_blk @ b_blk.T) * a_s[m, kb] * b_s[n // 128, kb], accumulated in fp32."""
    M, K = a.shape
    N = b.shape[0]
    out = torch.zeros(M, N)
    for kb in range(-(-K // 128)):
        blk = slice(kb * 128, (kb + 1) * 128)
        part = a[:, blk].float() @ b[:, blk].float().T
        scale = a_s[:, kb, None] * b_s[:, kb].repeat_interleave(128)[:N][None, :]
        out += part * scale
    return out


# inference/model.py: weight_dequant (block_size 128, default dtype as given)
def peer_weight_dequant(weight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """weight [N, K] e4m3 (N, K multiples of 128), scale [N/128, K/128] -> weight * scale per tile."""
    N, K = weight.shape
    tiles = weight.view(N // 128, 128, K // 128, 128).transpose(1, 2).reshape(-1, 128 * 128)
    deq = (tiles.float() * scale.reshape(-1, 1).float()).to(dtype)
    return deq.view(N // 128, K // 128, 128, 128).transpose(1, 2).reshape(N, K)


# inference/model.py: Gate.forward, from the router logits on (HAL's input is linear(x, weight))
def peer_gate(logits, *, topk, n_groups, topk_groups, score_func, route_scale, bias=None):
    """logits [T, E] fp32 -> (weights [T, topk] fp32, indices [T, topk] int64)."""
    scores = logits.float().softmax(dim=-1) if score_func == "softmax" else logits.float().sigmoid()
    original_scores = scores
    if bias is not None:
        scores = scores + bias
    if n_groups > 1:
        scores = scores.view(logits.size(0), n_groups, -1)
        group_scores = scores.amax(dim=-1) if bias is None else scores.topk(2, dim=-1)[0].sum(dim=-1)
        keep = group_scores.topk(topk_groups, dim=-1)[1]
        dropped = torch.ones(logits.size(0), n_groups, dtype=torch.bool).scatter_(1, keep, False)
        scores = scores.masked_fill(dropped.unsqueeze(-1), -INF).flatten(1)
    indices = scores.topk(topk, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    if score_func == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, indices


def hal_route_as_gate(logits, *, topk, n_groups, topk_groups, score_func, route_scale, bias=None):
    """HAL's moe_route with the Gate's arguments converted: DeepSeek renormalizes for sigmoid only."""
    return ops.moe_route(logits, top_k=topk, scoring=score_func, correction_bias=bias, n_group=n_groups,
                         topk_group=topk_groups, renormalize=score_func == "sigmoid", scaling_factor=route_scale)


def test_route_no_bias_group_max_repro():
    # softmax of [3, -9, 2.8, 2.8, -9, ...]: group 0 = {3, -9} has the best single expert, group 1 =
    # {2.8, 2.8} the best top-2 sum; without a bias DeepSeek scores a group by its max -> experts [0, 1]
    logits = torch.tensor([[3.0, -9.0, 2.8, 2.8, -9.0, -9.0, -9.0, -9.0]])
    args = dict(topk=2, n_groups=4, topk_groups=1, score_func="softmax", route_scale=1.0)
    w, ids = hal_route_as_gate(logits, **args)
    pw, pids = peer_gate(logits, **args)
    assert ids.tolist() == pids.tolist() == [[0, 1]]
    assert torch.equal(w, pw)
    # with a (zero) correction bias a group scores its top-2 sum: group 1 wins -> experts [2, 3]
    logits = torch.tensor([[3.0, -9.0, 2.8, 2.75, -9.0, -9.0, -9.0, -9.0]])        # no tie inside group 1
    w, ids = hal_route_as_gate(logits, bias=torch.zeros(8), **args)
    pw, pids = peer_gate(logits, bias=torch.zeros(8), **args)
    assert ids.tolist() == pids.tolist() == [[2, 3]] and torch.equal(w, pw)


ROUTING_CONFIGS = [
    # (name, E, topk, n_groups, topk_groups, score_func, route_scale, bias)
    ("deepseek-v2-like softmax 160/8/3", 160, 6, 8, 3, "softmax", 16.0, False),
    ("sigmoid 256/8/4 without bias", 256, 8, 8, 4, "sigmoid", 1.0, False),
    ("deepseek-v3 sigmoid+bias 256/8/4", 256, 8, 8, 4, "sigmoid", 2.5, True),
    ("softmax with bias 64/4/2", 64, 4, 4, 2, "softmax", 1.0, True),
    ("ungrouped sigmoid", 64, 6, 1, 1, "sigmoid", 1.0, False),
    ("ungrouped softmax with bias", 64, 6, 1, 1, "softmax", 1.0, True),
]


@pytest.mark.parametrize("name,E,topk,n_groups,topk_groups,score_func,route_scale,bias", ROUTING_CONFIGS,
                         ids=[c[0] for c in ROUTING_CONFIGS])
def test_route_equals_deepseek_gate_row_for_row(name, E, topk, n_groups, topk_groups, score_func, route_scale, bias):
    g = torch.Generator().manual_seed(E + topk)
    logits = torch.randn(256, E, generator=g) * 2
    b = torch.randn(E, generator=g) * 0.1 if bias else None
    args = dict(topk=topk, n_groups=n_groups, topk_groups=topk_groups, score_func=score_func,
                route_scale=route_scale, bias=b)
    w, ids = hal_route_as_gate(logits, **args)
    pw, pids = peer_gate(logits, **args)
    assert torch.equal(ids.long(), pids)                              # ids: bitwise, row for row
    assert torch.equal(w, pw)                                         # weights: bitwise


def test_route_no_bias_equals_transformers_deepseek_v2_group_limited_greedy():
    # the installed transformers' own router (not a transcription): softmax, group max, no renormalization
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    cfg = transformers.DeepseekV2Config(hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                                        n_routed_experts=160, num_experts_per_tok=6, n_group=8, topk_group=3,
                                        topk_method="group_limited_greedy", routed_scaling_factor=16.0)
    router = DeepseekV2TopkRouter(cfg)
    g = torch.Generator().manual_seed(59)
    with torch.no_grad():
        router.weight.copy_(torch.randn(160, 16, generator=g))
        logits, tw, tids = router(torch.randn(128, 16, generator=g))
    w, ids = ops.moe_route(logits, top_k=6, scoring="softmax", n_group=8, topk_group=3, renormalize=False,
                           scaling_factor=16.0)
    # convention: transformers' top-k is unsorted (sorted=False); compare each row sorted by expert id
    theirs, mine = tids.sort(-1), ids.long().sort(-1)
    assert torch.equal(theirs.values, mine.values)
    assert torch.equal(tw.gather(1, theirs.indices), w.gather(1, mine.indices))


def test_route_group_tie_rule():
    # equal group scores: HAL keeps the lower group index (stated in the contract); a tie only
    # arises on equal floats, which DeepSeek's torch.topk leaves unspecified
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.0]])                     # max rule: both groups score s(1)
    _, ids = ops.moe_route(logits, top_k=2, n_group=2, topk_group=1)
    assert ids.tolist() == [[1, 0]]


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_equals_hal_quantize(scale_fmt):
    g = torch.Generator().manual_seed(23)
    x = (torch.randn(32, 512, generator=g) * torch.exp2(torch.randint(-10, 10, (32, 1), generator=g))).bfloat16()
    x[3, :128] = 0
    q, s = ops.fp8_quantize(x, scale_format="ue8m0" if scale_fmt else "fp32")
    pq, ps = peer_act_quant(x, scale_fmt=scale_fmt)
    if scale_fmt:                                      # ue8m0: bitwise, scales and codes
        assert torch.equal(fbits(s), fbits(ps)) and torch.equal(codes(q), codes(pq))
    else:
        # convention: V3.2 computes s = amax * fp32(1/448), HAL and DeepGEMM amax / 448; at most one
        # ulp apart (in about half the groups); with V3.2's scale, HAL's x / s gives V3.2's codes
        ulps = (fbits(s) - fbits(ps)).abs()
        assert ulps.le(1).all() and ulps.eq(1).any()
        amax = x.float().view(32, 4, 128).abs().amax(-1).clamp_min(1e-4)
        assert torch.equal(fbits(ps), fbits(amax * V32_FP8_MAX_INV))
        assert torch.equal(codes(pq), codes((x.float().view(32, 4, 128) / ps[..., None]).clamp(-448, 448)
                                            .to(FP8).view(32, 512)))
        assert_at_most_one_code_apart(q, pq, 1e-2)


def test_act_quant_ue8m0_just_above_powers_of_two():
    amax = _just_above_powers_of_two(range(-22, 120))
    x = torch.zeros(len(amax), 128)
    x[:, 7] = amax
    x[:, 8] = -amax / 3
    _, s = ops.fp8_quantize(x, scale_format="ue8m0")
    _, ps = peer_act_quant(x, scale_fmt="ue8m0")
    assert torch.equal(fbits(s), fbits(ps))


def test_fp8_gemm_equals_v32_kernel_reference():
    g = torch.Generator().manual_seed(29)
    a = torch.randn(40, 300, generator=g).bfloat16()                  # K not a multiple of 128
    b = (torch.randn(200, 300, generator=g) * 0.05).bfloat16()
    aq, as_ = ops.fp8_quantize(a)
    bq, bs = ops.fp8_quantize_weight(b)
    out = ops.fp8_gemm(aq, as_, bq, bs, out_dtype=torch.float32)
    ref = peer_fp8_gemm(aq, as_, bq, bs)
    assert peer_calc_diff(out, ref) < 1e-12
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_weight_dequant_equals_hal_dequantization():
    g = torch.Generator().manual_seed(31)
    w = torch.randn(256, 384, generator=g) * 0.02
    q, s = ops.fp8_quantize_weight(w)
    deq = peer_weight_dequant(q, s)
    assert torch.equal(deq, dequantize_weight(q, s).float())          # q * scale per tile: bitwise
    assert (deq - w).abs().le(s.repeat_interleave(128, 0).repeat_interleave(128, 1) * 16).all()
    assert peer_calc_diff(deq, w) < 1e-3
    bf = peer_weight_dequant(q, s, torch.bfloat16)
    assert torch.equal(bf, dequantize_weight(q, s).bfloat16())


# inference/model.py: Indexer.forward from the quantized q/k on, with inference/kernel.py fp8_index
def peer_indexer_topk(q_fp8, q_scale, k_fp8, k_scale, weights, index_topk, start_pos=0):
    """q_fp8 [b, m, h, d], q_scale [b, m, h], k_fp8 [b, n, d], k_scale [b, n], weights [b, m, h] (the
    Gate-side weights already times n_heads^-0.5 * softmax_scale) -> int64 [b, m, min(index_topk, n)].
    score = sum_h relu(q_fp8 . k_fp8) * (weights * q_scale) * k_scale, plus the causal mask (-inf
    above the diagonal shifted by start_pos), then torch.topk."""
    logits = torch.einsum("bmhd,bnd->bmhn", q_fp8.float(), k_fp8.float())
    qs = (weights * q_scale)[..., None]
    score = (logits.clamp_min(0) * qs).sum(2) * k_scale[:, None, :]
    m, n = score.shape[1], score.shape[2]
    mask = torch.full((m, n), -INF).triu_(start_pos + 1)
    score = score + mask
    return score.topk(min(index_topk, n), dim=-1)[1], score


def test_indexer_topk_width_and_padding_convention():
    g = torch.Generator().manual_seed(37)
    B, S, H, D, top_k = 2, 12, 4, 128, 6
    q = torch.randn(B, S, H, D, generator=g).bfloat16()
    k = torch.randn(B, S, D, generator=g).bfloat16()
    w = torch.rand(B, S, H, generator=g) * H ** -0.5 * D ** -0.5
    q_fp8, q_scale = peer_act_quant(q, scale_fmt="ue8m0")              # [B, S, H, D], [B, S, H, 1]
    k_fp8, k_scale = peer_act_quant(k, scale_fmt="ue8m0")
    q_scale, k_scale = q_scale[..., 0], k_scale[..., 0]
    peer, score = peer_indexer_topk(q_fp8, q_scale, k_fp8, k_scale, w, top_k)
    got = ops.lightning_indexer(q_fp8, k_fp8, w, top_k=top_k, q_scale=q_scale, k_scale=k_scale)
    assert peer.shape == got.shape == (B, S, top_k)                    # here min(top_k, L) = top_k
    visible = torch.arange(S)[:, None] + 1                            # query t sees keys 0..t
    swaps = 0
    for b in range(B):
        for t in range(S):
            n = min(int(visible[t]), top_k)
            # the visible keys: equal, except that keys of exactly equal score (all heads' relu 0
            # gives score 0) may come in another order: torch.topk leaves ties unordered, HAL puts the
            # lower index first
            mine, theirs = got[b, t, :n].long(), peer[b, t, :n]
            assert torch.equal(score[b, t, mine], score[b, t, theirs])
            assert mine.tolist() == sorted(mine.tolist(), key=lambda i: (-score[b, t, i].item(), i))
            swaps += int((mine != theirs).sum())
            # convention: HAL pads with -1, DeepSeek fills its tail with masked (future) keys
            assert got[b, t, n:].eq(-1).all() and peer[b, t, n:].gt(t).all()
    # convention: with fewer keys than top_k, DeepSeek returns min(top_k, L) columns, HAL top_k
    assert swaps < B * S                                               # ties are the exception
    short, _ = peer_indexer_topk(q_fp8[:, :3], q_scale[:, :3], k_fp8[:, :3], k_scale[:, :3], w[:, :3], top_k)
    hal3 = ops.lightning_indexer(q_fp8[:, :3], k_fp8[:, :3], w[:, :3], top_k=top_k, q_scale=q_scale[:, :3],
                                 k_scale=k_scale[:, :3])
    assert short.shape[-1] == 3 and hal3.shape[-1] == top_k and hal3[..., 3:].eq(-1).all()


# ==== FlashMLA: github.com/deepseek-ai/FlashMLA @ 9241ae3ef9bac614dd25e45e507e089f888280e0 =========

# tests/ref.py: ref_sparse_attn_fwd (no attn_sink, no topk_length)
def peer_sparse_prefill(q, kv, indices, sm_scale, d_v):
    """q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk], indices [s_q, 1, topk] (anything outside [0, s_kv) is
    invalid) -> (out fp32 [s_q, h_q, d_v], lse [s_q, h_q], +inf for a query with no valid index).
    Invalid slots read row 0 and get a -inf score."""
    s_kv = kv.shape[0]
    idx = indices[:, 0].clone()
    invalid = (idx < 0) | (idx >= s_kv)
    idx[invalid] = 0
    gathered = kv[:, 0].index_select(0, idx.flatten()).view(*idx.shape, -1).float()   # [s_q, topk, d_qk]
    p = (q.float() @ gathered.transpose(1, 2)) * sm_scale                             # [s_q, h_q, topk]
    p[invalid[:, None, :].expand_as(p)] = -INF
    lse = p.logsumexp(-1)
    lse_for_o = torch.where(lse == -INF, INF, lse)
    out = torch.exp(p - lse_for_o[..., None]) @ gathered[..., :d_v]
    return out, torch.where(lse == -INF, INF, lse)


# tests/ref.py: ref_sparse_attn_decode (h_kv = 1, no attn_sink, no extra kv scope, no topk_length)
def peer_sparse_decode(q, blocked_k, indices_in_kvcache, sm_scale, d_v):
    """q [b, s_q, h_q, d_qk], blocked_k [blocks, block_size, 1, d_qk], indices_in_kvcache [b, s_q, topk]
    (rows of the flattened cache, -1 invalid) -> (out fp32 [b, s_q, h_q, d_v], lse [b, h_q, s_q]).
    NaN in gathered rows is zeroed; a query with no valid index gets out 0 and lse +inf."""
    b, s_q, h_q, d_qk = q.shape
    topk = indices_in_kvcache.shape[-1]
    rows = blocked_k.view(-1, d_qk).index_select(0, indices_in_kvcache.clamp_min(0).flatten())
    gathered = rows.view(b * s_q, topk, d_qk).float()
    gathered[gathered != gathered] = 0.0
    invalid = (indices_in_kvcache == -1).view(b * s_q, 1, topk).expand(b * s_q, h_q, topk)
    w = (q.float().view(b * s_q, h_q, d_qk) @ gathered.transpose(-1, -2)) * sm_scale
    w[invalid] = -INF
    lse = w.logsumexp(-1)
    out = (torch.exp(w - lse[..., None]) @ gathered[..., :d_v]).view(b, s_q, h_q, d_v)
    lse = lse.view(b, s_q, h_q)
    lonely = lse == -INF
    out[lonely[..., None].expand_as(out)] = 0.0
    lse = torch.where(lonely, INF, lse)
    return out, lse.transpose(1, 2)


# tests/kernelkit/compare.py: check_is_allclose (returns instead of printing)
def peer_check_is_allclose(ans, ref, abs_tol, rel_tol, cos_diff_tol) -> bool:
    """Same +-inf/NaN positions, then every element within abs_tol or rel_tol, cosine diff small."""
    ans, ref = ans.float().clone(), ref.float().clone()
    for val in (INF, -INF, NAN):
        r_mask = (ref != ref) if val != val else (ref == val)
        a_mask = (ans != ans) if val != val else (ans == val)
        if not torch.equal(r_mask, a_mask):
            return False
        ref[r_mask], ans[a_mask] = 0.0, 0.0
    dot, den = (ans.double() * ref.double()).sum(), (ans.double() ** 2 + ref.double() ** 2).sum()
    cos_diff = 0.0 if (ref.double() ** 2).sum() < 1e-12 else float(1 - 2 * dot / den)
    abs_err = (ans - ref).abs()
    rel_err = abs_err / (ref.abs() + 1e-6)
    ok = (abs_err.masked_fill(rel_err < rel_tol, 0) < abs_tol) | (rel_err.masked_fill(abs_err < abs_tol, 0) < rel_tol)
    return bool(ok.all()) and cos_diff < cos_diff_tol


def _prefill_case(g, s_q=24, s_kv=40, h_q=16, d_qk=576, d_v=512, topk=16):
    q = torch.randn(s_q, h_q, d_qk, generator=g).bfloat16().clamp(-10, 10)
    kv = torch.randn(s_kv, 1, d_qk, generator=g).bfloat16().clamp(-10, 10)
    idx = torch.stack([torch.randperm(s_kv, generator=g)[:topk] for _ in range(s_q)]).int()
    n_valid = torch.randint(0, topk + 1, (s_q,), generator=g)
    n_valid[0], n_valid[1] = 0, topk                   # one query with no valid slot, one with all
    idx[torch.arange(topk)[None, :] >= n_valid[:, None]] = -1
    idx[1, 0] = 0                                      # row 0 is used (FlashMLA's prefill ref reads it)
    return q, kv, idx, d_v


def test_sparse_prefill_equals_flashmla_reference():
    g = torch.Generator().manual_seed(41)
    q, kv, idx, d_v = _prefill_case(g)
    used = torch.zeros(kv.shape[0], dtype=torch.bool)
    used[idx[idx >= 0].long()] = True
    kv[~used] = NAN                                    # unused rows NaN, as FlashMLA's generators do
    scale = q.shape[-1] ** -0.5
    out, lse = ops.sparse_attention(q[None], kv[None], kv[None, ..., :d_v], idx[None], scale=scale, return_lse=True)
    p_out, p_lse = peer_sparse_prefill(q, kv, idx[:, None, :], scale, d_v)
    assert not out.isnan().any() and not p_out.isnan().any()
    # FlashMLA's own prefill tolerances (tests/test_flash_mla_sparse_prefill.py)
    assert peer_check_is_allclose(out[0].float(), p_out, abs_tol=8e-4, rel_tol=3.01 / 128, cos_diff_tol=7e-6)
    # convention: a query with no valid slot has lse -inf in HAL, +inf in FlashMLA (out 0 in both)
    assert lse[0, 0].eq(-INF).all() and p_lse[0].eq(INF).all() and out[0, 0].eq(0).all()
    converted = torch.where(lse[0] == -INF, INF, lse[0])
    assert peer_check_is_allclose(converted, p_lse, abs_tol=1e-6, rel_tol=2.01 / 65536, cos_diff_tol=1e-7)
    # the metric can fail: a one-slot shift of the indices is caught
    shifted, _ = peer_sparse_prefill(q, kv, torch.roll(idx, 1, dims=0)[:, None, :], scale, d_v)
    assert not peer_check_is_allclose(out[0].float(), torch.nan_to_num(shifted), 8e-4, 3.01 / 128, 7e-6)


def test_sparse_prefill_convention_out_of_range_indices():
    # FlashMLA's prefill treats any index outside [0, s_kv) as unused; HAL only -1 (others are a
    # ContractError): convert every out-of-range index to -1 and the outputs agree
    g = torch.Generator().manual_seed(43)
    q, kv, idx, d_v = _prefill_case(g, s_q=6, h_q=2, topk=8)
    unused = idx == -1
    outside = torch.tensor([-123456, kv.shape[0], 2147483647, -2147483648], dtype=torch.int32)
    flash_idx = idx.clone()
    flash_idx[unused] = outside[torch.arange(int(unused.sum())) % 4]
    with pytest.raises(ValueError, match="indices"):
        ops.sparse_attention(q[None], kv[None], kv[None, ..., :d_v], flash_idx[None], scale=0.05)
    converted = torch.where((flash_idx < 0) | (flash_idx >= kv.shape[0]), -1, flash_idx)
    out = ops.sparse_attention(q[None], kv[None], kv[None, ..., :d_v], converted[None], scale=0.05)
    p_out, _ = peer_sparse_prefill(q, kv, flash_idx[:, None, :], 0.05, d_v)
    assert peer_check_is_allclose(out[0].float(), p_out, abs_tol=8e-4, rel_tol=3.01 / 128, cos_diff_tol=7e-6)


def test_sparse_decode_paged_nan_rows_equals_flashmla_reference():
    g = torch.Generator().manual_seed(47)
    b, s_q, h_q, d_qk, d_v, topk, block_size = 3, 2, 8, 576, 512, 12, 16
    seqlens = torch.tensor([5, 40, 29])                # batch 0 has fewer keys than top_k
    blocks_per_seq = -(-int(seqlens.max()) // block_size)
    n_blocks = b * blocks_per_seq
    block_table = torch.randperm(n_blocks, generator=g).view(b, blocks_per_seq)
    blocked_k = torch.randn(n_blocks, block_size, 1, d_qk, generator=g).bfloat16().clamp(-1, 1)
    abs_idx = torch.full((b, s_q, topk), -1, dtype=torch.int32)
    for i in range(b):
        for t in range(s_q):
            n = min(topk, int(seqlens[i])) - (t if i == 2 else 0)   # batch 2 also has -1 slots
            abs_idx[i, t, :n] = torch.randperm(int(seqlens[i]), generator=g)[:n].int()
    abs_idx[1, 1] = -1                                 # a query with no valid slot
    in_cache = torch.where(abs_idx >= 0, block_table.gather(1, (abs_idx.clamp_min(0) // block_size).long().flatten(1))
                           .view(b, s_q, topk) * block_size + abs_idx % block_size, -1).int()
    used = torch.zeros(n_blocks * block_size, dtype=torch.bool)
    used[in_cache[in_cache >= 0].long()] = True
    blocked_k.view(-1, d_qk)[~used] = NAN               # every row no valid slot selects is NaN (row 0 too)
    q = torch.randn(b, s_q, h_q, d_qk, generator=g).bfloat16().clamp(-1, 1)
    scale = d_qk ** -0.5
    # HAL's layout: each batch's keys contiguous by position, k [b, L, 1, d_qk]
    L = blocks_per_seq * block_size
    pos = torch.arange(L)
    rows = block_table[:, pos // block_size] * block_size + pos % block_size            # [b, L]
    k = blocked_k.view(-1, d_qk)[rows].view(b, L, 1, d_qk)
    out, lse = ops.sparse_attention(q, k, k[..., :d_v], abs_idx, scale=scale, return_lse=True)
    p_out, p_lse = peer_sparse_decode(q, blocked_k, in_cache, scale, d_v)
    assert not out.isnan().any() and not p_out.isnan().any()
    assert out.dtype == torch.bfloat16
    # FlashMLA's own decode tolerances (tests/test_flash_mla_sparse_decoding.py), on its bf16 output
    assert peer_check_is_allclose(out, p_out.bfloat16(), abs_tol=1e-3, rel_tol=2.01 / 128, cos_diff_tol=5e-6)
    # conventions: lse is [b, s_q, h_q] in HAL, [b, h_q, s_q] in FlashMLA; no valid slot: -inf vs +inf
    assert lse[1, 1].eq(-INF).all() and out[1, 1].eq(0).all()
    converted = torch.where(lse == -INF, INF, lse).transpose(1, 2)
    assert peer_check_is_allclose(converted, p_lse, abs_tol=1e-6, rel_tol=8.01 / 65536, cos_diff_tol=1e-7)


def test_sparse_nan_in_unused_row_zero_never_reaches_output():
    # issue 11 item 1: row 0 unused and NaN, every query has a -1 slot; the old reference read row 0
    # for -1 slots and returned NaN everywhere; FlashMLA's decode reference zeroes NaN rows
    g = torch.Generator().manual_seed(53)
    q = torch.randn(1, 4, 2, 64, generator=g)
    kv = torch.randn(1, 10, 1, 64, generator=g)
    kv[0, 0] = NAN
    kv[0, 9] = INF
    idx = torch.tensor([[[1, 2, -1], [3, -1, -1], [-1, -1, -1], [4, 5, 6]]], dtype=torch.int32)
    out, lse = ops.sparse_attention(q, kv, kv[..., :32], idx, scale=0.125, return_lse=True)
    p_out, p_lse = peer_sparse_decode(q, kv.view(1, 10, 1, 64), idx, 0.125, 32)
    assert not out.isnan().any() and out[0, 2].eq(0).all()
    torch.testing.assert_close(out, p_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.where(lse == -INF, INF, lse).transpose(1, 2), p_lse)


# ==== hal-cuda's Triton kernels under the interpreter: the same bit rule and group rule =========

_INTERPRETED = r"""
import torch, hal
from hal.backends.cpu import KERNELS
rt = hal.runtime("cuda")
e = torch.arange(-22, 120, 3, dtype=torch.float64)     # every third exponent: one interpreted program each
amax = torch.nextafter((448.0 * torch.exp2(e)).float(), torch.tensor(float("inf")))
x = torch.zeros(len(e), 128)
x[:, 5], x[:, 77] = amax, -amax / 3
q, s = rt.fp8_quantize(x, scale_format="ue8m0")
rq, rs = KERNELS["fp8_quantize"](x, scale_format="ue8m0")
print("scales", torch.equal(s.view(torch.int32), rs.view(torch.int32)))
print("codes", torch.equal(q.view(torch.uint8), rq.view(torch.uint8)))
print("exponents", torch.equal(s[:, 0].double(), torch.exp2(e + 1)))
logits = torch.tensor([[3.0, -9.0, 2.8, 2.8, -9.0, -9.0, -9.0, -9.0],
                       [0.0, 2.0, 1.9, 1.9, -1.0, 1.95, -5.0, 0.5]])
for bias in (None, torch.zeros(8)):
    kw = dict(top_k=2, scoring="softmax", correction_bias=bias, n_group=4, topk_group=1)
    print("route", bias is None, rt.moe_route(logits, **kw)[1].tolist(), KERNELS["moe_route"](logits, **kw)[1].tolist())
"""


def test_triton_kernels_follow_the_ue8m0_and_group_rules_under_the_interpreter():
    pytest.importorskip("hal_cuda", reason="hal-cuda is installed by ci/test.sh")
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HAL_CUDA_INTERPRET="1", TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    res = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[:3] == ["scales True", "codes True", "exponents True"]
    # no bias: a group scores its max (row 1: groups {0, 2} {1.9, 1.9} {-1, 1.95} {-5, .5} -> group 0
    # holds the best expert); with a bias the top-2 sum (row 0: group 1, row 1: group 1 {1.9, 1.9})
    assert lines[3] == "route True [[0, 1], [1, 0]] [[0, 1], [1, 0]]"
    assert lines[4] == "route False [[2, 3], [2, 3]] [[2, 3], [2, 3]]"
