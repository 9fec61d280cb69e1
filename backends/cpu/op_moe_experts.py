"""Reference ``moe_experts``: per expert, SwiGLU FFN on its rows of the plan."""
import torch

from ._fp8 import quantize_groups
from ._precision import acc, matmul_nt, rounded
from .op_fp8_gemm import block_scaled_matmul


def _matmul(x, w, w_scale):
    """x [n, K] (activation dtype) @ w.T, w [N, K] bf16 or e4m3 with 128x128 block scales."""
    if w_scale is None:
        return matmul_nt(x, w)
    xq, xs = quantize_groups(x, 128)
    return block_scaled_matmul(xq, xs, w, w_scale)


def moe_experts(plan, w_gate_up, w_down, *, activation="silu", w_gate_up_scale=None, w_down_scale=None):
    dtype = plan.hidden.dtype
    if plan.hidden.device.type == "meta":       # no data to route: the output's shape and dtype are all there is
        return torch.empty(plan.hidden.shape, dtype=dtype, device="meta")
    out = torch.zeros(plan.hidden.shape, dtype=acc(), device=plan.hidden.device)
    for e in range(plan.num_experts):
        start, n = int(plan.offsets[e]), int(plan.tokens_per_expert[e])
        if n == 0:
            continue
        x = plan.hidden[start:start + n]
        h = rounded(_matmul(x, w_gate_up[e], None if w_gate_up_scale is None else w_gate_up_scale[e]), dtype)
        g, u = h.to(acc()).chunk(2, dim=-1)
        a = rounded(torch.nn.functional.silu(g) * u, dtype)
        out[start:start + n] = _matmul(a, w_down[e], None if w_down_scale is None else w_down_scale[e])
    return rounded(out, dtype)
