"""Shared fixtures: the backend matrix every conformance test runs on.

``db_url`` is parametrised over the backends selected with ``--backends`` or
the ``PTUTILS_BACKENDS`` environment variable (comma separated, default: all of
fs, sqlite, postgres, mariadb, mongo).  Servers are provisioned once per test
run by :mod:`tests.support.services`; a missing server skips its tests, or fails them
when ``PTUTILS_REQUIRE_SERVICES=1`` (as in CI).
"""

from __future__ import annotations

import os
import uuid

import pytest

from ptutils import open_db

from .support import faults as _faults
from .support import services

ALL_BACKENDS = ("fs", "sqlite", "postgres", "mariadb", "mongo")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default=os.environ.get("PTUTILS_BACKENDS", ",".join(ALL_BACKENDS)),
        help="comma-separated backends for the conformance suite (fs,sqlite,postgres,mariadb,mongo)",
    )


def selected_backends(config: pytest.Config) -> list[str]:
    names = [b.strip() for b in config.getoption("--backends").split(",") if b.strip()]
    unknown = sorted(set(names) - set(ALL_BACKENDS))
    if unknown:
        raise pytest.UsageError(f"unknown backends {unknown}; choose from {ALL_BACKENDS}")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", selected_backends(metafunc.config), scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that runs on a backend of the matrix (tox's backend cells select them)."""
    for item in items:
        if "backend" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.backend)


@pytest.fixture(scope="session")
def db_url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A URL of a fresh, empty database on ``backend`` for this test run."""
    with services.provision(backend, tmp_path_factory) as url:
        yield url


@pytest.fixture
def url(tmp_path) -> str:
    """A ``file://`` URL of an empty directory: the filesystem backend a session test runs on."""
    return tmp_path.as_uri()


@pytest.fixture
def db(db_url: str):
    """A DBInterface on a collection of its own (tests never see each other's data)."""
    interface = open_db(db_url, collection=f"t_{uuid.uuid4().hex[:12]}")
    try:
        yield interface
    finally:
        interface.close()


def pytest_configure(config: pytest.Config) -> None:
    _faults.configure(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    _faults.summary(terminalreporter, config)


@pytest.fixture
def faults(request: pytest.FixtureRequest) -> _faults.FaultLog:
    """Record injected faults for the reliability table printed at the end of the run."""
    return _faults.FaultLog(_faults.faults_dir(request.config), request.node.nodeid)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any use of pickle (directly, through torch.load or np.load) fails the test."""
    import pickle

    import numpy as np
    import torch

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was used while decoding or loading")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(np, "load", forbidden)
