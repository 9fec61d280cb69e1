"""HAL's compiled call-signature check (hal/compiled_check.py, hal/csrc/signature_check.cpp) and
`hal build-checks`. The guard tests need a build (ci/test.sh runs `hal build-checks` first) and
skip, saying why, without one; the status and failure paths run everywhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from hal import compiled_check
from hal.cli import cli


@pytest.fixture(scope="module")
def signature_guard():
    module = compiled_check.load()
    if module is None:
        pytest.skip(f"HAL's compiled check is not active: {compiled_check.status()['reason']}")
    return module.signature_guard


def test_equal_metadata_passes_and_every_difference_fails(signature_guard):
    a, b = torch.empty(2, 3, device="meta"), torch.empty(5, dtype=torch.int64, device="meta")
    check = signature_guard(a, b)
    assert check(torch.empty(2, 3, device="meta"), torch.empty(5, dtype=torch.int64, device="meta"))
    different = [
        (torch.empty(3, 2, device="meta"), b),                       # shape
        (torch.empty(3, 2, device="meta").t(), b),                   # strides
        (torch.empty(2, 3, 1, device="meta"), b),                    # rank
        (a.to(torch.bfloat16), b),                                   # dtype
        (torch.empty(2, 3), b),                                      # device
        (torch.nn.Parameter(a), b),                                  # Python type
        (a.clone().requires_grad_(), b),                             # requires_grad
        (b, a),                                                      # order
        (a,), (a, b, b), (),                                         # count
        (a, None), (a, 5), ([[0.0] * 3] * 2, b),                     # not tensors: False, never an error
    ]
    for i, args in enumerate(different):
        assert check(*args) is False, f"case {i} passed"


def test_the_signature_outlives_its_tensors(signature_guard):
    check = signature_guard(torch.empty(4, 8))          # the tensor is freed right away
    import gc
    gc.collect()
    assert check(torch.empty(4, 8)) and not check(torch.empty(8, 4))


def test_tensors_without_plain_metadata_get_no_guard(signature_guard):
    sparse = torch.eye(3).to_sparse()
    assert signature_guard(torch.empty(2), sparse) is None
    assert signature_guard(torch.empty(2), "not a tensor") is None

    class Sub(torch.Tensor):
        pass
    assert signature_guard(torch.empty(2).as_subclass(Sub)) is None
    assert signature_guard(torch.nn.Parameter(torch.empty(2))) is not None


def _status_in_subprocess(**env) -> dict:
    code = "import json; from hal import compiled_check; print(json.dumps(compiled_check.status()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout)


def test_the_switch_and_a_missing_build_are_reported(tmp_path):
    off = _status_in_subprocess(HAL_COMPILED_CHECK="0")
    assert not off["active"] and "HAL_COMPILED_CHECK=0" in off["reason"]
    empty = _status_in_subprocess(HAL_EXTENSIONS_DIR=str(tmp_path))
    assert not empty["active"] and "hal build-checks" in empty["reason"] and str(tmp_path) in empty["path"]


def test_a_build_that_answers_wrongly_is_not_used():
    class Liar:
        @staticmethod
        def signature_guard(*tensors):
            return lambda *args: True
    assert "accepted another shape" in compiled_check._self_test(Liar)


def test_build_checks_status_json():
    res = CliRunner().invoke(cli, ["build-checks", "--status", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert set(rep) == {"active", "path", "reason"} and rep["active"] == (compiled_check.load() is not None)


def test_a_failed_build_exits_1_naming_the_cause(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: c++: command not found")
    monkeypatch.setenv("HAL_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(compiled_check, "_loaded", {})
    res = CliRunner().invoke(cli, ["build-checks", "--json"])
    assert res.exit_code == 1
    rep = json.loads(res.output)
    assert not rep["active"] and "c++: command not found" in rep["reason"]


def test_a_missing_source_file_means_no_compiled_check_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(compiled_check, "SOURCE", tmp_path / "absent.cpp")
    monkeypatch.setattr(compiled_check, "_loaded", {})
    assert compiled_check.load() is None
    rep = compiled_check.status()
    assert not rep["active"] and "absent.cpp" in rep["reason"] and rep["path"].startswith("unknown")
