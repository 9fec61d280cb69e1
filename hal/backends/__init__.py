"""Backends shipped inside the core distribution (only the CPU reference: ``hal.backends.cpu``,
source in the repository's ``backends/cpu/``). Other backends are separate distributions.

In a source checkout (Python started in the clone's root imports the folder hal/), the
repository's backends/ folder joins this package's path, as setup.py maps it when installing."""
import os as _os

_CHECKOUT = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
if _os.path.isfile(_os.path.join(_CHECKOUT, "setup.py")) and \
        _os.path.isfile(_os.path.join(_CHECKOUT, "backends", "cpu", "__init__.py")):
    __path__.append(_os.path.join(_CHECKOUT, "backends"))  # noqa: F821 - the package's own __path__
