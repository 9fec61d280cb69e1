"""Reference ``fp8_gemm``: y = (a * a_scale) @ (b * b_scale).T in fp32 (+bias)."""
import torch

from ._fp8 import dequantize_activation, dequantize_weight
from ._precision import acc, matmul_nt, rounded


def fp8_gemm(a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16, bias=None):
    y = matmul_nt(dequantize_activation(a, a_scale), dequantize_weight(b, b_scale))
    if bias is not None:
        y = y + bias.to(acc())
    return rounded(y, out_dtype)
