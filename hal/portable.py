"""Portable implementations of contract ops in plain torch ops: device-agnostic and free of host
syncs, for backends whose device runs torch ops but has no dedicated kernel for the op (hal-cuda
and hal-ascend use ``moe_combine``). Unlike the CPU reference they never create tensors on the
host or read values back."""
from __future__ import annotations

import torch


def moe_combine(expert_out, plan, weights):
    """The contract's ``moe_combine``: scatter each row back to its (token, slot) with a dummy slot
    for padding rows (no nonzero, no sync), then the weighted sum over slots in fp32, slot order."""
    T, k, H = plan.num_tokens, plan.top_k, expert_out.shape[1]
    dev = expert_out.device
    real = plan.source >= 0
    row_of_copy = torch.full((T * k + 1,), -1, dtype=torch.int64, device=dev)
    row_of_copy[torch.where(real, plan.source, T * k)] = torch.arange(plan.source.numel(), device=dev)
    row_of_copy = row_of_copy[: T * k]
    rows = torch.cat([expert_out.float(), torch.zeros(1, H, device=dev)])
    per_slot = rows[row_of_copy].view(T, k, H)
    w = torch.where(row_of_copy.view(T, k) >= 0, weights.float(), 0.0)
    out = torch.zeros((T, H), dtype=torch.float32, device=dev)
    for slot in range(k):
        out = out + w[:, slot, None] * per_slot[:, slot]
    return out.to(expert_out.dtype)
