"""The installed package declares nothing it does not ship."""

from __future__ import annotations

from importlib import metadata


def test_every_entry_point_the_package_declares_loads() -> None:
    # A console script or backend entry point naming a missing module would fail only when a user runs it.
    for entry_point in metadata.distribution("ptutils").entry_points:
        assert entry_point.load() is not None, entry_point
