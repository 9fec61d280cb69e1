"""Reference ``fp8_quantize_weight``: one amax/448 scale per 128x128 tile (partial tiles too)."""
import torch

from hal import blockscale

from ._fp8 import FP8_MAX


def fp8_quantize_weight(w, *, block=128):
    # the contract defines quantization in fp32, in the float64 evaluation too
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    bn, bk = min(block, max(N, 1)), min(block, max(K, 1))   # a block wider than the matrix is the matrix
    tiles = torch.nn.functional.pad(w.float().abs(), (0, kb * bk - K, 0, nb * bn - N))
    s = tiles.view(nb, bn, kb, bk).amax(dim=(1, 3)).clamp_min(1e-4) / FP8_MAX
    q = (w.float() / blockscale.expand(s, N, K, bn, bk)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s.to(torch.float32)
