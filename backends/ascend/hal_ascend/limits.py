"""The documented limits of the torch_npu ops hal-ascend calls, in one place: the backend's
``supports`` rules decline what lies outside them and the emulator rejects it.

Values for Atlas A2 / A3 (the emulator reports itself as A3). Sources: the torch_npu 2.13.0
wheel's ``_op_plugin_docs.py`` and schemas, and, where a comment says "CANN", the CANN operator
constraints as issue 13 states them (not in the wheel's docs). None was checked on an NPU here.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# npu_lightning_indexer / npu_sparse_flash_attention: sparse_count / top-k sizes
SPARSE_COUNTS = frozenset(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}
# npu_lightning_indexer on A2/A3 (CANN LightningIndexer constraints): head dim D = 128, N1 <= 64
INDEXER_HEAD_DIM = 128
INDEXER_MAX_HEADS = 64
# npu_sparse_flash_attention on A2/A3 (CANN SparseFlashAttention constraints): attention_mode 2
# (MLA absorbed: K and V are one tensor) only, D = 512 + rope 64, one KV head, Q heads a power of
# two up to 128, sparse_block_size 1
SFA_NOPE_DIM = 512
SFA_ROPE_DIM = 64
SFA_Q_HEADS = frozenset(2 ** i for i in range(8))
SFA_ATTENTION_MODE = 2
# npu_grouped_matmul: at most 1024 groups; group_list must account for every row of x
GMM_MAX_GROUPS = 1024
# npu_moe_gating_top_k
GATING_MAX_EXPERTS = 2048
# npu_moe_gating_top_k group_select_mode: 0 = a group's score is its max, 1 = the sum of its top 2
GROUP_SCORE_MAX, GROUP_SCORE_TOP2_SUM = 0, 1
# npu_moe_gating_top_k_softmax
SOFTMAX_GATING_MAX_K = 1024
# npu_moe_init_routing_v2
INIT_ROUTING_MAX_EXPERTS = 10240
# npu_format_cast's acl_format for FRACTAL_NZ (the matmul-friendly weight layout)
ACL_FORMAT_FRACTAL_NZ = 29

# --- linear attention (torch_npu 2.13.0 _op_plugin_docs.py) ---------------------------------------
# npu_chunk_gated_delta_rule (Atlas A2/A3): q/k/v/beta bfloat16, g float32, Dk = Dv = 128,
# Nk, Nv <= 64, Nv a multiple of Nk. Its docs also copy the recurrent op's "L_i <= 8", which its
# own example (seqlen 100) and vllm-ascend's probe call (64 tokens) contradict: not applied.
CHUNK_GDR_HEAD_DIM = 128
CHUNK_GDR_MAX_HEADS = 64
# npu_recurrent_gated_delta_rule (Atlas A2/A3): 1 <= L_i <= 8 tokens per sequence, Nk, Nv <= 256,
# Dk, Dv <= 256; gk (per-channel decay) "not supported in this version: pass None"
RECURRENT_GDR_MAX_TOKENS = 8
RECURRENT_GDR_MAX_HEADS = 256
RECURRENT_GDR_MAX_HEAD_DIM = 256
# both GDR ops: the state ("state" / "initial_state") is documented as bfloat16 only;
# HAL_ASCEND_GDR_STATE_DTYPE=float32 declares an op build that takes a float32 state (see
# gdr_state_dtype)
GDR_STATE_DTYPE_ENV = "HAL_ASCEND_GDR_STATE_DTYPE"
# the emulated chunk op's chunk length (the CANN kernel's is not documented; FLA's is 64)
EMULATED_GDR_CHUNK = 64
# npu_fused_causal_conv1d: Ascend 950 only; x float16/bfloat16, dim % 128 == 0, weight [K, dim]
# with K = 3; bias, activation, initial_state_mode and run_mode "not supported yet"
CONV_SOCS = ("950",)
CONV_WIDTH = 3
CONV_DIM_MULTIPLE = 128


def gdr_state_dtype() -> torch.dtype:
    """The state dtype the installed GDR ops take: bfloat16 (torch_npu 2.13.0's documentation,
    the default) or float32 when ``HAL_ASCEND_GDR_STATE_DTYPE=float32`` declares a build that
    takes an fp32 state (vllm-ascend's own recurrent op does; the emulator then accepts it too)."""
    import os
    name = os.environ.get(GDR_STATE_DTYPE_ENV, "bfloat16")
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"{GDR_STATE_DTYPE_ENV} must be bfloat16 or float32, got {name!r}")
    return getattr(torch, name)


# --- MC2 expert parallelism: npu_moe_distribute_dispatch_v2 / npu_moe_distribute_combine_v2 -------
# (op-plugin docs of the v2 ops; the 2.13 wheel's _op_plugin_docs.py has no entry for them)
MC2_ASSIST_STRIDE = 128          # assist_info_for_combine holds 128 int32 per expand_x row (shape [A * 128])
HCCL_BUFFSIZE_ENV = "HCCL_BUFFSIZE"
HCCL_BUFFSIZE_DEFAULT_MB = 200   # "不配置时默认为200MB"
EP_MAX_BS_ENV = "HAL_ASCEND_EP_MAX_BS"


@dataclasses.dataclass(frozen=True)
class MC2Limits:
    """One chip's documented limits of the MC2 op pair (the stricter of dispatch's and combine's)."""

    max_bs: int                  # tokens per rank
    max_k: int
    min_h: int
    max_h: int
    h_multiple: int
    world_sizes: frozenset
    max_experts: int
    max_local_experts: Optional[int]
    mask_2d: bool                # x_active_mask [BS, K] (one flag per slot)
    expand_scales_required: bool  # the combine needs the dispatch's expand_scales (expert_scales at dispatch)


MC2_LIMITS = {
    # A3: BS <= 512; K <= 16; H in [1024, 7168] (combine; dispatch: 8192); ep_world_size in [2, 384]
    # (combine; dispatch: 768); moe_expert_num <= 512 (combine; dispatch: 1024); 2-D x_active_mask
    "A3": MC2Limits(512, 16, 1024, 7168, 1, frozenset(range(2, 385)), 512, None, True, False),
    # A2: BS <= 256; H in (0, 7168], a multiple of 32; ep_world_size 16..256 (fullmesh);
    # moe_expert_num / ep_world_size <= 24; x_active_mask 1-D only; the combine requires expand_scales
    "A2": MC2Limits(256, 16, 32, 7168, 32, frozenset({16, 32, 64, 128, 256}), 512, 24, False, True),
}


def mc2_limits(soc: str) -> Optional[MC2Limits]:
    """The MC2 limits of chip family ``soc`` (None: the ops are not documented for it)."""
    return MC2_LIMITS.get(soc)


def hccl_buffsize_mb() -> int:
    """HCCL_BUFFSIZE in MB (CANN's environment variable; 200 when unset)."""
    import os
    return int(os.environ.get(HCCL_BUFFSIZE_ENV, HCCL_BUFFSIZE_DEFAULT_MB))


def mc2_a3_buffer_bytes(local_experts: int, max_bs: int, world: int, H: int, K: int, shared_experts: int = 0) -> int:
    """The A3 communication buffer the MC2 pair needs (docs, comm_alg "" / fullmesh_v1):
    2 * (L * max_bs * W * Align512(Align32(2H) + 64) + (K + shared) * max_bs * Align512(2H)) bytes."""
    def align(x, a):
        return -(-x // a) * a
    return 2 * (local_experts * max_bs * world * align(align(2 * H, 32) + 64, 512)
                + (K + shared_experts) * max_bs * align(2 * H, 512))
