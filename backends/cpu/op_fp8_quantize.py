"""Reference ``fp8_quantize``: per token, per group of channels, amax/448 scale, saturating cast."""
import torch

from ._fp8 import quantize_groups


def fp8_quantize(x, *, group_size=128, scale_format="fp32"):
    q, s = quantize_groups(x, group_size, ue8m0=scale_format == "ue8m0")
    return q, s.to(torch.float32)
