"""Launch grids, tile configurations and index widths of hal-cuda's kernels, as plain functions.

Nothing here touches a tensor or a GPU, so every choice a launcher makes can be checked at the
models' real sizes (S = 131072, T * k * H past 2^31) on any machine, and ``ci/aot_check.py`` can
enumerate exactly the configurations the launchers pick.

CUDA limits: grid x <= 2^31 - 1, grid y and z <= 65535. Each grid below puts the one extent that
grows with the data (tokens, rows, token blocks) on x and keeps y and z bounded by model
constants (heads, column tiles, experts); :func:`check_grid` raises before a launch that would
fail. Element offsets: a kernel that forms ``row * row_stride`` for a tensor whose last element
lies past 2^31 - 1 must form it in int64; :func:`max_offset` is that last element's offset and
:func:`needs_int64` the test, and the kernels named in :data:`INT64_OFFSETS` always widen.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

GRID_X_MAX = 2 ** 31 - 1
GRID_YZ_MAX = 65535
INT32_MAX = 2 ** 31 - 1

# kernels whose row offsets are formed in int64 (the factors that are widened, in the kernel's words)
INT64_OFFSETS = {
    "_sparse_attn_kernel": "token row b * S + t and every gathered key row, times the tensor strides",
    "_scores_kernel": "query rows (b * S + s), key rows (b * L + key) and the chunk buffer rows",
    "_fp8_gemm_kernel": "rm * K, rn * K and rm * N",
    "_grouped_gemm_kernel": "segment rows (start + rm) * K and * N, expert base e * N * K",
}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_grid(kernel: str, grid: Sequence[int]) -> tuple:
    """``grid`` as a tuple after checking it against CUDA's limits (x <= 2^31 - 1, y, z <= 65535,
    every extent >= 1); ValueError naming the kernel and the axis otherwise."""
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"{kernel}: a grid has 1 to 3 axes, got {grid}")
    for axis, (g, lim) in enumerate(zip(grid, (GRID_X_MAX, GRID_YZ_MAX, GRID_YZ_MAX))):
        if not 1 <= g <= lim:
            raise ValueError(f"{kernel}: grid axis {'xyz'[axis]} must be in [1, {lim}], got {g} (grid {grid})")
    return grid


def max_offset(shape: Sequence[int], strides: Optional[Sequence[int]] = None) -> int:
    """The element offset of a tensor's last element: ``sum((n - 1) * stride)`` (contiguous
    strides when ``strides`` is None); -1 for an empty tensor."""
    shape = [int(n) for n in shape]
    if any(n == 0 for n in shape):
        return -1
    if strides is None:
        strides, acc = [], 1
        for n in reversed(shape):
            strides.insert(0, acc)
            acc *= n
    return sum((n - 1) * int(s) for n, s in zip(shape, strides))


def needs_int64(*offsets: int) -> bool:
    """True when any offset cannot be formed in int32."""
    return any(o > INT32_MAX for o in offsets)


# ---- sparse attention ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes of ``_sparse_attn_kernel``: BLOCK_G query heads of one key head per program,
    BLOCK_K gathered keys per step, q.k over BLOCK_D-wide chunks of Dqk, BLOCK_DV value columns.
    DOT: tensor-core ``tl.dot`` (needs BLOCK_G >= 16); otherwise a broadcast-multiply-reduce on
    the CUDA cores, so a key head serving G < 16 query heads computes G rows, not 16.
    UPCAST: operands to fp32 before the dot (the interpreter's bf16 dot is wrong; fp32 inputs),
    dotted at PRECISION: "ieee" under the interpreter, "tf32x3" (three tf32 tensor-core products,
    about fp32 accuracy) for fp32 inputs on the GPU."""
    BLOCK_G: int
    BLOCK_K: int
    BLOCK_D: int
    BLOCK_DV: int
    DOT: bool
    UPCAST: bool
    PRECISION: str
    num_warps: int


