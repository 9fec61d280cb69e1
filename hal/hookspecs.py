"""The hooks a HAL backend plugin implements (pluggy project name "hal").

A plugin is a module named by an entry point in the ``hal.backends`` group, e.g. in its
pyproject.toml::

    [project.entry-points."hal.backends"]
    mybackend = "hal_mybackend.plugin"

and that module implements both hooks below with ``@hal.hookimpl``. The CPU reference backend
is registered exactly this way (``cpu = "hal.backends.cpu.plugin"``).
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("hal")
hookimpl = pluggy.HookimplMarker("hal")


@hookspec
def hal_contract_version() -> str:
    """The contract version this plugin implements, e.g. ``"1.0"``.

    A plugin whose major version differs from ``hal.CONTRACT_VERSION``'s is listed as
    "incompatible" with that reason and never used. Must be cheap and import nothing heavy."""


@hookspec
def hal_backend():
    """Return the plugin's :class:`hal.Backend` object.

    Constructing it must be cheap and must not touch devices or import vendor libraries: that
    belongs in ``Backend.probe()``, which the registry calls lazily and whose failures it records."""
