"""``fp8_linear``: the fused Triton activation quantization, then ``fp8_gemm``."""
from hal_cuda.op_fp8_gemm import fp8_gemm
from hal_cuda.op_fp8_quantize import quantize_rows


def fp8_linear(x, w_q, w_scale, *, bias):
    K, N = x.shape[-1], w_q.shape[0]
    a, a_scale = quantize_rows(x.reshape(-1, K), 128, False)
    return fp8_gemm(a, a_scale, w_q, w_scale, out_dtype=x.dtype, bias=bias).reshape(*x.shape[:-1], N)