def attention_config(G: int, Dqk: int, Dv: int, *, half: bool, interpret: bool) -> AttentionConfig:
    """The launcher's tiles for G = Hq / Hk query heads per key head and head dims Dqk / Dv.
    half: bf16 / fp16 inputs (tensor cores on the GPU); fp32 inputs use exact fp32 dots."""
    bdv = max(16, next_pow2(Dv))
    if G >= 16:
        # a gathered key row serves up to 64 query heads at once; the accumulator is BLOCK_G x Dv fp32
        # fp32 operands (tf32x3 splits each into two tf32 halves) take half the heads per program
        bg = 16 if interpret else min(next_pow2(G), (64 if bdv <= 128 else 32) // (1 if half else 2))
        return AttentionConfig(bg, 16 if interpret else 32, 32 if interpret else 64, bdv, True,
                               interpret or not half, "ieee" if interpret else "tf32x3",
                               4 if interpret else (8 if bg * bdv >= 8192 else 4))
    bg = next_pow2(G)
    # [BLOCK_G, BLOCK_K, chunk] products live in registers: keep them near 8K elements per program
    bk = max(16, min(64, 8192 // (bg * bdv)))
    return AttentionConfig(bg, 16 if interpret else bk, 32 if interpret else 64, bdv, False, True, "ieee",
                           4 if interpret else (8 if bg * bk * bdv > 8192 else 4))


def attention_grid(B: int, S: int, Hk: int, G: int, block_g: int) -> tuple:
    """(B * S, Hk * ceil(G / block_g)): tokens on x (S = 131072 and beyond fits), head blocks on y."""
    return check_grid("_sparse_attn_kernel", (B * S, Hk * cdiv(G, block_g)))


def attention_offsets(B: int, S: int, L: int, Hq: int, Hk: int, Dqk: int, Dv: int, top_k: int) -> dict:
    """The largest element offset of each tensor the attention kernel addresses (contiguous)."""
    return {"q": max_offset((B, S, Hq, Dqk)), "k": max_offset((B, L, Hk, Dqk)), "v": max_offset((B, L, Hk, Dv)),
            "indices": max_offset((B, S, top_k)), "out": max_offset((B, S, Hq, Dv)), "lse": max_offset((B, S, Hq))}


# ---- lightning indexer ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IndexerConfig:
    """Tiles of ``_scores_kernel``: BLOCK_S queries x BLOCK_C keys per program, the head dim
    whole (BLOCK_D; fp32 operands in D_CHUNK-wide slices); CHUNK keys scored per launch before the
    running top-k merge.
    FP8_DOT: e4m3 x e4m3 tensor-core dot (sm_89+; the plugin declines fp8 below) with the scales
    applied after it. UPCAST: operands to fp32 before the dot (interpreter; fp32 inputs), dotted
    at PRECISION ("ieee" under the interpreter, "tf32x3" for fp32 inputs on the GPU)."""
    BLOCK_S: int
    BLOCK_C: int
    BLOCK_D: int
    D_CHUNK: int
    CHUNK: int
    FP8_DOT: bool
    UPCAST: bool
    PRECISION: str
    num_warps: int


def indexer_config(D: int, L: int, *, dtype: str, interpret: bool) -> IndexerConfig:
    """The launcher's tiles for head dim D and L keys; dtype: "bf16", "fp16", "fp32" or "fp8"."""
    if dtype not in ("bf16", "fp16", "fp32", "fp8"):
        raise ValueError(f"lightning_indexer: dtype must be bf16, fp16, fp32 or fp8, got {dtype!r}")
    bd = max(16, next_pow2(D))
    if interpret:
        return IndexerConfig(16, 16, bd, bd, min(L, 64), False, True, "ieee", 4)
    fp32 = dtype == "fp32"
    return IndexerConfig(64, 64, bd, min(bd, 32) if fp32 else bd, min(L, 4096), dtype == "fp8", fp32, "tf32x3",
                         8 if fp32 else 4)


def indexer_grid(B: int, S: int, C: int, block_s: int, block_c: int) -> tuple:
    """(B * ceil(S / BLOCK_S), ceil(C / BLOCK_C)): batches and query blocks folded on x."""
    return check_grid("_scores_kernel", (B * cdiv(S, block_s), cdiv(C, block_c)))


def indexer_offsets(B: int, S: int, L: int, Hi: int, D: int, chunk: int) -> dict:
    """Largest element offsets of the indexer's operands and of one chunk's score buffer."""
    return {"q": max_offset((B, S, Hi, D)), "k": max_offset((B, L, D)), "weights": max_offset((B, S, Hi)),
            "scores": max_offset((B, S, min(chunk, L)))}


# ---- FP8 GEMM and grouped GEMM ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles of the (grouped) GEMM kernels and their launch options."""
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


def fp8_gemm_config(M: int, *, interpret: bool) -> GemmConfig:
    """64-row tiles for small M (decode), 128 otherwise; BLOCK_K = 128 = the scale block."""
    if interpret:
        return GemmConfig(16, 32, 128, 4, 1)
    return GemmConfig(64 if M <= 64 else 128, 128, 128, 8, 3)


def fp8_gemm_grid(M: int, N: int, cfg: GemmConfig) -> tuple:
    """(ceil(M / BLOCK_M), ceil(N / BLOCK_N)): M on x (any token count), N tiles on y."""
    return check_grid("_fp8_gemm_kernel", (cdiv(M, cfg.BLOCK_M), cdiv(N, cfg.BLOCK_N)))


def fp8_gemm_offsets(M: int, N: int, K: int) -> dict:
    """Largest element offsets of a [M, K], b [N, K] and c [M, N]."""
    return {"a": max_offset((M, K)), "b": max_offset((N, K)), "c": max_offset((M, N))}


def grouped_gemm_config(*, fp8: bool, interpret: bool, fp32: bool = False) -> GemmConfig:
    """Tiles of the grouped GEMM: BLOCK_K 128 for FP8 (the scale block), 64 otherwise; fp32
    operands (tf32x3 dots) take 64-column tiles so nothing spills."""
    if interpret:
        return GemmConfig(16, 32, 128 if fp8 else 32, 4, 1)
    return GemmConfig(64, 64 if fp32 else 128, 128 if fp8 else 64, 4, 3)


def grouped_gemm_precision(operand: str, *, interpret: bool) -> str:
    """``input_precision`` of the grouped GEMM's dot for operand dtype "fp8" / "bf16" / "fp16" /
    "fp32": exact "ieee" under the interpreter, "tf32x3" (about fp32 accuracy on tensor cores) for
    fp32 operands on the GPU; for 8/16-bit operands the value is not used."""
    return "ieee" if interpret else ("tf32x3" if operand == "fp32" else "tf32")


def grouped_gemm_grid(R: int, N: int, E: int, cfg: GemmConfig) -> tuple:
    """(ceil(R / BLOCK_M), ceil(N / BLOCK_N), E): every expert scans the row tiles of the whole
    buffer (R rows, a static bound) and returns early past its own segment."""
    return check_grid("_grouped_gemm_kernel", (cdiv(R, cfg.BLOCK_M), cdiv(N, cfg.BLOCK_N), E))


def moe_offsets(T: int, k: int, H: int, I: int, E: int) -> dict:
    """Largest element offsets of moe_forward's buffers: the dispatched rows [T*k, H], the
    gate/up output [T*k, 2I], the stacked expert weights [E, 2I, H]."""
    return {"rows": max_offset((T * k, H)), "gate_up": max_offset((T * k, 2 * I)),
            "w_gate_up": max_offset((E, 2 * I, H)), "w_down": max_offset((E, H, I))}


def route_grid(T: int) -> tuple:
    """One program per token."""
    return check_grid("_route_kernel", (T,))


def quantize_grid(M: int, K: int, group: int) -> tuple:
    """(rows, groups per row) of the activation quantize kernel."""
    return check_grid("_quantize_kernel", (M, cdiv(K, group)))

