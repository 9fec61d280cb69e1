"""FP8 e4m3 helpers shared by the reference kernels: quantize one group axis, dequantize blocks."""
import torch

from ._precision import acc

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_groups(x: torch.Tensor, group: int, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] e4m3, scale [..., ceil(K/group)]) with s = amax.clamp_min(1e-4)/448."""
    K = x.shape[-1]
    G = -(-K // group)
    # the contract defines quantization in fp32, in the float64 evaluation too
    xp = torch.nn.functional.pad(x.float(), (0, G * group - K)).unflatten(-1, (G, group))
    s = xp.abs().amax(-1).clamp_min(1e-4) / FP8_MAX
    if ue8m0:
        # the smallest power of two >= s; log2 in float64 because in fp32 log2(2^n * (1 + 2^-23))
        # rounds to n for most n, which would round s down (and saturate the group's amax)
        s = torch.exp2(torch.ceil(torch.log2(s.double()))).float()
    q = (xp / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2)[..., :K].contiguous(), s


def expand_scale(scale: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    """Block scale grid -> per-element scale [rows, cols]: element (r, c) uses scale[r // br, c // bc]."""
    return scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, group: int = 128) -> torch.Tensor:
    """q [M, K] e4m3 with per-row group scales [M, ceil(K/group)] -> values in the accumulation dtype."""
    return q.to(acc()) * expand_scale(scale.to(acc()), q.shape[0], q.shape[1], 1, group)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """q [N, K] e4m3 with block scales [ceil(N/block), ceil(K/block)] -> values in the accumulation dtype."""
    return q.to(acc()) * expand_scale(scale.to(acc()), q.shape[0], q.shape[1], block, block)
