"""What a backend is: a name, a device type, a probe, a capability table and a dict of kernels.

A backend plugin module implements the ``hal_backend`` hook (see :mod:`hal.hookspecs`) and
returns one :class:`Backend`. Kernels take exactly the arguments of the contract op (see
``hal ops``), already validated by the contract, and return what the op returns. A backend that
lacks an op simply does not list it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

Path = str  # "native" | "emulated"
PATHS = ("native", "emulated")


@dataclasses.dataclass(frozen=True)
class Availability:
    """The answer of a backend's probe.

    ``available``: whether ops can run now. ``reason``: one human sentence (why not, or what it
    runs on, e.g. "cuda (Triton interpreter, no GPU)"). ``device``: the device description.
    ``versions``: library name -> version string (torch, triton, torch_npu, CANN, CUDA, ...).
    ``label``: the run label every plan and report carries for this backend (defaults to the
    backend name; emulated backends say so, e.g. "ascend (emulated torch_npu)").
    """

    available: bool
    reason: str
    device: str = ""
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    label: str = ""


@dataclasses.dataclass(frozen=True)
class OpCapability:
    """How a backend runs one contract op.

    ``path``: "native" (the op runs on the device's own units in the contract's formats) or
    "emulated" (it runs on the device through a declared substitute, e.g. FP8 weights dequantized
    to bf16 on a chip without an FP8 matrix unit); ``note`` says which.
    ``dtypes``: the input dtypes it accepts natively (informational; shown by ``hal backends``).
    ``supports``: optional ``(**op_args) -> None | reason``: called per call with the op's bound
    arguments; a reason string means this backend does not run this case (the runtime then
    applies its fallback policy and records it). Keep it cheap: no host syncs.
    """

    path: Path = "native"
    dtypes: tuple[str, ...] = ()
    note: str = ""
    supports: Optional[Callable[..., Optional[str]]] = None

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"OpCapability.path must be one of {PATHS}, got {self.path!r}")


def distribution_version(name: str) -> str:
    """The installed version of distribution ``name`` ("0" when it is not installed as one, e.g.
    a plugin module on sys.path) -- what a backend reports as its ``version``."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "0"


class Backend:
    """Base class for a HAL backend. Subclass it (or build one with keyword arguments).

    Attributes: ``name`` (the name users type, e.g. "cuda"), ``device_type`` (the torch device
    type its kernels take tensors on: "cpu", "cuda", "npu"; an emulated backend says "cpu"),
    ``priority`` (higher wins for ``backend="auto"``), ``version``.
    Methods to provide: :meth:`probe`, :meth:`capabilities`, :meth:`kernels`; optionally
    :meth:`benchmarks` for ``hal bench``.
    """

    name: str = ""
    device_type: str = "cpu"
    priority: int = 0
    version: str = "0"

    def __init__(self, name: str | None = None, *, device_type: str | None = None,
                 priority: int | None = None, version: str | None = None,
                 probe: Callable[[], Availability] | None = None,
                 capabilities: Mapping[str, OpCapability] | Callable[[], Mapping[str, OpCapability]] | None = None,
                 kernels: Mapping[str, Callable[..., Any]] | Callable[[], Mapping[str, Callable[..., Any]]] | None = None):
        if name is not None:
            self.name = name
        if device_type is not None:
            self.device_type = device_type
        if priority is not None:
            self.priority = priority
        if version is not None:
            self.version = version
        self._probe_fn, self._caps, self._kernels = probe, capabilities, kernels

    def probe(self) -> Availability:
        """Whether this backend can run now, and why (cheap; called once and cached)."""
        if self._probe_fn is not None:
            return self._probe_fn()
        return Availability(True, f"{self.name} is available")

    def capabilities(self) -> Mapping[str, OpCapability]:
        """op name -> :class:`OpCapability` for every op this backend runs (absent ops unlisted).

        Only called after :meth:`probe` reported the backend available, so it may read the device.
        """
        caps = self._caps() if callable(self._caps) else self._caps
        if caps is None:
            return {op: OpCapability() for op in self.kernels()}
        return caps

    def kernels(self) -> Mapping[str, Callable[..., Any]]:
        """op name -> kernel. Called once per runtime, after :meth:`probe` said available."""
        k = self._kernels() if callable(self._kernels) else self._kernels
        return dict(k or {})

    def with_options(self, **options) -> "Backend":
        """Optional: a new instance of this backend with per-instance options (what
        ``hal.runtime(name, options={...})`` binds), e.g. hal-ascend's ``emulate``. Environment
        variables only give the defaults, so one process can hold differently configured
        instances. The default takes no option."""
        if options:
            raise TypeError(f"backend {self.name!r} takes no options (got {', '.join(sorted(options))})")
        return self

    def prepare_weights(self, op: str, weights: dict) -> dict:
        """Optional: lay out ``op``'s weights once, at load (called through
        ``Runtime.prepare_weights``, which models call after loading). ``weights`` maps the op's
        parameter names (e.g. ``w_gate_up``, ``w_down``, ``w_gate_up_scale``) to tensors in the
        contract's layout; return the same names mapped to tensors equal in shape, dtype, device
        and value (only strides or storage format may differ: a transposed storage viewed back to
        the contract's shape, an NPU format). The default returns them unchanged."""
        return weights

    def benchmarks(self) -> list:
        """Optional: benchmarks for ``hal bench --backend NAME`` (see :mod:`hal.bench`)."""
        return []

    def __repr__(self) -> str:
        return f"<hal Backend {self.name!r} device_type={self.device_type!r}>"
