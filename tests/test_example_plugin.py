"""The README's worked plugin example registers, binds and computes what the reference computes."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import hal
from hal.registry import get_registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hal-example-backend"


@pytest.fixture
def example_plugin(monkeypatch, fresh_registry):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    module = importlib.import_module("hal_example_backend.plugin")
    rec = get_registry().register(module, "example")
    yield rec
    sys.modules.pop("hal_example_backend.plugin", None)
    sys.modules.pop("hal_example_backend", None)


def test_example_plugin_matches_reference(example_plugin):
    assert get_registry().record("example").status == "available"   # probed on first look
    with pytest.warns(RuntimeWarning, match="does not implement"):
        rt = hal.runtime("example")
    paths = {e.op: e.path for e in rt.plan()}
    assert paths["fp8_quantize"] == "native" and paths["fp8_gemm"] == "fallback"
    x = torch.randn(6, 300) * 50
    for fmt in ("fp32", "ue8m0"):
        q, s = rt.fp8_quantize(x, scale_format=fmt)
        q_ref, s_ref = hal.ops.fp8_quantize(x, scale_format=fmt)
        assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    with pytest.raises(hal.UnsupportedCase):
        hal.runtime("example", fallback="error")


def test_example_pyproject_declares_entry_point():
    text = (EXAMPLE / "pyproject.toml").read_text()
    assert '[project.entry-points."hal.backends"]' in text and 'example = "hal_example_backend.plugin"' in text


def test_the_example_never_takes_over_auto(example_plugin):
    from hal.binding import resolve
    assert get_registry().record("example").status == "available"
    assert resolve("auto").name != "example"
    assert get_registry().best("cpu").name == "cpu"
