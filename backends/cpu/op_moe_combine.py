"""Reference ``moe_combine``: out[t] = sum_slot w[t, slot] * expert_out[row(t, slot)], fp32."""
import torch

from ._precision import acc, rounded


def moe_combine(expert_out, plan, weights):
    T, k, H = plan.num_tokens, plan.top_k, expert_out.shape[1]
    dev, N = expert_out.device, expert_out.shape[0]
    # copy t*k+slot -> its row (N when no row holds it: padding rows write to the spare last entry);
    # a scatter, not a boolean mask, so the shapes never depend on the data (meta tensors work)
    row_of_copy = torch.full((T * k + 1,), N, dtype=torch.int64, device=dev)
    row_of_copy.scatter_(0, torch.where(plan.source >= 0, plan.source, T * k), torch.arange(N, device=dev))
    row_of_copy = row_of_copy[:T * k]
    rows = torch.cat([expert_out.to(acc()), torch.zeros(1, H, dtype=acc(), device=dev)])   # row N reads zeros
    per_slot = rows[row_of_copy].view(T, k, H)
    w = torch.where(row_of_copy.view(T, k) < N, weights.to(acc()), 0.0)
    out = torch.zeros(T, H, dtype=acc(), device=dev)
    for slot in range(k):
        out = out + w[:, slot, None] * per_slot[:, slot]
    return rounded(out, expert_out.dtype)
