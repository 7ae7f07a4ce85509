"""Provision a fresh database for each backend of the conformance matrix.

``provision(backend, tmp_path_factory)`` is a context manager yielding a URL.
The filesystem and SQLite backends need nothing but a temporary directory;
PostgreSQL, MariaDB and the MongoDB-wire server are real servers on
127.0.0.1 (see DESIGN.md, "Tests and checks"):

* PostgreSQL (``PTUTILS_POSTGRES_URL``, default
  ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``) and MariaDB
  (``PTUTILS_MARIADB_URL``, default ``mysql+pymysql://root@127.0.0.1:3306/test``):
  each test run creates its own database ``ptutils_test_<random>`` on that
  server and drops it afterwards (if the account may not create databases, the
  URL's own database is used; every test still gets its own collection).
* MongoDB: ``PTUTILS_MONGO_URL`` (``mongodb://host:port``) points at a running
  server, where the run uses its own database, dropped afterwards; otherwise a
  ``secantusdb`` server (``python -m secantus``) is started on a free port with a
  temporary storage path and stopped afterwards.

A missing server skips its tests, or fails them with PTUTILS_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_SERVICES = os.environ.get("PTUTILS_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get("PTUTILS_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MARIADB_URL = os.environ.get("PTUTILS_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
MONGO_URL = os.environ.get("PTUTILS_MONGO_URL")


def unavailable(what: str, why: str):
    """Skip, or fail when PTUTILS_REQUIRE_SERVICES=1, because a server is missing."""
    message = f"{what} is not available: {why}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (PTUTILS_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def sql_database(backend: str, server_url: str) -> Iterator[str]:
    """A fresh database on the SQL server at ``server_url``, dropped afterwards; yields its URL."""
    import sqlalchemy as sa

    from ptutils.backends.sql import normalise_url

    base = normalise_url(server_url)
    name = f"ptutils_test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            quoted = engine.dialect.identifier_preparer.quote(name)
            try:
                extra = " CHARACTER SET utf8mb4" if backend == "mariadb" else ""
                conn.execute(sa.text(f"CREATE DATABASE {quoted}{extra}"))
                created = True
            except sa.exc.ProgrammingError:
                created = False
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        unavailable(backend, f"cannot connect to {base.render_as_string(hide_password=True)}: {exc.orig}")
    url = base.set(database=name) if created else base
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        if created:
            with engine.connect() as conn:
                force = " WITH (FORCE)" if backend == "postgres" else ""
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quoted}{force}"))
        engine.dispose()


class SecantusServer:
    """A ``secantusdb`` MongoDB-wire server in a child process (started, stopped, restarted on one port)."""

    def __init__(self, storage: Path, port: int | None = None):
        self.storage = Path(storage)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.storage.parent / f"{self.storage.name}.log"

    @staticmethod
    def installed() -> bool:
        return importlib.util.find_spec("secantus") is not None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until it answers a ping; raises RuntimeError otherwise."""
        import pymongo

        self.storage.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "secantus", "--port", str(self.port), "--storage-path", str(self.storage)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"secantus exited with {self.process.returncode}: {self.log_tail()}")
            client = pymongo.MongoClient(self.url, serverSelectionTimeoutMS=500, connectTimeoutMS=500)
            try:
                client.admin.command("ping")
                return
            except pymongo.errors.PyMongoError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"secantus did not answer within {timeout}s: {self.log_tail()}") from None
                time.sleep(0.2)
            finally:
                client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL (``mongodb://host:port``) of PTUTILS_MONGO_URL's server, or of a fresh secantus server."""
    if MONGO_URL:
        yield MONGO_URL.rstrip("/")
        return
    if not SecantusServer.installed():
        unavailable("mongo", "the secantusdb package is not installed and PTUTILS_MONGO_URL is not set")
    server = SecantusServer(tmp_path_factory.mktemp("secantus") / "data")
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        unavailable("mongo", f"cannot start a secantus server: {exc}")
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def mongo_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL ``mongodb://host:port/ptutils_test_<random>`` whose database is dropped afterwards."""
    import pymongo

    with mongo_server(tmp_path_factory) as server_url:
        name = f"ptutils_test_{uuid.uuid4().hex[:12]}"
        client = pymongo.MongoClient(server_url, serverSelectionTimeoutMS=5000)
        try:
            client.admin.command("ping")
        except pymongo.errors.PyMongoError as exc:
            client.close()
            unavailable("mongo", f"cannot reach {server_url}: {exc}")
        try:
            yield f"{server_url}/{name}"
        finally:
            try:
                client.drop_database(name)
            finally:
                client.close()


@contextlib.contextmanager
def provision(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if backend == "fs":
        yield tmp_path_factory.mktemp("fsdb").as_uri()
    elif backend == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'test.db'}"
    elif backend == "postgres":
        with sql_database(backend, POSTGRES_URL) as url:
            yield url
    elif backend == "mariadb":
        with sql_database(backend, MARIADB_URL) as url:
            yield url
    elif backend == "mongo":
        with mongo_database(tmp_path_factory) as url:
            yield url
    else:
        unavailable(backend, "no provisioning for this backend")
        yield ""  # pragma: no cover
