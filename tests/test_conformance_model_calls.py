"""The ``models`` conformance level replays the calls the built-in models make, so an argument the
models pass (q_offset, k_lengths, right padding) cannot escape certification."""
from __future__ import annotations

import pytest
import torch

import hal
from hal.backend import Backend, OpCapability
from hal.conformance.cases import catalog
from hal.conformance.runner import certify
from hal.registry import get_registry


def test_the_models_level_holds_every_models_calls_with_their_real_arguments():
    cases = catalog("models")
    by_model = {}
    for c in cases:
        by_model.setdefault(c.tags[1], set()).add(c.op)
    assert set(by_model) == {"tiny-glm5", "tiny-deepseek-v32", "tiny-glm45", "tiny-qwen35", "tiny-kimi-linear"}
    assert {"moe_forward", "lightning_indexer", "sparse_attention"} <= by_model["tiny-glm5"]
    assert by_model["tiny-qwen35"] == {"moe_forward", "causal_conv1d", "gated_delta_rule"}
    assert by_model["tiny-kimi-linear"] == {"moe_forward", "causal_conv1d", "gated_delta_rule"}
    kda = [c.materialize(0) for c in cases if c.tags[1] == "tiny-kimi-linear" and c.op == "gated_delta_rule"]
    assert all(args[3].dim() == 4 for args, _ in kda)          # KDA: a per-channel log-decay [B, T, H, Dk]
    linear = [c for c in cases if c.tags[1] == "tiny-qwen35" and c.op == "gated_delta_rule"]
    # prefill: right-padded lengths from zero state; decode: one token on the carried state
    assert any(kw["seq_lens"].tolist() == [12, 5] and kw["initial_state"] is None
               for _, kw in (c.materialize(0) for c in linear))
    assert any(kw["initial_state"] is not None and args[0].shape[1] == 1
               for args, kw in (c.materialize(0) for c in linear))
    indexer = [c for c in cases if c.op == "lightning_indexer"]
    def explicit_offset_differs_from_the_default(case):
        (q, _, _), kw = case.materialize(0)
        return kw["q_offset"] is not None and kw["k_lengths"] is not None and \
            not torch.equal(kw["q_offset"].long(), kw["k_lengths"].long() - q.shape[1])
    # right-padded prompts of different lengths: the models pass q_offset, and it matters
    assert any(explicit_offset_differs_from_the_default(c) for c in indexer)
    a, b = indexer[0].materialize(0), indexer[0].materialize(1)              # recorded data: seed-independent
    assert torch.equal(a[0][0], b[0][0])


def test_the_reference_passes_and_an_indexer_ignoring_q_offset_fails():
    run = certify("cpu", level="models")
    assert run.results and all(r.status == "PASS" for r in run.results)
    from hal.backends.cpu import KERNELS

    def no_offset(q, k, weights, *, top_k, causal, q_offset, k_lengths, q_scale, k_scale):
        return KERNELS["lightning_indexer"](q, k, weights, top_k=top_k, causal=causal, q_offset=None,
                                            k_lengths=k_lengths, q_scale=q_scale, k_scale=k_scale)

    get_registry().register_backend(Backend("ignores-q-offset", priority=-50, kernels={"lightning_indexer": no_offset},
                                            capabilities={"lightning_indexer": OpCapability()}))
    try:
        run = certify("ignores-q-offset", level="models", ops=["lightning_indexer"])
        assert any(r.status == "FAIL" for r in run.results), [(r.case, r.status) for r in run.results]
    finally:
        get_registry().unregister("ignores-q-offset")


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="level"):
        catalog("huge")
    assert hal.CONTRACT
