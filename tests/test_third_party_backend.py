"""A third-party backend runs the conformance suite that ships with ptutils.

tests/support/memory_backend.py is written the way a separate package would
write a backend.  Here it is installed as a distribution of its own, whose
entry point in the ``ptutils.backends`` group names the ``memory`` scheme, so
that open_db finds it through the registry like any installed backend; then
:class:`TestMemoryBackend` is all its test module needs to run the suite ours run.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptutils import open_db
from ptutils.errors import StorageError
from ptutils.testing.backend_suite import BackendSuite

from .support.memory_backend import MemoryInterface, drop


@contextlib.contextmanager
def memory_backend_installed(site: Path) -> Iterator[None]:
    """Install the memory backend's distribution metadata in ``site`` and put ``site`` on sys.path."""
    dist_info = site / "ptutils_memory_backend-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: ptutils-memory-backend\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[ptutils.backends]\nmemory = tests.support.memory_backend:MemoryInterface\n"
    )
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(site))
        importlib.invalidate_caches()


def test_open_db_finds_the_memory_scheme_only_through_its_entry_point(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no backend for URL scheme 'memory'"):
        open_db("memory://probe")
    with memory_backend_installed(tmp_path), open_db("memory://probe", collection="found") as db:
        assert type(db) is MemoryInterface and db.url == "memory://probe" and db.collection_name == "found"
    with pytest.raises(StorageError, match="no backend for URL scheme 'memory'"):
        open_db("memory://probe")
    drop("probe")


@pytest.fixture(scope="class")
def memory_entry_point(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The memory backend installed while a class of tests runs (no other test sees its scheme)."""
    with memory_backend_installed(tmp_path_factory.mktemp("site")):
        yield


class TestMemoryBackend(BackendSuite):
    """The whole shipped suite on the memory backend, each test on a database of its own."""

    capabilities = BackendSuite.capabilities - {"cross_process"}  # another process cannot see this one's memory

    @pytest.fixture
    def db(self, memory_entry_point: None) -> Iterator[MemoryInterface]:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with open_db(f"memory://{name}") as db:
            assert type(db) is MemoryInterface
            yield db
        drop(name)
