"""Shared fixtures for HAL's own tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def fresh_registry():
    """A clean process-wide registry before and after the test (plugins re-discovered)."""
    from hal.registry import reset_registry
    reset_registry()
    yield
    reset_registry()
