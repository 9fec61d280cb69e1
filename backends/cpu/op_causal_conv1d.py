"""Reference ``causal_conv1d``: each output a K-tap dot product over the window of past inputs."""
import torch

from ._precision import acc, rounded


def causal_conv1d(x, weight, *, bias=None, conv_state=None, state_indices=None, seq_lens=None, activation="none"):
    B, T, D = x.shape
    K = weight.shape[1]
    if conv_state is None:
        window = x.new_zeros(B, K - 1, D)
    else:
        window = conv_state if state_indices is None else conv_state[state_indices.long()]
    xs = torch.cat([window, x], dim=1)                                  # [B, K-1+T, D]: the previous window, then x
    xa, w = xs.to(acc()), weight.to(acc())
    y = torch.zeros(B, T, D, dtype=acc(), device=x.device)
    for j in range(K):                                                  # weight[:, K-1] meets the current token
        y = y + w[:, j] * xa[:, j:j + T]
    if bias is not None:
        y = y + bias.to(acc())
    if activation == "silu":
        y = y * torch.sigmoid(y)
    lengths = torch.full((B,), T, device=x.device) if seq_lens is None else seq_lens.to(x.device).long()
    live = torch.arange(T, device=x.device)[None, :] < lengths[:, None]
    out = rounded(torch.where(live[..., None], y, 0.0), x.dtype)
    rows = lengths[:, None] + torch.arange(K - 1, device=x.device)[None, :]   # the last K-1 rows of cat(window, x[:len])
    new_state = xs.gather(1, rows[..., None].expand(B, K - 1, D))
    return out, new_state
