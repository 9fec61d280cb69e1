"""Reference ``fp8_linear``: quantize the activations per token, then fp8_gemm."""
from .op_fp8_gemm import fp8_gemm
from .op_fp8_quantize import fp8_quantize


def fp8_linear(x, w_q, w_scale, *, bias=None):
    K, N = x.shape[-1], w_q.shape[0]
    a, a_scale = fp8_quantize(x.reshape(-1, K))
    y = fp8_gemm(a, a_scale, w_q, w_scale, out_dtype=x.dtype, bias=bias)
    return y.reshape(*x.shape[:-1], N)
