"""SQLInterface on real SQLite, PostgreSQL and MariaDB: emitted SQL, indexes, schema version, blobs, retries.

The SQL backends selected with ``--backends`` (sqlite, postgres, mariadb) each
get a fresh database for this module (see tests/support/services.py).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Self

import numpy as np
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from ptutils import open_db
from ptutils.backends.sql import (
    BLOB_CHUNK,
    INDEXED_FIELDS,
    SCHEMA_VERSION,
    SQLInterface,
    _unescape_text,
    escape_text,
)
from ptutils.backends.sql import dialect as sql_dialect_module
from ptutils.errors import (
    BackendUnavailableError,
    CodecError,
    DocumentTooLargeError,
    QueryError,
    SchemaVersionError,
    StorageError,
)
from ptutils.query import matches, parse_query, parse_sort, sort_docs

from .support import services
from .conftest import selected_backends
from .support.query_cases import check_translation

pytestmark = pytest.mark.backend

SQL_BACKENDS = ("sqlite", "postgres", "mariadb")
SERVER_URLS = {"postgres": services.POSTGRES_URL, "mariadb": services.MARIADB_URL}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``sql_backend``: the selected SQL backends; only the servers for tests marked ``services``."""
    if "sql_backend" in metafunc.fixturenames:
        wanted = SERVER_URLS if metafunc.definition.get_closest_marker("services") else SQL_BACKENDS
        chosen = [b for b in selected_backends(metafunc.config) if b in wanted]
        metafunc.parametrize("sql_backend", chosen, scope="module")


