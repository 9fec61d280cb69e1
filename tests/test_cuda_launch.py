"""hal-cuda's launch grids, tile choices and offset widths at the models' real sizes, as plain
arithmetic (no tensor is allocated, no GPU needed): what a launcher would hand to CUDA at
S = 131072 or T * k * H past 2^31 must be within CUDA's grid limits, and every tensor whose last
element lies past 2^31 - 1 must be addressed by a kernel that widens its offsets."""
from __future__ import annotations

import pytest

pytest.importorskip("hal_cuda", reason="hal-cuda is installed by ci/test.sh")

from hal_cuda import launch as L  # noqa: E402

# the released models' sizes (DeepSeek-V3.2 / GLM-5): 128 / 64 query heads, MLA 512 + 64, indexer 64 x 128
MLA_DQK, MLA_DV, TOPK = 576, 512, 2048


def test_check_grid_enforces_cuda_limits_and_names_the_axis():
    assert L.check_grid("k", (2 ** 31 - 1, 65535, 65535)) == (2 ** 31 - 1, 65535, 65535)
    for grid, axis in [((2 ** 31,), "x"), ((1, 65536), "y"), ((1, 1, 65536), "z"), ((0, 1), "x"), ((1, 0), "y")]:
        with pytest.raises(ValueError, match=f"k: grid axis {axis}"):
            L.check_grid("k", grid)
    with pytest.raises(ValueError, match="1 to 3 axes"):
        L.check_grid("k", (1, 1, 1, 1))
    # the layout the attention kernel had before (B, S, heads) is what CUDA refuses at S = 65536
    with pytest.raises(ValueError, match="axis y"):
        L.check_grid("_sparse_attn_kernel", (1, 65536, 16))


@pytest.mark.parametrize("B,S,Hq,Hk,Dqk,Dv", [
    (1, 131072, 128, 128, 192, 128),       # DeepSeek-V3.2 prefill, MHA form (nope 128 + rope 64, v 128)
    (1, 131072, 64, 64, 256, 256),         # GLM-5 prefill, MHA form
    (1, 65536, 16, 16, 128, 128),          # the benchmark's prefill shape
    (4, 131072, 128, 1, MLA_DQK, MLA_DV),  # MLA absorbed form over a long prompt batch
    (256, 1, 128, 1, MLA_DQK, MLA_DV),     # MLA decode, a large batch
])
def test_attention_grid_fits_cuda_at_model_sizes(B, S, Hq, Hk, Dqk, Dv):
    G = Hq // Hk
    cfg = L.attention_config(G, Dqk, Dv, half=True, interpret=False)
    gx, gy = L.attention_grid(B, S, Hk, G, cfg.BLOCK_G)
    assert gx == B * S and gy == Hk * L.cdiv(G, cfg.BLOCK_G) <= 65535
    # every (token, query head) pair is covered exactly once, padding only inside a partial last block
    assert gy * cfg.BLOCK_G >= Hq and (gy - Hk) * cfg.BLOCK_G < Hq


def test_attention_grid_at_s_131072_is_in_range_where_the_old_layout_was_not():
    assert L.attention_grid(1, 131072, 1, 128, 32) == (131072, 4)
    with pytest.raises(ValueError, match="axis x"):
        L.attention_grid(2 ** 16, 2 ** 15, 1, 1, 1)             # B * S = 2^31: too many tokens for one launch


@pytest.mark.parametrize("G,expect_block,expect_dot", [(1, 1, False), (2, 2, False), (3, 4, False), (4, 4, False),
                                                       (8, 8, False), (16, 16, True), (32, 32, True), (64, 64, True),
                                                       (128, 64, True)])
def test_attention_head_block_adapts_to_heads_per_key_head(G, expect_block, expect_dot):
    cfg = L.attention_config(G, 128, 128, half=True, interpret=False)
    assert (cfg.BLOCK_G, cfg.DOT) == (expect_block, expect_dot)
    computed = L.cdiv(G, cfg.BLOCK_G) * cfg.BLOCK_G
    assert computed < 2 * G                                     # at most the power-of-two round-up, never 16 for 1
    if G & (G - 1) == 0:
        assert computed == G                                    # no padding head at all
    assert cfg.UPCAST == (not cfg.DOT)                          # CUDA-core path works in fp32; dots stay bf16


def test_attention_config_keeps_mla_accumulator_bounded_and_fp32_exact():
    mla = L.attention_config(128, MLA_DQK, MLA_DV, half=True, interpret=False)
    assert mla.DOT and not mla.UPCAST and mla.BLOCK_DV == 512 and mla.BLOCK_D == 64
    assert mla.BLOCK_G * mla.BLOCK_DV <= 32 * 512 and mla.num_warps == 8
    assert L.attention_config(128, MLA_DQK, MLA_DV, half=False, interpret=False).UPCAST      # fp32 inputs: ieee
    interp = L.attention_config(16, 64, 64, half=True, interpret=True)
    assert interp.UPCAST and interp.DOT                         # the interpreter's bf16 dot is wrong: fp32 there
    small = L.attention_config(1, MLA_DQK, MLA_DV, half=True, interpret=False)
    assert small.BLOCK_G * small.BLOCK_K * small.BLOCK_DV <= 16384    # the [G, K, Dv] product stays in registers


