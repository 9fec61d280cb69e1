"""Maps the repository's top-level folders into the `hal` import namespace.

`hal/` -> `hal`, `models/` -> `hal.models`, `conformance/` -> `hal.conformance`,
`backends/cpu/` -> `hal.backends.cpu` (the CPU reference backend). Nothing else is installed at
the top level of site-packages. Metadata lives in pyproject.toml.
"""
from setuptools import find_packages, setup

ROOTS = {
    "hal": "hal",
    "hal.models": "models",
    "hal.conformance": "conformance",
    "hal.backends.cpu": "backends/cpu",
}

packages, package_dir = [], {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"": ["*.json", "*.md", "*.html", "*.txt"], "hal": ["csrc/*.cpp"]},
    include_package_data=True,
)
