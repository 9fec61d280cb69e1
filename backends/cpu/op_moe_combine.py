"""Reference ``moe_combine``: out[t] = sum_slot w[t, slot] * expert_out[row(t, slot)], fp32."""
import torch

from ._precision import acc, rounded


def moe_combine(expert_out, plan, weights):
    T, k, H = plan.num_tokens, plan.top_k, expert_out.shape[1]
    real = plan.source >= 0
    row_of_copy = torch.full((T * k,), -1, dtype=torch.int64)    # copy t*k+slot -> its row, -1 if none
    row_of_copy[plan.source[real]] = torch.nonzero(real).flatten()
    rows = torch.cat([expert_out.to(acc()), torch.zeros(1, H, dtype=acc())])   # row -1 reads zeros
    per_slot = rows[row_of_copy].view(T, k, H)
    w = torch.where(row_of_copy.view(T, k) >= 0, weights.to(acc()), 0.0)
    out = torch.zeros(T, H, dtype=acc())
    for slot in range(k):
        out = out + w[:, slot, None] * per_slot[:, slot]
    return rounded(out, expert_out.dtype)
