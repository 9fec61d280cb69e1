"""hal-cuda's linear-attention kernels (gated_delta_rule chunked and recurrent, causal_conv1d) under
the Triton interpreter against the float64 evaluation of the reference at tiny shapes, their
launch rules as plain functions, and planted faults in the kernels themselves (decay after the
update; state not carried between chunks) that conformance must FAIL.

The interpreter is chosen per launch (CPU tensors, or a backend instance's ``interpret`` option),
so everything runs in this process. The chunk size is 16 under the interpreter, so T = 20..40
crosses two or three chunk boundaries that do not divide T.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hal_cuda", reason="hal-cuda is installed by ci/test.sh")
pytest.importorskip("triton")


def test_launch_rules_are_plain_functions():
    from hal_cuda.op_causal_conv1d import conv_config, conv_grid
    from hal_cuda.op_gated_delta_rule import RECURRENT_MAX_T, gdr_config, gdr_grid, gdr_mode, unsupported_reason
    assert gdr_mode(1, False) == gdr_mode(RECURRENT_MAX_T, False) == "recurrent"
    assert gdr_mode(RECURRENT_MAX_T + 1, False) == "chunked" and gdr_mode(4096, True) == "recurrent"
    cfg = gdr_config(128, 128, interpret=False)
    assert (cfg.C, cfg.BLOCK_DK, cfg.PRECISION, cfg.num_warps) == (64, 128, "tf32x3", 8)
    assert cfg.BLOCK_DK * cfg.BLOCK_V <= 4096
    assert gdr_config(8, 24, interpret=True).C == 16 and gdr_config(8, 24, interpret=True, chunk=32).C == 32
    assert gdr_grid(64, 32, 128, cfg.BLOCK_V) == (64 * 32, 128 // cfg.BLOCK_V)
    assert unsupported_reason(256) is None and "Dk = 257 > 256" in unsupported_reason(257)
    c = conv_config(1, 8192, interpret=False)
    assert c.BLOCK_T == 1 and conv_config(4096, 8192, interpret=False).BLOCK_T == 16
    assert conv_grid(64, 1, 8192, c) == (64, 8192 // c.BLOCK_D)
    with pytest.raises(ValueError, match="axis y"):
        conv_grid(1, 16, 65536 * 256 + 1, conv_config(16, 1, interpret=False))


def test_plugin_declares_both_ops_and_declines_wide_keys_on_a_gpu():
    import torch
    from hal_cuda.plugin import OPS, capability_table
    assert {"gated_delta_rule", "causal_conv1d"} <= set(OPS)
    gpu = capability_table((9, 0))
    q = torch.empty(1, 1, 1, 320, device="meta")
    assert "Dk = 320 > 256" in gpu["gated_delta_rule"].supports(q, q, q, q, q, scale=1.0)
    assert gpu["gated_delta_rule"].supports(q[..., :128], q, q, q, q, scale=1.0) is None
    assert capability_table(None)["gated_delta_rule"].supports is None          # the interpreter has no register file


def _gdr_check():
    from hal.backends.cpu import KERNELS, float64_evaluation
    from hal_cuda.op_gated_delta_rule import launch

    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    def case(B, T, Hk, Hv, Dk, Dv, *, dtype=torch.float32, per_channel=False, state=None, lens=None, l2=True,
             g_edges=False):
        q, k, v = rnd(B, T, Hk, Dk).to(dtype), rnd(B, T, Hk, Dk).to(dtype), rnd(B, T, Hv, Dv).to(dtype)
        if not l2:                                                    # unit keys keep the recurrence bounded
            k = (k.float() / k.float().norm(dim=-1, keepdim=True)).to(dtype)
        g = -torch.rand(*((B, T, Hv, Dk) if per_channel else (B, T, Hv)), generator=gen) * 0.7 - 0.01
        if g_edges:                                                   # never decays / forgets all / nearly all
            g[:, :, 0], g[:, :, 1], g[:, :, 2] = 0.0, -1e4, -30.0
        beta = torch.sigmoid(rnd(B, T, Hv)).to(dtype)
        kw = dict(scale=Dk ** -0.5, qk_l2norm=l2, initial_state=None, state_indices=None, seq_lens=None)
        if state == "batch":
            kw["initial_state"] = rnd(B, Hv, Dk, Dv) * 0.5
        elif state is not None:                                       # a pool and the rows to start from
            kw["initial_state"] = rnd(max(state) + 2, Hv, Dk, Dv) * 0.5
            kw["state_indices"] = torch.tensor(state, dtype=torch.int32)
        if lens is not None:
            kw["seq_lens"] = torch.tensor(lens)
        return (q, k, v, g, beta), kw

    CASES = {
        "chunks_37_over_16_gqa_repeated_slots": (case(2, 37, 2, 4, 16, 32, state=[1, 1]), ["chunked"], 16),
        "chunk_32_odd_dims_batch_state": (case(1, 45, 1, 3, 12, 20, state="batch"), ["chunked"], 32),
        "varlen_with_zero_length": (case(3, 20, 1, 2, 16, 16, state=[0, 2, 2], lens=[20, 7, 0]),
                                    ["chunked", "recurrent"], 16),
        "T1": (case(2, 1, 1, 2, 16, 16, state="batch"), ["chunked", "recurrent"], 16),
        "T0_keeps_the_state": (case(2, 0, 1, 2, 8, 8, state=[1, 0]), ["chunked", "recurrent"], 16),
        "B0": (case(0, 5, 1, 1, 8, 8), ["chunked", "recurrent"], 16),
        "g_zero_and_large_negative": (case(1, 33, 1, 4, 16, 16, state="batch", g_edges=True),
                                      ["chunked", "recurrent"], 16),
        "per_channel_g_varlen_slots": (case(2, 13, 1, 2, 8, 16, per_channel=True, state=[0, 0], lens=[13, 4]),
                                       ["recurrent"], 16),
        "per_channel_g_edges": (case(1, 9, 1, 3, 16, 16, per_channel=True, g_edges=True), ["recurrent"], 16),
        "bf16_unit_keys_no_l2norm": (case(2, 21, 2, 2, 16, 16, dtype=torch.bfloat16, l2=False),
                                     ["chunked", "recurrent"], 16),
    }
    res = {}
    for name, ((args, kw), modes, chunk) in CASES.items():
        with float64_evaluation():
            want, want_state = KERNELS["gated_delta_rule"](*args, **kw)
        before = [a.clone() for a in args] + [t.clone() for t in kw.values() if isinstance(t, torch.Tensor)]
        for mode in modes:
            out, state = launch(*args, **kw, mode=mode, chunk=chunk)
            after = list(args) + [t for t in kw.values() if isinstance(t, torch.Tensor)]
            assert all(torch.equal(x, y) for x, y in zip(before, after)), (name, "an input was modified")
            assert out.dtype == args[0].dtype and out.shape == want.shape, (name, out.dtype, out.shape)
            assert state.dtype == torch.float32 and state.shape == want_state.shape, (name, state.dtype)
            if kw["initial_state"] is not None and state.numel():
                assert state.data_ptr() != kw["initial_state"].data_ptr()
            if kw["seq_lens"] is not None:                              # padded positions: exactly 0
                for b, n in enumerate(kw["seq_lens"].tolist()):
                    assert (out[b, n:] == 0).all(), (name, b)
            ulp = 2.0 ** -8 if args[0].dtype == torch.bfloat16 else 0.0
            err_o = ((out.double() - want).abs() - ulp * want.abs()).max().item() if out.numel() else 0.0
            err_s = (state.double() - want_state).abs().max().item() if state.numel() else 0.0
            res[f"{name}/{mode}"] = [err_o, err_s]
    return res


def test_gated_delta_rule_kernels_equal_the_float64_reference():
    """Both kernels, forced, on the cases (the per-channel ones on the recurrence only): chunk
    boundaries that do not divide T (16 and 32), T = 1, T = 0 (the state passes through), B = 0,
    GQA, a pool with repeated rows, seq_lens with a 0, g = 0 / -30 / -1e4 heads, per-channel g,
    bf16 without l2norm. Inputs unchanged, out in q's dtype, final_state fp32 and fresh."""
    res = _gdr_check()
    assert len(res) == 16
    for name, (err_o, err_s) in res.items():
        assert err_o <= 2e-5 and err_s <= 2e-5, (name, err_o, err_s)


