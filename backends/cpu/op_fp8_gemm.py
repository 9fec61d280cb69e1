"""Reference ``fp8_gemm``: y = (a * a_scale) @ (b * b_scale).T in fp32 (+bias)."""
from ._fp8 import dequantize_activation, dequantize_weight
from ._precision import acc, rounded


def fp8_gemm(a, a_scale, b, b_scale, *, out_dtype=None, bias=None):
    import torch
    out_dtype = out_dtype or torch.bfloat16
    y = dequantize_activation(a, a_scale) @ dequantize_weight(b, b_scale).T
    if bias is not None:
        y = y + bias.to(acc())
    return rounded(y, out_dtype)
