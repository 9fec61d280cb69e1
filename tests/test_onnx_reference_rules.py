"""The onnxruntime models that check the reference independently follow the contract's rules at
the inputs where a looser rule differs: ue8m0 just above powers of two, and group scores without
a correction bias (the group's maximum)."""
from __future__ import annotations

import math

import torch

import hal
from hal.conformance.onnx_check import build_model, run_model


def _ort(op, args, kwargs):
    return run_model(build_model(op, args, kwargs), op, args)


def test_ue8m0_scales_just_above_powers_of_two_match_the_reference():
    rows = []
    for e in range(-22, 100, 3):                              # amax = nextafter(448 * 2^e) in fp32: s just above 2^e
        amax = torch.nextafter(torch.tensor(448.0 * 2.0 ** e), torch.tensor(math.inf))
        row = torch.full((128,), float(amax) / 3)
        row[7] = amax
        rows.append(row)
    x = torch.stack(rows)
    q_ref, s_ref = hal.ops.fp8_quantize(x, scale_format="ue8m0")
    q, s = _ort("fp8_quantize", (x,), dict(group_size=128, scale_format="ue8m0"))
    assert torch.equal(s.reshape(s_ref.shape), s_ref)
    assert torch.equal(s_ref[:, 0], torch.tensor([2.0 ** (e + 1) for e in range(-22, 100, 3)]))
    torch.testing.assert_close(q.reshape(q_ref.shape), q_ref.float(), rtol=0, atol=0)


def test_group_scores_without_a_bias_are_the_group_maximum():
    logits = torch.tensor([[3.0, -9.0, 2.8, 2.8, -9.0, -9.0, -9.0, -9.0]])   # DeepSeek picks [0, 1]
    kwargs = dict(top_k=2, scoring="softmax", correction_bias=None, n_group=4, topk_group=1, renormalize=False,
                  scaling_factor=1.0)
    w_ref, ids_ref = hal.ops.moe_route(logits, **kwargs)
    assert ids_ref.tolist() == [[0, 1]]
    w, ids = _ort("moe_route", (logits,), kwargs)
    assert ids.tolist() == ids_ref.tolist()
    torch.testing.assert_close(w.reshape(w_ref.shape), w_ref)
