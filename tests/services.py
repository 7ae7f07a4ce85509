"""Provision a fresh database for each backend of the conformance matrix.

``provision(backend, tmp_path_factory)`` is a context manager yielding a URL.
The filesystem and SQLite backends need nothing but a temporary directory;
PostgreSQL, MariaDB and the MongoDB-wire server are real servers on
127.0.0.1 (see DESIGN.md, "Tests and checks").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

REQUIRE_SERVICES = os.environ.get("PTUTILS_REQUIRE_SERVICES") == "1"


def unavailable(what: str, why: str):
    """Skip, or fail when PTUTILS_REQUIRE_SERVICES=1, because a server is missing."""
    message = f"{what} is not available: {why}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (PTUTILS_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


@contextlib.contextmanager
def provision(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if backend == "fs":
        yield tmp_path_factory.mktemp("fsdb").as_uri()
    elif backend == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'test.db'}"
    else:
        unavailable(backend, "no provisioning for this backend yet")
        yield ""  # pragma: no cover
