"""The plugin registry: discovery through entry points, isolation of broken plugins, versions."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

import hal
from hal.registry import get_registry

PLUGINS = {
    # entry point name -> module source
    "brokenplug": "raise ImportError('deliberately broken plugin: missing libfoo.so')\n",
    "incompatplug": textwrap.dedent("""
        import hal
        @hal.hookimpl
        def hal_contract_version():
            return "2.0"
        @hal.hookimpl
        def hal_backend():
            raise AssertionError("an incompatible plugin's backend must never be constructed")
    """),
    "unavailplug": textwrap.dedent("""
        import hal
        class B(hal.Backend):
            name = "unavailplug"
            device_type = "xpu"
            def probe(self):
                return hal.Availability(False, "no XPU device visible (driver not loaded)")
        @hal.hookimpl
        def hal_contract_version():
            return "1.0"
        @hal.hookimpl
        def hal_backend():
            return B()
    """),
    "probeboom": textwrap.dedent("""
        import hal
        class B(hal.Backend):
            name = "probeboom"
            def probe(self):
                raise RuntimeError("driver crashed while probing")
        @hal.hookimpl
        def hal_contract_version():
            return "1.3"
        @hal.hookimpl
        def hal_backend():
            return B()
    """),
    "goodplug": textwrap.dedent("""
        import hal
        from hal.backends.cpu import KERNELS
        def fp8_quantize(x, *, group_size, scale_format):
            return KERNELS["fp8_quantize"](x, group_size=group_size, scale_format=scale_format)
        class B(hal.Backend):
            name = "goodplug"
            priority = 5
            def probe(self):
                return hal.Availability(True, "test plugin", device="cpu", label="goodplug (test)")
            def capabilities(self):
                return {"fp8_quantize": hal.OpCapability("native", ("float32",), "test kernel")}
            def kernels(self):
                return {"fp8_quantize": fp8_quantize}
        @hal.hookimpl
        def hal_contract_version():
            return "1.0"
        @hal.hookimpl
        def hal_backend():
            return B()
    """),
}


@pytest.fixture
def test_plugins(tmp_path, monkeypatch, fresh_registry):
    """Install the plugins above through a real .dist-info entry_points.txt on sys.path."""
    for name, src in PLUGINS.items():
        (tmp_path / f"hal_test_{name}.py").write_text(src)
    dist = tmp_path / "hal_test_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hal-test-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[hal.backends]\n" + "".join(f"{n} = hal_test_{n}\n" for n in PLUGINS))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in PLUGINS:
        sys.modules.pop(f"hal_test_{name}", None)


def test_statuses_and_reasons(test_plugins):
    recs = {r.name: r for r in hal.list_backends()}
    assert recs["cpu"].status == "available"
    assert recs["brokenplug"].status == "broken"
    assert "deliberately broken plugin: missing libfoo.so" in recs["brokenplug"].reason
    assert "ImportError" in recs["brokenplug"].traceback          # "don't hide me": the traceback is kept
    assert recs["incompatplug"].status == "incompatible"
    assert "2.0" in recs["incompatplug"].reason and hal.CONTRACT_VERSION in recs["incompatplug"].reason
    assert recs["unavailplug"].status == "unavailable"
    assert recs["unavailplug"].reason == "no XPU device visible (driver not loaded)"
    assert recs["probeboom"].status == "broken" and "driver crashed while probing" in recs["probeboom"].reason
    assert recs["goodplug"].status == "available" and recs["goodplug"].label == "goodplug (test)"
    assert recs["goodplug"].distribution == "hal-test-plugins"


def test_reference_still_works_next_to_broken_plugins(test_plugins):
    import torch
    rt = hal.runtime("cpu")
    q, s = rt.fp8_quantize(torch.tensor([[448.0, -224.0]]))
    assert s.item() == 1.0 and q.float().tolist() == [[448.0, -224.0]]


@pytest.mark.parametrize("name,status,fragment", [
    ("brokenplug", "broken", "missing libfoo.so"),
    ("incompatplug", "incompatible", "implements HAL contract 2.0"),
    ("unavailplug", "unavailable", "no XPU device visible"),
    ("probeboom", "broken", "driver crashed"),
    ("nosuchbackend", "unknown", "no backend plugin of that name"),
])
def test_naming_a_bad_backend_raises_with_reason(test_plugins, name, status, fragment):
    with pytest.raises(hal.BackendUnavailable) as exc:
        hal.runtime(name)
    assert exc.value.status == status and fragment in str(exc.value)


def test_hal_backends_env_restricts_loading(test_plugins, monkeypatch):
    monkeypatch.setenv("HAL_BACKENDS", "cpu,goodplug")
    assert sorted(r.name for r in hal.list_backends()) == ["cpu", "goodplug"]
    assert "hal_test_brokenplug" not in sys.modules
    with pytest.raises(hal.BackendUnavailable, match="HAL_BACKENDS"):
        hal.runtime("unavailplug")


def test_auto_picks_highest_priority_available(test_plugins, monkeypatch):
    monkeypatch.delenv("HAL_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="does not implement"):
        rt = hal.runtime("auto")
    assert rt.backend_name == "goodplug"
    monkeypatch.setenv("HAL_BACKEND", "cpu")
    assert hal.runtime().backend_name == "cpu"


def test_import_hal_loads_no_plugin():
    code = ("import sys, hal; "
            "loaded = [m for m in sys.modules if m.startswith(('hal.backends.cpu', 'hal_cuda', 'hal_ascend', "
            "'torch_npu', 'triton'))]; print(loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_register_backend_programmatically(fresh_registry):
    reg = get_registry()
    rec = reg.register_backend(hal.Backend("inproc", kernels={}, capabilities={}))
    assert rec.name == "inproc"
    assert reg.record("inproc").status == "available"
    reg.unregister("inproc")
    with pytest.raises(hal.BackendUnavailable, match="unknown"):
        reg.record("inproc")


def test_hook_returning_wrong_type_is_broken(fresh_registry):
    class Plugin:
        @hal.hookimpl
        def hal_contract_version(self):
            return "1.0"

        @hal.hookimpl
        def hal_backend(self):
            return object()

    rec = get_registry().register(Plugin(), "wrongtype")
    assert rec.status == "broken" and "expected a hal.Backend" in rec.reason
