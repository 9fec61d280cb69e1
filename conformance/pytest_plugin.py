"""pytest plugin (entry point ``pytest11: hal``): the conformance catalog as parametrized tests.

A backend's own test suite certifies it with one line::

    pytest --hal-backend mybackend [--hal-level quick|full|models] [--hal-seed 0] [--hal-ops a,b]
           [--hal-fallback error|reference]

Each op x case becomes a test item ``hal[<backend>]::<op>/<case>``: PASS passes, FAIL and ERROR
fail with the reason, UNSUPPORTED and SKIPPED skip with the reason, NONDETERMINISTIC fails.
Without ``--hal-backend`` the plugin adds nothing.
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("hal", "HAL conformance")
    group.addoption("--hal-backend", action="store", default=None, metavar="NAME",
                    help="certify this HAL backend with the conformance catalog")
    group.addoption("--hal-level", action="store", default="quick", choices=("quick", "full", "models"),
                    help="catalog level: quick (tiny shapes) or full (real model shapes)")
    group.addoption("--hal-seed", action="store", type=int, default=0, help="seed of the case data")
    group.addoption("--hal-ops", action="store", default=None, metavar="a,b",
                    help="only these contract ops (comma-separated)")
    group.addoption("--hal-fallback", action="store", default="error", choices=("error", "reference"),
                    help="error: ops the backend lacks or declines are skipped as UNSUPPORTED; reference: they "
                    "run the CPU reference (path 'fallback', recorded as a test property)")


class HalCaseItem(pytest.Item):
    def __init__(self, *, case, backend, seed, **kw):
        super().__init__(**kw)
        self.case, self.backend, self.seed = case, backend, seed

    def runtest(self):
        from hal.conformance.runner import BoundBackend, run_case
        from hal.registry import get_registry
        rec = get_registry().record(self.backend)
        if rec.status != "available":
            pytest.skip(f"backend {self.backend} is {rec.status}: {rec.reason}")
        bound = self.config.stash.setdefault(_BOUND, {}).get(self.backend)
        if bound is None:
            bound = BoundBackend(rec, self.config.getoption("--hal-fallback"))
            self.config.stash[_BOUND][self.backend] = bound
        res = run_case(bound, self.case, self.seed)
        self.user_properties.append(("path", res.path))
        if res.status in ("UNSUPPORTED", "SKIPPED"):
            pytest.skip(f"{res.status}: {res.reason}")
        if res.status != "PASS":
            raise HalConformanceFailure(res)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, HalConformanceFailure):
            r = excinfo.value.result
            return f"{r.status} [{r.path}] {r.op}/{r.case} on {r.label}: {r.reason}" + (
                f"\n{r.traceback}" if r.traceback else "")
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return "hal-conformance", None, f"hal[{self.backend}]::{self.case.id}"


class HalConformanceFailure(Exception):
    def __init__(self, result):
        super().__init__(result.reason)
        self.result = result


_BOUND = pytest.StashKey[dict]()


def pytest_collection_modifyitems(session, config, items):
    backend = config.getoption("--hal-backend")
    if not backend:
        return
    import hal
    from hal.conformance.cases import catalog
    from hal.registry import get_registry
    try:
        get_registry().record(backend)          # an unknown name is a usage error, not 100 failing tests
    except hal.BackendUnavailable as exc:
        raise pytest.UsageError(f"--hal-backend: {exc}") from None
    ops = [o.strip() for o in config.getoption("--hal-ops").split(",")] if config.getoption("--hal-ops") else None
    unknown = [o for o in ops or [] if o not in hal.CONTRACT]
    if unknown:
        raise pytest.UsageError(f"--hal-ops: unknown op(s) {', '.join(unknown)} (contract ops: {', '.join(hal.CONTRACT)})")
    cases = catalog(config.getoption("--hal-level"), ops)
    for case in cases:
        items.append(HalCaseItem.from_parent(session, name=f"hal[{backend}]::{case.id}", case=case, backend=backend,
                                             seed=config.getoption("--hal-seed")))
