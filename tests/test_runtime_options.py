"""Modes are options of a runtime's backend instance; environment variables only give defaults."""
from __future__ import annotations

import warnings

import pytest
import torch

import hal


def test_one_process_holds_an_emulated_and_a_real_ascend_backend(monkeypatch):
    pytest.importorskip("hal_ascend")
    monkeypatch.delenv("HAL_ASCEND_EMULATE", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)        # ops it lacks fall back, recorded in the plan
        emulated = hal.runtime("ascend", options={"emulate": True})
    assert emulated.label == "ascend (emulated torch_npu)"
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    w, ids = emulated.moe_route(logits, top_k=2, correction_bias=torch.rand(8), n_group=4, topk_group=2)
    assert ids.shape == (6, 2) and ids.dtype == torch.int32 and w.dtype == torch.float32
    # the real instance in the same process: its own probe, its own answer (no torch_npu here)
    with pytest.raises(hal.BackendUnavailable, match="torch_npu"):
        hal.runtime("ascend", options={"emulate": False})
    # the listed instance keeps the environment's default
    from hal.registry import get_registry
    assert get_registry().record("ascend").status == "unavailable"


def test_the_emulated_instance_runs_the_emulator_whatever_the_environment_says(monkeypatch):
    pytest.importorskip("hal_ascend")
    from hal_ascend import npu

    def no_real_seam():
        raise AssertionError("the real torch_npu seam was used by the emulated instance")

    monkeypatch.setattr(npu, "_real", no_real_seam)
    monkeypatch.setattr(npu, "_functions", {})
    monkeypatch.setenv("HAL_ASCEND_EMULATE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rt = hal.runtime("ascend", options={"emulate": True})
    w, ids = rt.moe_route(torch.randn(3, 8), top_k=2)
    assert ids.shape == (3, 2) and set(npu._functions) == {True}
    with pytest.raises(AssertionError, match="real torch_npu seam"):       # outside the instance: the env's mode
        npu.functions()


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="takes no options"):
        hal.runtime("cpu", options={"interpret": True})
    pytest.importorskip("hal_ascend")
    with pytest.raises(ValueError, match="'emulate'"):
        hal.runtime("ascend", options={"emulate": True, "soc": "A2"})


def test_checked_mode_is_a_runtime_option():
    rt_on, rt_off = hal.runtime("cpu", checked=True), hal.runtime("cpu", checked=False)
    assert hal.checked_mode() is False or hal.checked_mode() is True          # the process default is untouched
    idx = torch.tensor([[[0, 0]]], dtype=torch.int32)                        # a duplicate index
    q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 2, 1, 4)
    with pytest.raises(hal.ContractError, match="duplicate"):
        rt_on.sparse_attention(q, k, k, idx, scale=1.0)
    rt_off.sparse_attention(q, k, k, idx, scale=1.0)                         # checked mode off: not looked for