def _conv_check():
    from hal.backends.cpu import KERNELS, float64_evaluation
    from hal_cuda.op_causal_conv1d import causal_conv1d

    gen = torch.Generator().manual_seed(1)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    def case(B, T, D, K, dtype, *, state=None, lens=None, bias=False, act="silu"):
        x, w = rnd(B, T, D, dtype=dtype), rnd(D, K, dtype=dtype) * K ** -0.5
        kw = dict(bias=rnd(D, dtype=dtype) if bias else None, conv_state=None, state_indices=None, seq_lens=None,
                  activation=act)
        if state == "batch":
            kw["conv_state"] = rnd(B, K - 1, D, dtype=dtype)
        elif state is not None:
            kw["conv_state"] = rnd(max(state) + 2, K - 1, D, dtype=dtype)
            kw["state_indices"] = torch.tensor(state)
        if lens is not None:
            kw["seq_lens"] = torch.tensor(lens, dtype=torch.int32)
        return (x, w), kw

    CASES = {
        "prefill_K4_bias_silu_bf16": case(2, 37, 80, 4, torch.bfloat16, bias=True),
        "decode_T1_repeated_slots": case(3, 1, 32, 4, torch.bfloat16, state=[2, 2, 0], bias=True),
        "varlen_with_zero_fp16": case(3, 7, 16, 3, torch.float16, state="batch", lens=[7, 2, 0], act="none"),
        "T_shorter_than_window_slots": case(2, 2, 16, 4, torch.float32, state=[1, 0], lens=[2, 1]),
        "K1_empty_window": case(2, 5, 16, 1, torch.float32, bias=True),
        "K2": case(1, 19, 24, 2, torch.float32, state="batch"),
        "T0_keeps_the_window": case(2, 0, 16, 4, torch.bfloat16, state=[0, 1]),
        "B0": case(0, 3, 8, 4, torch.float32),
    }
    res = {}
    for name, (args, kw) in CASES.items():
        with float64_evaluation():
            want, want_state = KERNELS["causal_conv1d"](*args, **kw)
        before = [a.clone() for a in args] + [t.clone() for t in kw.values() if isinstance(t, torch.Tensor)]
        out, state = causal_conv1d(*args, **kw)
        after = list(args) + [t for t in kw.values() if isinstance(t, torch.Tensor)]
        assert all(torch.equal(x, y) for x, y in zip(before, after)), (name, "an input was modified")
        assert out.dtype == args[0].dtype and state.dtype == args[0].dtype and out.shape == want.shape
        exact = state.shape == want_state.shape and torch.equal(state, want_state.to(state.dtype))
        ulp = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[args[0].dtype]
        err = ((out.double() - want).abs() - ulp * want.abs()).max().item() if out.numel() else 0.0
        res[name] = [err, exact]
    return res


