"""Suite-wide: which tests run on the compiled build (``make compile``)."""

from __future__ import annotations

import pytest

from edge import compiled


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "patches_compiled: patches a class that mypyc compiles; runs on the Python sources only "
        "(make test runs them with EDGE_PURE=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Compiled classes take no patches: such tests run in the EDGE_PURE=1 session
    instead, so they are deselected here (not skipped: nothing is hidden)."""
    if compiled.state != "compiled":
        return
    patching = [item for item in items if item.get_closest_marker("patches_compiled")]
    if patching:
        config.hook.pytest_deselected(items=patching)
        items[:] = [item for item in items if not item.get_closest_marker("patches_compiled")]
