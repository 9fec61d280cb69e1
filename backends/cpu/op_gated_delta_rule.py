"""Reference ``gated_delta_rule``: the recurrence, one token at a time, every sequence and head at once."""
import torch

from ._precision import acc, exact, rounded

L2NORM_EPS = 1e-6


def _l2norm(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _starting_state(initial_state, state_indices, shape, device):
    if initial_state is None:
        return torch.zeros(shape, dtype=acc(), device=device)
    pool = initial_state.to(acc()).contiguous()
    start = pool if state_indices is None else pool[state_indices.long()]
    return start.clone()                                    # never an alias of the input


def gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None, state_indices=None, seq_lens=None,
                     qk_l2norm=False):
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    out_dtype = q.dtype
    q, k = q.to(acc()).contiguous(), k.to(acc()).contiguous()
    if qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q.repeat_interleave(Hv // Hk, dim=2) * scale        # [B, T, Hv, Dk]: value head h reads key head h // (Hv/Hk)
    k = k.repeat_interleave(Hv // Hk, dim=2)
    v, beta = v.to(acc()).contiguous(), beta.to(acc()).contiguous()
    decay = g.to(acc()).exp()
    decay = (decay[..., None] if g.dim() == 3 else decay).contiguous()      # [B, T, Hv, 1 or Dk]
    lengths = torch.full((B,), T, device=q.device) if seq_lens is None else seq_lens.to(q.device)
    S = _starting_state(initial_state, state_indices, (B, Hv, Dk, Dv), q.device)   # [B, Hv, Dk, Dv]
    out = torch.zeros(B, T, Hv, Dv, dtype=acc(), device=q.device)
    for t in range(T):
        live = (lengths > t)[:, None, None, None]
        s = S * decay[:, t, :, :, None]                                     # decay first ...
        u = beta[:, t, :, None] * (v[:, t] - (s * k[:, t, :, :, None]).sum(-2))
        s = s + k[:, t, :, :, None] * u[:, :, None, :]                      # ... then the delta update
        out[:, t] = torch.where(live[..., 0], (s * q[:, t, :, :, None]).sum(-2), 0.0)
        S = torch.where(live, s, S)
    return rounded(out, out_dtype), (S if exact() else S.float())
