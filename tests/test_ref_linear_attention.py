"""The linear-attention reference (gated_delta_rule, causal_conv1d) against hand-computed values,
an independent chunked form at every chunk size (fp64), transformers' own Qwen3.5 / Kimi Linear
torch code (fp32), its own invariants (split calls, slots, padding), every bad input, and planted
faults that conformance must catch."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import hal
from hal.backends.cpu import KERNELS, float64_evaluation
from hal.conformance.cases import catalog
from hal.conformance.runner import certify, flatten_outputs, identical
from hal.registry import get_registry

GDR, CONV = hal.ops.gated_delta_rule, hal.ops.causal_conv1d
F64 = torch.float64


def _t(*rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def _gdr_inputs(B, T, Hk, Hv, Dk, Dv, *, seed=0, dtype=torch.float32, per_channel=False):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, Hk, Dk, generator=g), torch.randn(B, T, Hk, Dk, generator=g)
    v = torch.randn(B, T, Hv, Dv, generator=g)
    shape = (B, T, Hv, Dk) if per_channel else (B, T, Hv)
    decay = -torch.rand(*shape, generator=g) * 0.7 - 0.01
    beta = torch.sigmoid(torch.randn(B, T, Hv, generator=g))
    return q.to(dtype), k.to(dtype), v.to(dtype), decay, beta.to(dtype)


# ---- hand-computed cases --------------------------------------------------------------------------

def test_gdr_two_tokens_by_hand():
    # Dk=2, Dv=1, scale 1, zero state. t=1: decay 0.5 of S=0, u = 0.5*(2-0) = 1, S = [[1],[0]],
    # o = S^T [1,1] = 1. t=2: no decay, S^T k = 1, u = 1*(3-1) = 2, S = [[1],[0]] + [1,1]^T*2 = [[3],[2]],
    # o = S^T [0,2] = 4.
    q = _t([[1.0, 1.0]], [[0.0, 2.0]])[None]                   # [1, 2, 1, 2]
    k = _t([[1.0, 0.0]], [[1.0, 1.0]])[None]
    v = _t([[2.0]], [[3.0]])[None]
    g = _t([math.log(0.5)], [0.0])[None]
    beta = _t([0.5], [1.0])[None]
    out, state = GDR(q, k, v, g, beta, scale=1.0)
    torch.testing.assert_close(out, _t([[1.0]], [[4.0]])[None], rtol=0, atol=1e-6)
    torch.testing.assert_close(state, _t([3.0], [2.0])[None, None], rtol=0, atol=1e-6)


def test_gdr_decays_before_the_update_by_hand():
    # S0 = [[4],[2]], g = log 0.5: S = [[2],[1]]; S^T k = 2 = v, so u = 0 and S stays [[2],[1]];
    # o = 3 * (S^T [1,1]) = 9. (Decaying after the update would give u = 0.5*(2-4), o = 1.5 * ...)
    q, k, v = _t([[1.0, 1.0]])[None], _t([[1.0, 0.0]])[None], _t([[2.0]])[None]
    out, state = GDR(q, k, v, _t([math.log(0.5)])[None], _t([0.5])[None], scale=3.0,
                     initial_state=_t([4.0], [2.0])[None, None])
    torch.testing.assert_close(out, _t([[9.0]])[None], rtol=0, atol=1e-6)
    torch.testing.assert_close(state, _t([2.0], [1.0])[None, None], rtol=0, atol=1e-6)


def test_kda_per_channel_decay_by_hand():
    # g per key channel [log 0.5, 0]: S0 = [[4],[2]] -> [[2],[2]]; S^T k = 4, u = 5 - 4 = 1,
    # S = [[3],[3]], o = 2 * (S^T [1, 0]) = 6
    q, k, v = _t([[1.0, 0.0]])[None], _t([[1.0, 1.0]])[None], _t([[5.0]])[None]
    g = torch.tensor([math.log(0.5), 0.0]).view(1, 1, 1, 2)
    out, state = GDR(q, k, v, g, _t([1.0])[None], scale=2.0, initial_state=_t([4.0], [2.0])[None, None])
    torch.testing.assert_close(out, _t([[6.0]])[None], rtol=0, atol=1e-6)
    torch.testing.assert_close(state, _t([3.0], [3.0])[None, None], rtol=0, atol=1e-6)


def test_l2norm_normalizes_q_and_k():
    # q = k = [3, 4] -> [0.6, 0.8]; u = 1, S = [0.6, 0.8]^T, o = 0.36 + 0.64 = 1 (eps 1e-6 under the root)
    x = _t([[3.0, 4.0]])[None]
    out, state = GDR(x, x, _t([[1.0]])[None], _t([0.0])[None], _t([1.0])[None], scale=1.0, qk_l2norm=True)
    n = math.sqrt(25 + 1e-6)
    torch.testing.assert_close(out.double(), torch.full((1, 1, 1, 1), 25 / n ** 2, dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(state.double(), torch.tensor([3 / n, 4 / n], dtype=F64).view(1, 1, 2, 1), rtol=0, atol=1e-6)


def test_value_heads_share_key_heads_consecutively():
    q, k, v, g, beta = _gdr_inputs(1, 6, 2, 4, 8, 4)
    out, state = GDR(q, k, v, g, beta, scale=0.3, qk_l2norm=True)
    for h in range(4):
        kh = h // 2                                            # value heads 0,1 -> key head 0; 2,3 -> key head 1
        o1, s1 = GDR(q[:, :, kh:kh + 1], k[:, :, kh:kh + 1], v[:, :, h:h + 1], g[:, :, h:h + 1], beta[:, :, h:h + 1],
                     scale=0.3, qk_l2norm=True)
        assert torch.equal(out[:, :, h:h + 1], o1) and torch.equal(state[:, h:h + 1], s1)


def test_conv_by_hand():
    # D = 1, K = 2, w = [0.5, 2], bias 1, x = 1, 2, 3: y_t = 1 + 0.5 x_{t-1} + 2 x_t = 3, 5.5, 8
    x, w, b = _t([1.0], [2.0], [3.0])[None], _t([0.5, 2.0]), _t(1.0).view(1)
    out, new = CONV(x, w, bias=b)
    torch.testing.assert_close(out, _t([3.0], [5.5], [8.0])[None], rtol=0, atol=0)
    assert torch.equal(new, _t([3.0])[None])
    out, new = CONV(x, w, bias=b, conv_state=_t([10.0])[None])     # the window: x_{-1} = 10
    torch.testing.assert_close(out[0, 0], torch.tensor([8.0]), rtol=0, atol=0)
    out, _ = CONV(x, w, bias=b, activation="silu")
    torch.testing.assert_close(out, _t([3.0], [5.5], [8.0])[None] * torch.sigmoid(_t([3.0], [5.5], [8.0])[None]))


def test_conv_window_and_padding_by_hand():
    # K = 3, window [a, b] = [7, 8], one real token x0 = 1 of T = 3: y0 = 7*1 + 8*10 + 1*100, new window [8, 1]
    x, w = _t([1.0], [2.0], [3.0])[None], _t([1.0, 10.0, 100.0])
    out, new = CONV(x, w, conv_state=_t([7.0], [8.0])[None], seq_lens=torch.tensor([1]))
    assert out.flatten().tolist() == [187.0, 0.0, 0.0]
    assert new.flatten().tolist() == [8.0, 1.0]
    out, new = CONV(x, w, conv_state=_t([7.0], [8.0])[None], seq_lens=torch.tensor([0]))
    assert out.abs().sum() == 0 and new.flatten().tolist() == [7.0, 8.0]
    out, new = CONV(x[:, :1], w)                                   # T = 1 < K - 1: zeros fill the window
    assert new.flatten().tolist() == [0.0, 1.0]


# ---- an independent chunked form equals the recurrence (fp64) ------------------------------------

def _l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def chunked_gdr(q, k, v, g, beta, *, scale, initial_state, qk_l2norm, chunk):
    """The gated delta rule chunk by chunk (fp64, one length for every row): inside a chunk of n
    tokens with cumulative log-decays c_t (per channel), u solves the unit lower-triangular system
    ``u_t + beta_t * sum_{j<t} (k_t . (e^{c_t - c_j} k_j)) u_j = beta_t (v_t - S0^T (e^{c_t} k_t))``,
    ``o_t = S0^T (e^{c_t} q_t) + sum_{j<=t} (q_t . (e^{c_t - c_j} k_j)) u_j`` and the state
    carried to the next chunk is ``e^{c_n} S0 + sum_j (e^{c_n - c_j} k_j) u_j^T``."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    q, k, v, beta = q.to(F64), k.to(F64), v.to(F64), beta.to(F64)
    if qk_l2norm:
        q, k = _l2(q), _l2(k)
    q = q.repeat_interleave(Hv // Hk, 2) * scale
    k = k.repeat_interleave(Hv // Hk, 2)
    g = g.to(F64)
    g = g[..., None].expand(B, T, Hv, Dk) if g.dim() == 3 else g
    S = torch.zeros(B, Hv, Dk, Dv, dtype=F64) if initial_state is None else initial_state.to(F64).clone()
    out = torch.zeros(B, T, Hv, Dv, dtype=F64)
    for s0 in range(0, T, chunk):
        sl = slice(s0, min(s0 + chunk, T))
        qc, kc, vc, bc = q[:, sl], k[:, sl], v[:, sl], beta[:, sl]
        n = qc.shape[1]
        cum = g[:, sl].cumsum(1)                                               # [B, n, H, Dk]
        lower = torch.ones(n, n, dtype=torch.bool).tril()                      # j <= t
        diff = cum[:, :, None] - cum[:, None, :]                               # [B, t, j, H, Dk]
        ratio = torch.where(lower[None, :, :, None, None], diff, float("-inf")).exp()
        A = torch.einsum("bthc,bjhc,btjhc->bhtj", kc, kc, ratio).tril(-1)
        rhs = bc[..., None] * (vc - torch.einsum("bhcv,bthc->bthv", S, cum.exp() * kc))
        system = torch.eye(n, dtype=F64) + bc.permute(0, 2, 1)[..., None] * A  # [B, H, n, n]
        u = torch.linalg.solve_triangular(system, rhs.permute(0, 2, 1, 3), upper=False, unitriangular=True)
        Aq = torch.einsum("bthc,bjhc,btjhc->bhtj", qc, kc, ratio)
        out[:, sl] = torch.einsum("bhcv,bthc->bthv", S, cum.exp() * qc) + torch.einsum("bhtj,bhjv->bthv", Aq, u)
        last = cum[:, -1]                                                      # [B, H, Dk]
        S = last.exp()[..., None] * S + torch.einsum("bjhc,bhjv->bhcv", (last[:, None] - cum).exp() * kc, u)
    return out, S


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head_g", "per_channel_g"])
def test_chunked_form_equals_the_recurrence_at_every_chunk_size(per_channel):
    T = 13
    q, k, v, g, beta = _gdr_inputs(2, T, 1, 2, 4, 3, seed=1, per_channel=per_channel)
    g[:, :, 0] = 0.0                                               # one head never decays
    g[1, 5:9] = -40.0                                              # a burst of near-total forgetting
    h0 = torch.randn(2, 2, 4, 3, generator=torch.Generator().manual_seed(2))
    with float64_evaluation():
        want, want_state = KERNELS["gated_delta_rule"](q, k, v, g, beta, scale=0.5, initial_state=h0,
                                                       state_indices=None, seq_lens=None, qk_l2norm=True)
    assert want.dtype == F64
    for chunk in range(1, T + 2):
        got, state = chunked_gdr(q, k, v, g, beta, scale=0.5, initial_state=h0, qk_l2norm=True, chunk=chunk)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11, msg=f"chunk {chunk}")
        torch.testing.assert_close(state, want_state, rtol=0, atol=1e-11, msg=f"chunk {chunk}")


def test_chunked_form_equals_the_recurrence_per_sequence_length():
    # variable lengths: each sequence's chunked run on its own tokens equals its rows of the batched call
    q, k, v, g, beta = _gdr_inputs(3, 11, 2, 4, 4, 4, seed=3)
    lens = torch.tensor([11, 6, 0])
    with float64_evaluation():
        out, state = KERNELS["gated_delta_rule"](q, k, v, g, beta, scale=0.4, initial_state=None, state_indices=None,
                                                 seq_lens=lens, qk_l2norm=True)
    for b, n in enumerate(lens.tolist()):
        for chunk in (1, 4, 7, 12):
            o, s = chunked_gdr(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], g[b:b + 1, :n], beta[b:b + 1, :n],
                               scale=0.4, initial_state=None, qk_l2norm=True, chunk=chunk)
            torch.testing.assert_close(out[b:b + 1, :n], o, rtol=0, atol=1e-11)
            torch.testing.assert_close(state[b:b + 1], s, rtol=0, atol=1e-11)
        assert out[b, n:].abs().sum() == 0


