"""FP8 e4m3 helpers shared by the reference kernels: quantize one group axis, dequantize blocks."""
import torch

from hal import blockscale

from ._precision import acc

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def ceil_to_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """fp32 scales [...] (positive) -> the ue8m0 scale (fp32 [...], a power of two), read off the bits.

    The smallest power of two >= s within the fp32 normal range: the biased exponent of s, plus one
    when its mantissa is not zero, clamped to [1, 254] (2^-126 .. 2^127). Exact for every fp32, which
    ``exp2(ceil(log2(s)))`` in fp32 is not (``log2(2^n * (1 + 2^-23))`` rounds to n for most n).
    Bitwise equal to DeepGEMM's ``ceil_to_ue8m0`` for every finite s; a non-finite s stays as it is
    (inf -> inf, NaN -> NaN), where DeepGEMM clamps it to 2^127.
    """
    bits = s.float().abs().contiguous().view(torch.int32)
    biased = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    p2 = (biased.clamp(1, 254) << 23).view(torch.float32)
    return torch.where(torch.isfinite(s), p2, s.float())


def quantize_groups(x: torch.Tensor, group: int, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] e4m3, scale [..., ceil(K/group)] fp32): per group of ``group``
    channels ``s = amax.clamp_min(1e-4) / 448`` (rounded up by :func:`ceil_to_ue8m0` when ue8m0),
    ``q = clamp(x / s, -448, 448)``; all in fp32 (the float64 evaluation too: the contract
    defines quantization in fp32)."""
    K = x.shape[-1]
    G = -(-K // group)
    group = min(group, max(K, 1))          # one group wider than K holds just K channels: no padding to it
    xp = torch.nn.functional.pad(x.float(), (0, G * group - K)).unflatten(-1, (G, group))
    s = xp.abs().amax(-1).clamp_min(1e-4) / FP8_MAX
    if ue8m0:
        s = ceil_to_ue8m0(s)
    q = (xp / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2)[..., :K].contiguous(), s


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, group: int = 128) -> torch.Tensor:
    """q [M, K] e4m3 with per-row group scales [M, ceil(K/group)] -> values in the accumulation dtype."""
    return blockscale.dequantize(q, scale, 1, group, dtype=acc())


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """q [N, K] e4m3 with block scales [ceil(N/block), ceil(K/block)] -> values in the accumulation dtype."""
    return blockscale.dequantize(q, scale, block, block, dtype=acc())