def test_attention_offsets_pass_int32_at_mla_prefill():
    off = L.attention_offsets(1, 131072, 131072, 128, 1, MLA_DQK, MLA_DV, TOPK)
    assert off["q"] == 131072 * 128 * 576 - 1 and L.needs_int64(off["q"], off["out"])
    assert off["indices"] == 131072 * TOPK - 1 and not L.needs_int64(off["indices"])
    assert L.needs_int64(L.attention_offsets(9, 131072, 131072, 128, 1, MLA_DQK, MLA_DV, TOPK)["indices"])
    assert not L.needs_int64(off["k"])                        # the latent cache alone fits, the query side does not
    assert "_sparse_attn_kernel" in L.INT64_OFFSETS
    # the smallest prefill at which B*S*Hq*D passes 2^31 at 128 heads of 576: just over 29K tokens
    assert not L.needs_int64(L.attention_offsets(1, 29127, 29127, 128, 1, MLA_DQK, MLA_DV, 64)["q"])
    assert L.needs_int64(L.attention_offsets(1, 29128, 29128, 128, 1, MLA_DQK, MLA_DV, 64)["q"])


def test_max_offset_of_a_strided_cache_view():
    B, Lk = 2, 1000
    # v = kv[..., :512] of a [B, L, 1, 576] cache: strides (L*576, 576, 576, 1)
    assert L.max_offset((B, Lk, 1, 512), (Lk * 576, 576, 576, 1)) == (B - 1) * Lk * 576 + (Lk - 1) * 576 + 511
    assert L.max_offset((3, 4)) == 11 and L.max_offset((0, 4)) == -1 and L.max_offset(()) == 0


def test_indexer_grid_and_chunk_buffer_at_model_sizes():
    cfg = L.indexer_config(128, 131072, dtype="bf16", interpret=False)
    assert (cfg.BLOCK_S, cfg.BLOCK_C, cfg.BLOCK_D, cfg.CHUNK) == (64, 64, 128, 4096) and not cfg.UPCAST
    for B in (1, 8, 64):
        gx, gy = L.indexer_grid(B, 131072, cfg.CHUNK, cfg.BLOCK_S, cfg.BLOCK_C)
        assert gx == B * 2048 and gy == 64
    # one chunk's fp32 score buffer [B, S, 4096]: its last offset passes 2^31 - 1 from B = 5 at S = 131072
    assert not L.needs_int64(L.indexer_offsets(4, 131072, 131072, 64, 128, cfg.CHUNK)["scores"])
    assert L.needs_int64(L.indexer_offsets(5, 131072, 131072, 64, 128, cfg.CHUNK)["scores"])
    q_off = [L.indexer_offsets(B, 131072, 131072, 64, 128, cfg.CHUNK)["q"] for B in (2, 3)]   # B * S * 64 * 128
    assert q_off[0] == 2 ** 31 - 1 and not L.needs_int64(q_off[0]) and L.needs_int64(q_off[1])
    fp8 = L.indexer_config(128, 131072, dtype="fp8", interpret=False)
    assert fp8.FP8_DOT and not fp8.UPCAST
    assert L.indexer_config(128, 131072, dtype="fp32", interpret=False).UPCAST
    assert L.indexer_config(128, 100, dtype="bf16", interpret=False).CHUNK == 100
    with pytest.raises(ValueError, match="lightning_indexer: dtype"):
        L.indexer_config(128, 100, dtype="int8", interpret=False)


def test_fp8_gemm_grid_and_offsets():
    small, big = L.fp8_gemm_config(64, interpret=False), L.fp8_gemm_config(65, interpret=False)
    assert (small.BLOCK_M, big.BLOCK_M, big.BLOCK_K) == (64, 128, 128)
    assert L.fp8_gemm_grid(131072 * 8, 7168, big) == (8192, 56)
    off = L.fp8_gemm_offsets(131072, 18432, 7168)              # a 128K-token prefill through the dense FFN
    assert L.needs_int64(off["a"], off["c"]) and not L.needs_int64(off["b"])
    assert not any(L.needs_int64(v) for v in L.fp8_gemm_offsets(4096, 7168, 2048).values())


def test_moe_rows_pass_int32_and_the_grouped_grid_stays_in_range():
    T, k, H, I, E = 65536, 8, 7168, 2048, 256                  # T * k * H = 3.76e9
    off = L.moe_offsets(T, k, H, I, E)
    assert off["rows"] == T * k * H - 1 and L.needs_int64(off["rows"])
    assert L.needs_int64(off["w_gate_up"])                     # 256 experts x 4096 x 7168 stacked
    cfg = L.grouped_gemm_config(fp8=True, interpret=False)
    assert L.grouped_gemm_grid(T * k, 2 * I, E, cfg) == (T * k // 64, 32, 256)
    assert L.route_grid(131072) == (131072,) and L.quantize_grid(T * k, H, 128) == (T * k, 56)
    with pytest.raises(ValueError, match="_grouped_gemm_kernel: grid axis z"):
        L.grouped_gemm_grid(64, 64, 70000, cfg)


def test_cdiv_and_next_pow2():
    assert [L.cdiv(a, 4) for a in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert [L.next_pow2(n) for n in (0, 1, 2, 3, 17, 64)] == [1, 1, 2, 4, 32, 64]
