"""The documented limits of the torch_npu ops hal-ascend calls, in one place: the backend's
``supports`` rules decline what lies outside them and the emulator rejects it.

Values for Atlas A2 / A3 (the emulator reports itself as A3). Sources: the torch_npu 2.13.0
wheel's ``_op_plugin_docs.py`` and schemas, and, where a comment says "CANN", the CANN operator
constraints as issue 13 states them (not in the wheel's docs). None was checked on an NPU here.
"""
from __future__ import annotations

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