def test_causal_conv1d_kernel_equals_the_float64_reference_and_copies_the_window_exactly():
    """K = 1, 2, 3, 4; decode (T = 1) from repeated pool rows; T shorter than the window; seq_lens
    with a 0 (the window passes through); T = 0; B = 0: outputs within fp32 rounding of the
    float64 reference (plus the output dtype's half ulp), new_state bitwise equal."""
    res = _conv_check()
    assert len(res) == 8
    for name, (err, exact) in res.items():
        assert exact, (name, "new_state differs from the reference's bit-exact window")
        assert err <= 1e-5, (name, err)


def _faults_check():
    import hal
    from hal.conformance.cases import catalog
    from hal.conformance.runner import certify
    from hal.registry import get_registry
    from hal_cuda import op_gated_delta_rule as gdr

    def planted(fault):
        def gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None, state_indices=None, seq_lens=None,
                             qk_l2norm=False):
            return gdr.launch(q, k, v, g, beta, scale=scale, initial_state=initial_state, state_indices=state_indices,
                              seq_lens=seq_lens, qk_l2norm=qk_l2norm, fault=fault)
        return gated_delta_rule

    chosen = {"decay_after_update": {"prefill_T37_GVA", "decode_state_slots", "kda_per_channel"},
              "state_not_carried": {"varlen", "state_carried_across_calls", "decode_state_slots"}}
    out = {}
    for name, fault in [("decay_after_update", gdr.FAULT_DECAY_AFTER_UPDATE),
                        ("state_not_carried", gdr.FAULT_STATE_NOT_CARRIED)]:
        backend = hal.Backend(f"cuda-{name}", kernels={"gated_delta_rule": planted(fault)},
                              capabilities={"gated_delta_rule": hal.OpCapability("native", (), f"planted: {name}")})
        get_registry().register_backend(backend)
        try:
            cases = [c for c in catalog("quick", ["gated_delta_rule"]) if c.name in chosen[name]]
            run = certify(f"cuda-{name}", cases=cases)
        finally:
            get_registry().unregister(f"cuda-{name}")
        out[name] = {r.case: r.status for r in run.results}
    return out


def test_planted_kernel_faults_fail_conformance():
    """The real kernels with a fault flag: decay applied after the delta update FAILs on the
    chunked (T = 37), recurrent (decode, T = 1) and per-channel paths; each chunk starting from
    the initial state (chunked kernel) FAILs the cases longer than one chunk (T = 20 with a 0
    length, T = 21 continuing a carried state) and still passes a one-token decode, which has no
    second chunk. The same kernels without the flag PASS these
    cases (test_cuda_backend certifies them on the whole quick catalog)."""
    res = _faults_check()
    assert res["decay_after_update"] == dict.fromkeys(("prefill_T37_GVA", "decode_state_slots", "kda_per_channel"),
                                                      "FAIL"), res
    assert res["state_not_carried"] == {"varlen": "FAIL", "state_carried_across_calls": "FAIL",
                                        "decode_state_slots": "PASS"}, res
