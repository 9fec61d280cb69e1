"""Backends shipped inside the core distribution (only the CPU reference: ``hal.backends.cpu``,
source in the repository's ``backends/cpu/``). Other backends are separate distributions."""