# ---- transformers' own code (fp32) ----------------------------------------------------------------

@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is many times faster than several on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_transformers_qwen35_chunked_and_recurrent(dtype, one_thread):
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen
    q, k, v, g, beta = _gdr_inputs(2, 37, 2, 4, 16, 8, seed=4, dtype=dtype)
    h0 = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(5)) * 0.3
    out, state = GDR(q, k, v, g, beta, scale=16 ** -0.5, initial_state=h0, qk_l2norm=True)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    for fn, extra in ((qwen.torch_chunk_gated_delta_rule, dict(chunk_size=16)),
                      (qwen.torch_chunk_gated_delta_rule, dict(chunk_size=64)),
                      (qwen.torch_recurrent_gated_delta_rule, {})):
        o2, s2 = _quiet(fn, q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                        **extra)
        assert o2.dtype == out.dtype
        torch.testing.assert_close(out.float(), o2.float(), **tol)
        torch.testing.assert_close(state, s2, rtol=0, atol=1e-5)


def test_equals_transformers_kimi_delta_attention():
    from transformers.models.kimi_linear import modeling_kimi_linear as kimi
    q, k, v, g, beta = _gdr_inputs(2, 21, 3, 3, 8, 8, seed=6, per_channel=True)
    h0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 0.3
    out, state = GDR(q, k, v, g, beta, scale=8 ** -0.5, initial_state=h0, qk_l2norm=True)
    o2, s2 = _quiet(kimi.recurrent_kimi_delta_attention, q, k, v, g, beta, h0, True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(out, o2, rtol=0, atol=1e-6)
    torch.testing.assert_close(state, s2, rtol=0, atol=1e-6)
    o3, s3 = _quiet(kimi.chunk_kimi_delta_attention, q, k, v, g, beta, chunk_size=8, initial_state=h0,
                    output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(out, o3, rtol=0, atol=1e-5)
    torch.testing.assert_close(state, s3, rtol=0, atol=1e-5)


def test_conv_equals_transformers_prefill_and_update():
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen
    gen = torch.Generator().manual_seed(8)
    B, T, D, K = 2, 9, 12, 4
    x, w = torch.randn(B, T, D, generator=gen), torch.randn(D, K, generator=gen) * 0.5
    out, window = CONV(x, w, activation="silu")
    want = _quiet(qwen.causal_conv1d_fn, x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    # transformers' decode step keeps a channel-first window of K entries and updates it in place
    hf_state = torch.cat([torch.zeros(B, D, 1), x[:, -(K - 1):].transpose(1, 2)], dim=-1)
    assert torch.equal(window.transpose(1, 2), hf_state[..., 1:])
    x1 = torch.randn(B, 1, D, generator=gen)
    step, _ = CONV(x1, w, conv_state=window, activation="silu")
    want = _quiet(qwen.causal_conv1d_update, x1.transpose(1, 2), hf_state.clone(), w, None, "silu").transpose(1, 2)
    torch.testing.assert_close(step, want, rtol=0, atol=1e-6)


# ---- invariants -----------------------------------------------------------------------------------

def test_two_calls_equal_one_call():
    q, k, v, g, beta = _gdr_inputs(2, 20, 1, 2, 8, 8, seed=9, per_channel=False)
    kw = dict(scale=0.35, qk_l2norm=True)
    out, state = GDR(q, k, v, g, beta, **kw)
    o1, s1 = GDR(q[:, :7], k[:, :7], v[:, :7], g[:, :7], beta[:, :7], **kw)
    o2, s2 = GDR(q[:, 7:], k[:, 7:], v[:, 7:], g[:, 7:], beta[:, 7:], initial_state=s1, **kw)
    torch.testing.assert_close(torch.cat([o1, o2], 1), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(s2, state, rtol=0, atol=1e-6)
    gen = torch.Generator().manual_seed(13)
    x, w = torch.randn(2, 20, 8, generator=gen), torch.randn(8, 4, generator=gen)
    for act in ("none", "silu"):
        y, win = CONV(x, w, activation=act)
        y1, w1 = CONV(x[:, :7], w, activation=act)
        y2, w2 = CONV(x[:, 7:], w, conv_state=w1, activation=act)
        assert torch.equal(w2, win)
        if act == "none":
            assert torch.equal(torch.cat([y1, y2], 1), y)
        else:         # torch's vectorized and scalar sigmoid may differ in the last bit by position
            torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=3e-7, atol=0)


def test_state_slots_read_the_named_rows():
    q, k, v, g, beta = _gdr_inputs(3, 2, 1, 2, 4, 4, seed=10)
    gen = torch.Generator().manual_seed(14)
    pool = torch.randn(5, 2, 4, 4, generator=gen)
    slots = torch.tensor([4, 0, 4], dtype=torch.int32)               # a repeated slot is legal
    out, state = GDR(q, k, v, g, beta, scale=0.5, initial_state=pool, state_indices=slots)
    o2, s2 = GDR(q, k, v, g, beta, scale=0.5, initial_state=pool[slots.long()].clone())
    assert torch.equal(out, o2) and torch.equal(state, s2)
    x, w, cs = torch.randn(3, 1, 6, generator=gen), torch.randn(6, 3, generator=gen), torch.randn(5, 2, 6, generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(CONV(x, w, conv_state=cs, state_indices=slots),
                                                 CONV(x, w, conv_state=cs[slots.long()].clone())))


def test_padding_is_inert():
    # what sits past seq_lens never reaches an output or the state
    q, k, v, g, beta = _gdr_inputs(2, 9, 1, 2, 4, 4, seed=11)
    lens = torch.tensor([9, 4])
    out, state = GDR(q, k, v, g, beta, scale=0.5, seq_lens=lens)
    v2, q2 = v.clone(), q.clone()
    v2[1, 4:], q2[1, 4:] = 1e3, -7.0
    out2, state2 = GDR(q2, k, v2, g, beta, scale=0.5, seq_lens=lens)
    assert torch.equal(out, out2) and torch.equal(state, state2) and out[1, 4:].abs().sum() == 0
    o_short, s_short = GDR(q[1:, :4], k[1:, :4], v[1:, :4], g[1:, :4], beta[1:, :4], scale=0.5)
    assert torch.equal(out[1:, :4], o_short) and torch.equal(state[1:], s_short)


def test_empty_and_decay_edges():
    q, k, v, g, beta = _gdr_inputs(2, 0, 1, 2, 4, 4)
    h0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(15))
    out, state = GDR(q, k, v, g, beta, scale=0.5, initial_state=h0)
    assert out.shape == (2, 0, 2, 4) and torch.equal(state, h0) and state.data_ptr() != h0.data_ptr()
    q, k, v, g, beta = _gdr_inputs(1, 3, 1, 1, 4, 4, seed=12)
    _, forgot = GDR(q, k, v, torch.full_like(g, -1e4), beta, scale=0.5, initial_state=torch.full((1, 1, 4, 4), 1e3))
    _, fresh = GDR(q[:, 2:], k[:, 2:], v[:, 2:], g[:, 2:], beta[:, 2:], scale=0.5)
    torch.testing.assert_close(forgot, fresh, rtol=0, atol=1e-6)   # g = -1e4 forgets everything before the token
    assert torch.isfinite(forgot).all()


def test_outputs_follow_the_contract_dtypes_and_meta():
    for c in catalog("quick", ["gated_delta_rule", "causal_conv1d"]):
        args, kwargs = c.materialize(0)
        got = flatten_outputs(getattr(hal.ops, c.op)(*args, **kwargs))
        want = hal.CONTRACT[c.op].expected_outputs(*args, **kwargs)
        assert [(tuple(t.shape), t.dtype) for t in got] == [(s, d) for _, s, d in want], c.id
        with float64_evaluation():
            exact = flatten_outputs(KERNELS[c.op](*args, **kwargs))
        assert exact[0].dtype == F64 and exact[1].dtype == (F64 if c.op == "gated_delta_rule" else args[0].dtype), c.id


# ---- bad inputs -----------------------------------------------------------------------------------

def _gdr_args():
    q, k, v, g, beta = _gdr_inputs(2, 3, 1, 2, 4, 4)
    return [q, k, v, g, beta], dict(scale=0.5, initial_state=torch.zeros(3, 2, 4, 4),
                                    state_indices=torch.tensor([0, 2]), seq_lens=torch.tensor([3, 1]))


def _with(i_or_name, value, drop=()):
    args, kw = _gdr_args()
    if isinstance(i_or_name, int):
        args[i_or_name] = value
    else:
        kw[i_or_name] = value
    for d in drop:
        kw.pop(d)
    return lambda: GDR(*args, **kw)


GDR_BAD = [
    ("q", _with(0, torch.randn(2, 3, 4))), ("q", _with(0, torch.randn(2, 3, 1, 4, dtype=F64))),
    ("q", _with(0, torch.randn(2, 3, 0, 4))), ("k", _with(1, torch.randn(2, 3, 1, 5))),
    ("k", _with(1, torch.randn(2, 3, 1, 4).bfloat16())), ("v", _with(2, torch.randn(3, 3, 2, 4))),
    ("v", lambda: GDR(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 3, 4), -torch.rand(1, 2, 3),
                      torch.rand(1, 2, 3), scale=0.5)),
    ("v", _with(2, torch.randn(2, 4, 2, 4))), ("v", _with(2, torch.randn(2, 3, 2, 0))),
    ("g", _with(3, -torch.rand(2, 3, 2).bfloat16())), ("g", _with(3, -torch.rand(2, 3, 2, 3))),
    ("g", _with(3, torch.full((2, 3, 2), 0.1))), ("g", _with(3, torch.full((2, 3, 2), float("nan")))),
    ("g", _with(3, torch.full((2, 3, 2), float("-inf")))), ("beta", _with(4, torch.rand(2, 3, 2).half())),
    ("beta", _with(4, torch.rand(2, 3))), ("scale", _with("scale", float("nan"))), ("scale", _with("scale", None)),
    ("initial_state", _with("initial_state", torch.zeros(3, 2, 4, 4).double())),
    ("initial_state", _with("initial_state", torch.zeros(3, 2, 4, 5))),
    ("initial_state", _with("initial_state", torch.zeros(3, 2, 4, 4), drop=("state_indices",))),
    ("state_indices", _with("initial_state", None)), ("state_indices", _with("state_indices", torch.tensor([0, 3]))),
    ("state_indices", _with("state_indices", torch.tensor([-1, 0]))),
    ("state_indices", _with("state_indices", torch.tensor([0.0, 1.0]))),
    ("seq_lens", _with("seq_lens", torch.tensor([4, 1]))), ("seq_lens", _with("seq_lens", torch.tensor([-1, 1]))),
    ("seq_lens", _with("seq_lens", torch.tensor([3]))), ("qk_l2norm", _with("qk_l2norm", 1)),
    ("beta", _with(4, torch.rand(2, 3, 2, device="meta"))), ("seq_lens", _with("seq_lens", torch.tensor([3, 1], device="meta"))),
]


def _conv_with(name, value):
    kw = dict(bias=torch.randn(6), conv_state=torch.randn(4, 2, 6), state_indices=torch.tensor([3, 0]),
              seq_lens=torch.tensor([2, 1]), activation="silu")
    args = [torch.randn(2, 2, 6), torch.randn(6, 3)]
    if name in ("x", "weight"):
        args[["x", "weight"].index(name)] = value
    else:
        kw[name] = value
    return lambda: CONV(*args, **kw)


CONV_BAD = [
    ("x", _conv_with("x", torch.randn(2, 6))), ("x", _conv_with("x", torch.randn(2, 2, 6).double())),
    ("x", _conv_with("x", torch.randn(2, 2, 0))), ("weight", _conv_with("weight", torch.randn(5, 3))),
    ("weight", _conv_with("weight", torch.randn(6, 0))), ("weight", _conv_with("weight", torch.randn(6, 3, 1))),
    ("bias", _conv_with("bias", torch.randn(5))), ("bias", _conv_with("bias", torch.randn(6).long())),
    ("conv_state", _conv_with("conv_state", torch.randn(4, 3, 6))),
    ("conv_state", _conv_with("conv_state", torch.randn(4, 2, 6).bfloat16())),
    ("state_indices", _conv_with("conv_state", None)), ("state_indices", _conv_with("state_indices", torch.tensor([4, 0]))),
    ("seq_lens", _conv_with("seq_lens", torch.tensor([3, 0]))), ("seq_lens", _conv_with("seq_lens", torch.tensor([[1, 1]]))),
    ("activation", _conv_with("activation", "gelu")), ("activation", _conv_with("activation", None)),
    ("bias", _conv_with("bias", torch.randn(6, device="meta"))),
]


@pytest.mark.parametrize("op,arg,call", [("gated_delta_rule", a, c) for a, c in GDR_BAD] +
                         [("causal_conv1d", a, c) for a, c in CONV_BAD])
def test_every_bad_input_raises_a_contract_error(op, arg, call):
    with pytest.raises(hal.ContractError) as exc:
        call()
    assert exc.value.op == op and exc.value.arg == arg, str(exc.value)
    assert str(exc.value).startswith(f"{op}: {arg}: expected ") and ", got " in str(exc.value)


# ---- planted faults fail conformance -------------------------------------------------------------

def _decay_after_update(q, k, v, g, beta, *, scale, initial_state, state_indices, seq_lens, qk_l2norm):
    """The recurrence with the decay applied after the delta update instead of before (fp32)."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    q, k = q.float(), k.float()
    if qk_l2norm:
        q, k = _l2(q), _l2(k)
    q, k = q.repeat_interleave(Hv // Hk, 2) * scale, k.repeat_interleave(Hv // Hk, 2)
    decay = g.exp()[..., None] if g.dim() == 3 else g.exp()
    S = torch.zeros(B, Hv, Dk, Dv) if initial_state is None else \
        (initial_state if state_indices is None else initial_state[state_indices.long()]).clone()
    lens = torch.full((B,), T) if seq_lens is None else seq_lens
    out = torch.zeros(B, T, Hv, Dv)
    for t in range(T):
        live = (lens > t)[:, None, None, None]
        u = beta[:, t, :, None].float() * (v[:, t].float() - (S * k[:, t, :, :, None]).sum(-2))
        s = (S + k[:, t, :, :, None] * u[:, :, None, :]) * decay[:, t, :, :, None]
        out[:, t] = torch.where(live[..., 0], (s * q[:, t, :, :, None]).sum(-2), 0.0)
        S = torch.where(live, s, S)
    return out.to(v.dtype), S


def _state_not_carried(q, k, v, g, beta, *, scale, initial_state, state_indices, seq_lens, qk_l2norm, chunk=8):
    """A chunked kernel that starts every chunk of 8 tokens from the initial state."""
    T, outs, final = q.shape[1], [], None
    for s0 in range(0, max(T, 1), chunk):
        sl = slice(s0, s0 + chunk)
        lens = None if seq_lens is None else (seq_lens - s0).clamp(0, chunk)
        o, st = KERNELS["gated_delta_rule"](q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], scale=scale,
                                            initial_state=initial_state, state_indices=state_indices, seq_lens=lens,
                                            qk_l2norm=qk_l2norm)
        outs.append(o)
        ended = torch.ones(q.shape[0], dtype=torch.bool) if lens is None else lens > 0
        final = st if final is None else torch.where(ended[:, None, None, None], st, final)
    return torch.cat(outs, 1), final


def _window_ignored(x, weight, *, bias, conv_state, state_indices, seq_lens, activation):
    """A conv kernel that always starts from zeros, ignoring the cached window."""
    return KERNELS["causal_conv1d"](x, weight, bias=bias, conv_state=None, state_indices=None, seq_lens=seq_lens,
                                    activation=activation)


def _affected(op, fault):
    out = set()
    for c in catalog("quick", [op]):
        args, kwargs = c.materialize(0)
        if not identical(flatten_outputs(KERNELS[op](*args, **kwargs)), flatten_outputs(fault(*args, **kwargs))):
            out.add(c.name)
    return out


@pytest.mark.parametrize("op,fault,must", [
    ("gated_delta_rule", _decay_after_update, {"T1_no_state", "decode_state_slots", "prefill_T37_GVA", "kda_per_channel"}),
    ("gated_delta_rule", _state_not_carried, {"prefill_T37_GVA", "varlen", "state_carried_across_calls"}),
    ("causal_conv1d", _window_ignored, {"decode_step_slots", "state_carried_across_calls", "varlen_state_fp16"}),
], ids=["decay_after_update", "state_not_carried_between_chunks", "conv_window_ignored"])
def test_planted_faults_fail_exactly_the_cases_they_change(fresh_registry, one_thread, op, fault, must):
    name = f"planted-{fault.__name__.strip('_')}"
    backend = hal.Backend(name, kernels={**KERNELS, op: fault},
                          capabilities={o: hal.OpCapability("native", (), "planted fault") for o in KERNELS})
    get_registry().register_backend(backend)
    try:
        run = certify(name, ops=[op])
    finally:
        get_registry().unregister(name)
    affected = _affected(op, fault)
    assert must <= affected
    status = {r.case: r.status for r in run.results}
    assert {c for c, s in status.items() if s == "FAIL"} == affected
    assert {c for c, s in status.items() if s == "PASS"} == set(status) - affected


def _transformers_chunked(q, k, v, g, beta, *, scale, initial_state, state_indices, seq_lens, qk_l2norm):
    """An honest chunked kernel: transformers' fp32 chunked torch code (Qwen3.5's for per-head g,
    Kimi's for per-channel g, chunk size 16), one sequence at a time."""
    from transformers.models.kimi_linear import modeling_kimi_linear as kimi
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    out, final = torch.zeros(B, T, Hv, Dv, dtype=q.dtype), torch.zeros(B, Hv, Dk, Dv)
    for b in range(B):
        n = T if seq_lens is None else int(seq_lens[b])
        h0 = None if initial_state is None else initial_state[b if state_indices is None else int(state_indices[b])][None]
        if n == 0:
            final[b] = 0 if h0 is None else h0[0]
            continue
        # transformers always scales by Dk^-0.5: fold the contract's scale into q (after its own l2norm)
        qb = q[b:b + 1, :n].float()
        if qk_l2norm:
            qb = _l2(qb)
        qb = qb * (scale * Dk ** 0.5)
        kb = _l2(k[b:b + 1, :n].float()) if qk_l2norm else k[b:b + 1, :n].float()
        args = (qb, kb, v[b:b + 1, :n].float(), g[b:b + 1, :n], beta[b:b + 1, :n].float())
        if g.dim() == 3:
            o, s = _quiet(qwen.torch_chunk_gated_delta_rule, *args, chunk_size=16, initial_state=h0,
                          output_final_state=True)
        else:
            o, s = _quiet(kimi.chunk_kimi_delta_attention, *args, chunk_size=16, initial_state=h0, output_final_state=True)
        out[b, :n], final[b] = o[0].to(q.dtype), s[0]
    return out, final


def test_an_honest_chunked_kernel_passes_the_budgets(fresh_registry, one_thread):
    backend = hal.Backend("chunked-transformers", kernels={"gated_delta_rule": _transformers_chunked},
                          capabilities={"gated_delta_rule": hal.OpCapability("native", (), "transformers' chunked code")})
    get_registry().register_backend(backend)
    try:
        run = certify("chunked-transformers", ops=["gated_delta_rule"])
    finally:
        get_registry().unregister("chunked-transformers")
    assert {r.case: r.status for r in run.results} == {c.name: "PASS" for c in catalog("quick", ["gated_delta_rule"])}, \
        [(r.case, r.reason) for r in run.results if r.status != "PASS"]


def test_torch_compile_traces_a_gated_deltanet_step(one_thread):
    # the short conv, then the delta rule, through torch.ops.hal with fullgraph=True
    gen = torch.Generator().manual_seed(16)
    x, w = torch.randn(2, 5, 24, generator=gen), torch.randn(24, 4, generator=gen)
    g, beta = -torch.rand(2, 5, 2, generator=gen), torch.rand(2, 5, 2, generator=gen)
    lens = torch.tensor([5, 3])

    def layer(x, w, g, beta, lens):
        y, window = torch.ops.hal.causal_conv1d(x, w, None, None, None, lens, "silu")
        q, k, v = y.view(2, 5, 3, 2, 4).unbind(2)
        out, state = torch.ops.hal.gated_delta_rule(q, k, v, g, beta, 0.5, None, None, lens, True)
        return out * 2, state, window

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, w, g, beta, lens), layer(x, w, g, beta, lens)):
        assert torch.equal(got, want)