@pytest.fixture(scope="module")
def sql_url(sql_backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with services.provision(sql_backend, tmp_path_factory) as url:
        yield url


@pytest.fixture
def sdb(sql_url: str) -> Iterator[SQLInterface]:
    db = open_db(sql_url, collection=f"t_{uuid.uuid4().hex[:12]}")
    assert isinstance(db, SQLInterface)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
def fresh_url(sql_backend: str, tmp_path) -> Iterator[str]:
    """An empty database of its own (for tests that change the schema)."""
    if sql_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with services.sql_database(sql_backend, SERVER_URLS[sql_backend]) as url:
        yield url


class Recorder:
    """Every statement (and its parameters) an engine sends to the DBAPI driver."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self.calls: list[tuple[str, object]] = []

    def __enter__(self) -> Self:
        sa.event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.calls.append((statement, parameters))

    def on_documents(self) -> list[tuple[str, object]]:
        return [(s, p) for s, p in self.calls if "ptutils_documents" in s]


def flat_params(parameters: object) -> list[str]:
    values = parameters.values() if isinstance(parameters, dict) else parameters or []
    out = []
    for value in values:
        out.extend(str(v) for v in value) if isinstance(value, (list, tuple)) else out.append(str(value))
    return out


# ------------------------------------------------------------------ URLs and drivers
def test_urls_pick_the_expected_drivers_without_connecting() -> None:
    port = services.free_port()
    cases = {
        f"postgresql://u@127.0.0.1:{port}/d": "postgresql+psycopg",
        f"postgres://u@127.0.0.1:{port}/d": "postgresql+psycopg",
        f"postgresql+psycopg://u@127.0.0.1:{port}/d": "postgresql+psycopg",
        f"mysql://u@127.0.0.1:{port}/d": "mysql+pymysql",
        f"mariadb://u@127.0.0.1:{port}/d": "mariadb+pymysql",
        f"mysql+pymysql://u@127.0.0.1:{port}/d": "mysql+pymysql",
    }
    for url, driver in cases.items():
        db = open_db(url, collection="c")
        assert isinstance(db, SQLInterface) and db.engine.url.drivername == driver, url
        assert open_db(db.url, collection="c").engine.url == db.engine.url
        db.close()


def test_password_stays_out_of_repr() -> None:
    db = SQLInterface(f"postgresql://user:s3cret@127.0.0.1:{services.free_port()}/d")
    assert "s3cret" not in repr(db) and "s3cret" in db.url
    db.close()


# ------------------------------------------------------------------ emitted SQL
def test_filter_sort_skip_limit_run_in_the_database_with_bound_values(sdb: SQLInterface) -> None:
    for i in range(30):
        sdb.save({"_id": f"d{i:02}", "step": i, "name": "x'; DROP TABLE y; --" if i % 3 else "plain", "w": [i]})
    query = {"name": "x'; DROP TABLE y; --", "step": {"$gte": 4}, "w": {"$exists": True}}
    with Recorder(sdb.engine) as rec:
        found = sdb.load(query, sort=[("step", -1)], skip=2, limit=5)
        assert sdb.count(query) == 18
    assert [d["_id"] for d in found] == ["d26", "d25", "d23", "d22", "d20"]
    selects = [(s, p) for s, p in rec.on_documents() if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2, rec.calls
    (select, params), (count, _) = selects
    upper = select.upper()
    for clause in ("WHERE", "ORDER BY", "LIMIT"):
        assert clause in upper, f"{clause} missing from {select}"
    assert "OFFSET" in upper or re.search(r"LIMIT \S+, \S+", upper), select  # MariaDB: LIMIT skip, count
    assert "COUNT(" in count.upper() and "WHERE" in count.upper()
    for statement in (select, count):
        assert "DROP TABLE" not in statement and "x'" not in statement and "step" not in statement
    values = flat_params(params)
    assert "x'; DROP TABLE y; --" in values
    assert any("step" in v for v in values), values  # the JSON path is a parameter too


def test_indexed_status_fields_use_their_generated_column(sdb: SQLInterface) -> None:
    for i in range(3):
        sdb.save({"session_id": f"s{i}", "state": "running", "parent_id": None})
    with Recorder(sdb.engine) as rec:
        assert len(sdb.load({"session_id": "s1"})) == 1
        assert sdb.count({"state": {"$in": ["running", "paused"]}}) == 3
    texts = [s for s, _ in rec.on_documents()]
    assert any("session_id" in s for s in texts[:1]) and any("state IN" in s.replace("`", "") for s in texts[1:])


def test_status_queries_are_index_lookups(sdb: SQLInterface) -> None:
    for i in range(400):
        sdb.save({"session_id": f"s{i}", "state": ("running", "complete", "failed", "pending")[i % 4]})
    stmt = sdb.find_statement(parse_query({"session_id": "s7"}), parse_sort(None), None, 0)
    sql = str(stmt.compile(sdb.engine, compile_kwargs={"literal_binds": True}))
    with sdb.engine.connect() as conn:
        if sdb.dialect == "postgresql":
            conn.execute(sa.text("ANALYZE ptutils_documents"))
            conn.execute(sa.text("SET enable_seqscan = off"))
            plan = " ".join(r[0] for r in conn.execute(sa.text("EXPLAIN " + sql)))
        elif sdb.dialect == "mysql":
            plan = " ".join(str(v) for r in conn.execute(sa.text("EXPLAIN " + sql)) for v in r)
        else:
            plan = " ".join(str(r[-1]) for r in conn.execute(sa.text("EXPLAIN QUERY PLAN " + sql)))
    assert "ix_ptutils_documents_session_id" in plan, plan
    assert [d["session_id"] for d in sdb.load({"session_id": "s7"})] == ["s7"]


def test_long_or_non_string_indexed_values_still_match_exactly(sdb: SQLInterface) -> None:
    long_state = "r" * 300
    sdb.save({"_id": "long", "state": long_state})
    sdb.save({"_id": "prefix", "state": long_state[:255]})
    sdb.save({"_id": "number", "state": 3})
    sdb.save({"_id": "flag", "session_id": True})
    assert [d["_id"] for d in sdb.load({"state": long_state})] == ["long"]
    assert [d["_id"] for d in sdb.load({"state": long_state[:255]})] == ["prefix"]
    assert [d["_id"] for d in sdb.load({"state": {"$in": [3, long_state]}})] == ["long", "number"]
    assert [d["_id"] for d in sdb.load({"session_id": True})] == ["flag"]
    assert sdb.count({"session_id": "True"}) == 0


def test_translated_queries_agree_with_the_reference_on_hard_values(sdb: SQLInterface) -> None:
    check_translation(sdb)


# ------------------------------------------------------------------ schema
def test_schema_is_created_with_its_version_and_a_newer_one_is_refused(fresh_url: str) -> None:
    db = open_db(fresh_url, collection="c")
    db.save({"_id": "a", "v": 1})
    inspector = sa.inspect(db.engine)
    assert {"ptutils_documents", "ptutils_blobs", "ptutils_meta"} <= set(inspector.get_table_names())
    assert {c["name"] for c in inspector.get_columns("ptutils_documents")} >= {"collection", "id", "version", "body"}
    assert {ix["name"] for ix in inspector.get_indexes("ptutils_documents")} >= {
        f"ix_ptutils_documents_{f}" for f in INDEXED_FIELDS
    }
    with db.engine.begin() as conn:
        assert conn.execute(sa.text("SELECT value FROM ptutils_meta WHERE name = 'schema_version'")).scalar() == str(
            SCHEMA_VERSION
        )
        conn.execute(sa.text("UPDATE ptutils_meta SET value = :v WHERE name = 'schema_version'"), {"v": "999"})
    db.close()
    newer = open_db(fresh_url, collection="c")
    with pytest.raises(SchemaVersionError, match=rf"schema version 999, newer than version {SCHEMA_VERSION}"):
        newer.load_from_id("a")
    newer.close()
    admin = SQLInterface(fresh_url).engine
    with admin.begin() as conn:
        conn.execute(sa.text("UPDATE ptutils_meta SET value = :v WHERE name = 'schema_version'"), {"v": "1"})
    admin.dispose()
    again = open_db(fresh_url, collection="c")
    assert again.load_from_id("a")["v"] == 1
    again.close()


def test_tables_are_created_once_under_concurrent_first_use(fresh_url: str) -> None:
    errors: list[BaseException] = []

    def first_use(i: int) -> None:
        try:
            with open_db(fresh_url, collection=f"c{i}") as db:
                db.save({"_id": "x", "i": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with open_db(fresh_url, collection="c3") as db:
        assert db.load_from_id("x")["i"] == 3


# ------------------------------------------------------------------ blobs
def test_blob_larger_than_mariadbs_packet_is_chunked(sdb: SQLInterface) -> None:
    payload = np.random.default_rng(5).bytes(20 * 1024 * 1024 + 17)
    blob_id = sdb.put_blob(payload)
    assert sdb.get_blob(blob_id) == payload
    with sdb.engine.connect() as conn:
        sizes = conn.execute(
            sa.text(
                "SELECT chunk, nchunks, size, LENGTH(data) FROM ptutils_blobs "
                "WHERE collection = :c AND blob_id = :b ORDER BY chunk"
            ),
            {"c": sdb.collection_name, "b": blob_id},
        ).all()
    assert len(sizes) >= 5 and all(n == len(sizes) and size == len(payload) for _, n, size, _ in sizes)
    assert max(length for *_, length in sizes) <= BLOB_CHUNK
    assert sum(length for *_, length in sizes) == len(payload)
    sdb.delete_blob(blob_id)
    with sdb.engine.connect() as conn:
        left = conn.execute(sa.text("SELECT COUNT(*) FROM ptutils_blobs WHERE blob_id = :b"), {"b": blob_id})
        assert left.scalar() == 0


def test_readers_never_see_a_half_replaced_blob(sdb: SQLInterface) -> None:
    size = 9 * 1024 * 1024  # three chunks
    sdb.put_blob(b"A" * size, "ckpt")
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for k in range(6):
                sdb.put_blob((b"B" if k % 2 == 0 else b"A") * size, "ckpt")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not stop.is_set():
        data = sdb.get_blob("ckpt")
        seen.append(bytes({data[0], data[-1], data[size // 2]}) + str(len(data)).encode())
    thread.join()
    assert not errors, errors
    assert set(seen) <= {b"A" + str(size).encode(), b"B" + str(size).encode()}, set(seen)


def test_large_documents_are_stored_or_refused_clearly(sdb: SQLInterface) -> None:
    doc = {"_id": "huge", "text": "y" * (20 * 1024 * 1024)}
    if sdb.dialect == "mysql":
        with pytest.raises(DocumentTooLargeError, match="max_allowed_packet"):
            sdb.save(doc)
        assert not sdb.exists("huge")
    else:
        sdb.save(doc)
        assert sdb.load_from_id("huge")["text"] == doc["text"]


# ------------------------------------------------------------------ injection
SQL_METACHARACTERS = [
    "x'); DELETE FROM ptutils_documents; --",
    '"; DROP TABLE ptutils_blobs; --',
    "\\'; --",
    "%' OR '1'='1",
    "' UNION SELECT body FROM ptutils_documents --",
    "\x1a\x08\r",
    "@[0]$",
    'q"$x',
    "`id`",
    "));--",
]


def table_counts(db: SQLInterface) -> dict[str, int]:
    with db.engine.connect() as conn:
        return {
            t: conn.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar()
            for t in ("ptutils_documents", "ptutils_blobs", "ptutils_meta")
        }


def test_sql_metacharacters_and_operator_documents_change_nothing_and_leak_nothing(sdb: SQLInterface) -> None:
    other = sdb.collection(f"{sdb.collection_name}_secret")
    other.save({"_id": "secret", "token": "hunter2", "collection": sdb.collection_name})
    body = {text: text for text in SQL_METACHARACTERS}
    sdb.save({"_id": "target", **body, "nested": dict(body)})
    sdb.save({"_id": "decoy", "v": 1})
    before = table_counts(sdb)
    with Recorder(sdb.engine) as rec:
        for text in SQL_METACHARACTERS:
            assert [d["_id"] for d in sdb.load({text: text})] == ["target"], text
            assert [d["_id"] for d in sdb.load({f"nested.{text}": {"$in": [text, "z"]}})] == ["target"], text
            assert sdb.count({text: {"$ne": text}}) == 1, text
            assert [d["_id"] for d in sdb.load({"v": {"$exists": True}}, sort=[(text, -1)])] == ["decoy"]
            assert sdb.delete({text: {"$gt": text}}) == 0
            assert sdb.load({"_id": text}) == [] and [d["_id"] for d in sdb.load({"_id": {"$ne": text}, "v": 1})] == [
                "decoy"
            ]
        # Column names and other collections are not reachable through document paths.
        for key in ("collection", "id", "version", "body", "fixups", "token", "_id"):
            assert sdb.load({key: {"$in": [sdb.collection_name, other.collection_name, "secret", "hunter2"]}}) == []
        assert sdb.count({"session_id": {"$exists": False}}) == 2
    for statement, _ in rec.calls:
        for text in SQL_METACHARACTERS + ["hunter2", "secret"]:
            assert text not in statement, (text, statement)
    with pytest.raises(QueryError):
        sdb.load({"v": {"$in": [{"$ne": None}]}})
    with pytest.raises(QueryError):
        sdb.load({"$where": "1 = 1"})
    with pytest.raises(CodecError):
        sdb.update("target", {"$set": {"nested": {"$gt": ""}}})
    with pytest.raises(QueryError):
        sdb.update("target", {"$set": {"$where": 1}})
    assert table_counts(sdb) == before
    assert sdb.load_from_id("target")["nested"] == body
    assert other.load_from_id("secret")["token"] == "hunter2" and other.count() == 1


# ------------------------------------------------------------------ transient failures
def _backend_pid(conn: sa.Connection, dialect: str) -> int:
    """The server-side id of a connection (without running a statement on it)."""
    dbapi = conn.connection.dbapi_connection
    return int(dbapi.info.backend_pid if dialect == "postgresql" else dbapi.thread_id())


def _kill(admin: sa.Engine, dialect: str, pid: int) -> None:
    with admin.connect() as conn:
        if dialect == "postgresql":
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        else:
            conn.execute(sa.text(f"KILL CONNECTION {int(pid)}"))
        conn.commit()


def _save_then_kill_its_pooled_connection(db: SQLInterface) -> None:
    """Save document ``a``, then have the server kill the connection that went back to the pool."""
    db.save({"_id": "a", "n": 1})
    with db.engine.connect() as conn:
        pid = _backend_pid(conn, db.dialect)
    admin = SQLInterface(db.url).engine
    _kill(admin, db.dialect, pid)
    admin.dispose()


@pytest.mark.services
def test_killed_idle_connections_are_replaced_by_pre_ping(
    sdb: SQLInterface, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = sdb
    _save_then_kill_its_pooled_connection(db)
    monkeypatch.setattr(sql_dialect_module, "PING_AFTER_IDLE_S", 0.0)  # the connection counts as idle
    with caplog.at_level(logging.WARNING, logger="ptutils"):
        assert db.load_from_id("a")["n"] == 1
    assert not any("transient failure" in r.getMessage() for r in caplog.records), caplog.text  # the ping caught it


@pytest.mark.services
def test_killed_busy_connections_are_retried_without_a_ping(sdb: SQLInterface, monkeypatch: pytest.MonkeyPatch) -> None:
    db = sdb
    _save_then_kill_its_pooled_connection(db)
    monkeypatch.setattr(sql_dialect_module, "PING_AFTER_IDLE_S", 3600.0)  # just used: no ping
    assert db.load({"n": 1})[0]["_id"] == "a"
    db.save({"_id": "b", "n": 2})
    assert db.count() == 2


def test_one_statement_reads_send_no_begin_or_commit(sdb: SQLInterface) -> None:
    sdb.save({"_id": "a", "session_id": "s1", "n": 1})
    commits: list[object] = []
    on_commit = commits.append
    sa.event.listen(sdb.engine, "commit", on_commit)
    try:
        with Recorder(sdb.engine) as rec:
            assert [d["_id"] for d in sdb.load({"session_id": "s1"})] == ["a"]
            assert [d["_id"] for d in sdb.load({"n": {"$gte": 1}}, sort="n", limit=1)] == ["a"]
            assert sdb.count({"n": 1}) == 1
            assert sdb.load_from_id("a")["n"] == 1
    finally:
        sa.event.remove(sdb.engine, "commit", on_commit)
    assert not commits
    assert [s.split()[0].upper() for s, _ in rec.calls] == ["SELECT"] * 4, rec.calls


@pytest.mark.services
def test_connection_killed_mid_query_is_retried(sdb: SQLInterface, caplog: pytest.LogCaptureFixture) -> None:
    db = sdb
    db.save({"_id": "a", "n": 1})
    admin = SQLInterface(db.url).engine
    killed: list[int] = []

    def kill_first_select(conn, cursor, statement, parameters, context, executemany) -> None:
        if not killed and statement.lstrip().upper().startswith("SELECT") and "ptutils_documents" in statement:
            killed.append(_backend_pid(conn, db.dialect))
            _kill(admin, db.dialect, killed[0])

    sa.event.listen(db.engine, "before_cursor_execute", kill_first_select)
    try:
        with caplog.at_level(logging.WARNING, logger="ptutils"):
            assert [d["n"] for d in db.load({"n": 1})] == [1]
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", kill_first_select)
        admin.dispose()
    assert killed, "the test did not kill any connection"
    assert any("transient failure" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.services
def test_connection_killed_at_commit_is_reported_not_retried(sdb: SQLInterface) -> None:
    db = sdb
    db.save({"_id": "c", "n": 0})
    admin = SQLInterface(db.url).engine
    killed: list[int] = []

    def kill_before_commit(conn) -> None:
        if not killed:
            killed.append(_backend_pid(conn, db.dialect))
            _kill(admin, db.dialect, killed[0])

    sa.event.listen(db.engine, "commit", kill_before_commit)
    try:
        with pytest.raises(BackendUnavailableError, match="may or may not have been applied"):
            db.update("c", {"$inc": {"n": 1}})
    finally:
        sa.event.remove(db.engine, "commit", kill_before_commit)
        admin.dispose()
    final = db.load_from_id("c")
    assert final["n"] in (0, 1) and final["_version"] == 1 + final["n"]  # never applied twice


@pytest.mark.parametrize("scheme", ["postgresql", "mysql+pymysql"])
def test_unreachable_server_raises_backend_unavailable_after_retries(scheme: str) -> None:
    db = SQLInterface(f"{scheme}://u@127.0.0.1:{services.free_port()}/d", retries=2, retry_backoff=0.01)
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="cannot set up the ptutils tables"):
        db.count()
    with pytest.raises(BackendUnavailableError):
        db.ping()
    assert time.monotonic() - started < 30
    db.close()


def test_busy_sqlite_file_is_retried_with_backoff(tmp_path) -> None:
    path = tmp_path / "busy.db"
    url = f"sqlite:///{path}"
    with open_db(url, collection="c") as db:
        db.save({"_id": "a"})
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    quick = SQLInterface(url, "c", retries=1, retry_backoff=0.01, engine_options={"connect_args": {"timeout": 0.05}})
    with pytest.raises(BackendUnavailableError, match="locked"):
        quick.save({"_id": "b"})
    patient = SQLInterface(url, "c", retries=6, retry_backoff=0.05, engine_options={"connect_args": {"timeout": 0.05}})
    releaser = threading.Timer(0.3, blocker.execute, args=("ROLLBACK",))
    releaser.start()
    patient.save({"_id": "b"})
    releaser.join()
    blocker.close()
    assert sorted(d["_id"] for d in patient.load()) == ["a", "b"]
    quick.close()
    patient.close()


def test_lone_surrogates_are_refused_as_codec_errors(sdb: SQLInterface) -> None:
    with pytest.raises(CodecError, match="lone surrogate"):
        sdb.save({"_id": "s", "text": "a\ud800b", "w": np.zeros(20_000)})
    with pytest.raises(CodecError, match="lone surrogate"):
        sdb.load({"text": "a\ud800b"})
    assert sdb.count() == 0 and not sdb.exists("s")
    with sdb.engine.connect() as conn:
        blobs = conn.execute(
            sa.text("SELECT COUNT(*) FROM ptutils_blobs WHERE collection = :c"), {"c": sdb.collection_name}
        )
        assert blobs.scalar() == 0  # the array written before the document was removed again


@given(st.text(alphabet="\x00\x01\x02a\uffff", max_size=6), st.text(alphabet="\x00\x01\x02a\uffff", max_size=6))
def test_text_escape_is_reversible_and_keeps_code_point_order(a: str, b: str) -> None:
    ea, eb = escape_text(a), escape_text(b)
    assert "\x00" not in ea and _unescape_text(ea) == a
    assert (ea < eb) == (a < b) and (ea == eb) == (a == b)


def test_strings_with_nul_and_control_characters_compare_whole(sdb: SQLInterface) -> None:
    values = {"nul": "a\x00b", "one": "a\x01", "both": "\x01\x00", "plain": "a", "esc": "a\x01\x02", "lit": "a\\u0000"}
    for doc_id, value in values.items():
        sdb.save({"_id": doc_id, "s": value, "state": value})
    docs = [{"_id": k, "_version": 1, "s": v, "state": v} for k, v in sorted(values.items())]
    for value in [*values.values(), "a\x00", "a\x00c", "\x00", "\x01"]:
        for query in ({"s": value}, {"state": value}, {"s": {"$gt": value}}, {"s": {"$lte": value}}, {"_id": value}):
            assert [d["_id"] for d in sdb.load(query)] == [d["_id"] for d in docs if matches(query, d)], query
    assert [d["_id"] for d in sdb.load(sort=[("s", 1)])] == [d["_id"] for d in sort_docs(list(docs), [("s", 1)])]
    assert {d["_id"]: d["s"] for d in sdb.load()} == values


@pytest.mark.parametrize("url", ["sqlite://tmp/x.db", "sqlite://host/x.db"])
def test_a_malformed_sqlite_url_is_a_storage_error_that_shows_valid_forms(url):
    with pytest.raises(StorageError, match=r"invalid database URL 'sqlite://.*sqlite:///relative/path/to/file\.db"):
        open_db(url)


@pytest.mark.parametrize(("url", "extra"), [
    ("postgresql://postgres:secret@127.0.0.1/test", "ptutils[postgres]"),
    ("mysql+pymysql://root@127.0.0.1/test", "ptutils[mysql]"),
])
def test_a_missing_driver_names_the_url_and_what_to_install(url, extra):
    # A fresh interpreter in which the driver cannot be imported, as on a machine without it.
    code = (
        "import sys\n"
        "sys.modules['psycopg'] = sys.modules['pymysql'] = None\n"
        "from ptutils import open_db\n"
        "from ptutils.errors import StorageError\n"
        f"try:\n    open_db({url!r})\n"
        "except StorageError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"pip install '{extra}'" in out and "is not installed" in out
    assert "secret" not in out and "127.0.0.1/test" in out


def test_an_unknown_sqlalchemy_driver_is_named():
    with pytest.raises(StorageError, match="no such SQLAlchemy driver 'mysql\\+nodriver'"):
        open_db("mysql+nodriver://root@127.0.0.1/test")
