"""The reference backend's plugin module (entry point ``cpu`` in group ``hal.backends``)."""
from __future__ import annotations

import torch

import hal
from hal.backend import Availability, Backend, OpCapability
from hal.hookspecs import hookimpl

ALL_FLOAT = ("float32", "bfloat16", "float16", "float8_e4m3fn")


class ReferenceBackend(Backend):
    """Runs every contract op on the CPU with the reference kernels (always available)."""

    name = "cpu"
    device_type = "cpu"
    priority = 0

    def probe(self) -> Availability:
        import platform
        return Availability(True, "CPU reference (always available)", device=platform.processor() or platform.machine(),
                            versions={"hal": hal.__version__, "torch": torch.__version__}, label="cpu (reference)")

    def capabilities(self):
        return {op: OpCapability("native", ALL_FLOAT, "reference kernel") for op in self.kernels()}

    def kernels(self):
        from hal.backends.cpu import KERNELS
        return dict(KERNELS)


@hookimpl
def hal_contract_version() -> str:
    return hal.CONTRACT_VERSION


@hookimpl
def hal_backend() -> Backend:
    return ReferenceBackend(version=hal.__version__)
