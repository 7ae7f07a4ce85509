"""SQLInterface: documents and blobs in SQLite, PostgreSQL or MariaDB/MySQL (SQLAlchemy 2 Core).

The URL picks the :class:`~ptutils.backends.sql.dialect.Dialect` (see
:func:`normalise_url`); everything here is shared by the dialects and asks the
dialect wherever they differ.

Every operation is one transaction: updates read the row with ``SELECT ... FOR
UPDATE`` (``BEGIN IMMEDIATE`` on SQLite), apply :func:`ptutils.query.apply_update`
and write it back.  Reads made of one SELECT (``load``, ``count``,
``load_from_ids``) are atomic by themselves and run without BEGIN/COMMIT round
trips.  A pooled connection idle for more than
:data:`~ptutils.backends.sql.dialect.PING_AFTER_IDLE_S` is pinged before use and
replaced if the server dropped it; transient failures (disconnects, deadlocks, a
busy SQLite file) are retried with exponential backoff, and
:class:`BackendUnavailableError` is raised after the last retry.  A failure while
committing a write is never retried (its outcome is unknown) and is reported as
BackendUnavailableError saying so.  Blobs are written in chunks, all in one
transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa

from ptutils.codec import Untagged, untagged_json
from ptutils.database import DEFAULT_COLLECTION, DBInterface
from ptutils.errors import (
    BackendUnavailableError,
    CodecError,
    CorruptionError,
    DocumentTooLargeError,
    NotFoundError,
    StorageError,
)
from ptutils.query import And, Compare, Node, Path, Update, apply_update, project

from .dialect import Dialect
from .mysql import MySQL
from .postgresql import PostgreSQL
from .render import indexed_column, render_filter, render_order
from .schema import Schema
from .sqlite import SQLite

log = logging.getLogger("ptutils")

BLOB_CHUNK = 4 * 1024 * 1024
_IN_BATCH = 500
_T = TypeVar("_T")

_DIALECTS: dict[str, type[Dialect]] = {b: d for d in (SQLite, PostgreSQL, MySQL) for b in d.backends}
"""The dialect of each URL backend name."""


def normalise_url(url: str | sa.URL) -> sa.URL:
    """``url`` with its dialect's defaults (driver, charset); a URL no dialect handles raises StorageError."""
    parsed = sa.make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    dialect = _DIALECTS.get(backend.lower())
    if dialect is None:
        raise StorageError(f"SQLInterface does not handle {parsed.drivername!r} URLs")
    return dialect.normalise_url(parsed, backend.lower(), driver)


def _dump_body(body: dict, dialect: str) -> tuple[str, str | None]:
    """JSON text of a stored body as dialect ``dialect`` (``SQLInterface.dialect``) writes it, and its fixups."""
    return _DIALECTS[dialect].text.dump(body)


class _RetryOperation(Exception):
    """Raised inside a transaction to run the whole operation again (a lost insert race)."""


class _Shared:
    """What an interface shares with its sibling collections: engine, dialect, schema, settings."""

    def __init__(self, url: sa.URL, retries: int, retry_backoff: float, chunk: int | None, engine_options: dict):
        self.url = url
        self.dialect = _DIALECTS[url.get_backend_name().lower()]()
        self.schema = Schema(self.dialect)
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.chunk = chunk or BLOB_CHUNK
        self.ready = False
        self.closed = False
        self.lock = threading.Lock()
        self.engine = self._create_engine(engine_options)
        self.read_engine = self.engine.execution_options(ptutils_single_read=True)
        self.write_engine = self.engine.execution_options(ptutils_write=True)

    def _create_engine(self, engine_options: dict) -> sa.Engine:
        options = self.dialect.engine_options(self.url)
        options["connect_args"] = {**options.get("connect_args", {}), **engine_options.pop("connect_args", {})}
        options.update(engine_options)
        shown = self.url.render_as_string(hide_password=True)
        try:
            engine = sa.create_engine(self.url, **options)
        except ImportError as exc:
            hint = f"pip install '{self.dialect.install}'" if self.dialect.install else "install its driver"
            raise StorageError(f"{shown}: the driver for this URL is not installed ({exc}); {hint}") from exc
        except sa.exc.NoSuchModuleError as exc:
            raise StorageError(f"{shown}: no such SQLAlchemy driver {self.url.drivername!r} ({exc})") from exc
        except sa.exc.ArgumentError as exc:
            raise StorageError(f"invalid database URL {shown!r}: {' '.join(str(exc).split())}") from exc
        self.dialect.listen(engine, options)
        return engine


class SQLInterface(DBInterface):
    """Documents and blobs in one SQL database (SQLite, PostgreSQL, MariaDB/MySQL)."""

    scheme = "sql"

    def __init__(
        self,
        url: str | sa.URL,
        collection: str = DEFAULT_COLLECTION,
        *,
        retries: int = 5,
        retry_backoff: float = 0.1,
        blob_chunk_size: int | None = None,
        engine_options: dict[str, Any] | None = None,
    ):
        """Connect lazily to ``url``; ``retries`` transient failures are retried, ``retry_backoff`` doubling."""
        super().__init__(collection)
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        if blob_chunk_size is not None and (not isinstance(blob_chunk_size, int) or blob_chunk_size < 1024):
            raise ValueError(f"blob_chunk_size must be an int of at least 1024, got {blob_chunk_size!r}")
        self._shared = _Shared(
            normalise_url(url), retries, float(retry_backoff), blob_chunk_size, dict(engine_options or {})
        )
        self._owner = True

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLInterface:
        """``open_db`` entry point; options: collection, retries, retry_backoff, blob_chunk_size, engine_options."""
        return cls(url, **options)

    @property
    def url(self) -> str:
        return self._shared.url.render_as_string(hide_password=False)

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine (shared with sibling collections)."""
        return self._shared.engine

    @property
    def dialect(self) -> str:
        """``sqlite``, ``postgresql`` or ``mysql`` (MariaDB and MySQL)."""
        return self._shared.dialect.name

    def __repr__(self) -> str:
        safe = self._shared.url.render_as_string(hide_password=True)
        return f"{type(self).__name__}({safe!r}, collection={self.collection_name!r})"

    def _where(self) -> str:
        return f"{self._shared.url.render_as_string(hide_password=True)} collection {self.collection_name!r}"

    def _sibling(self, collection: str) -> SQLInterface:
        sibling = object.__new__(type(self))
        DBInterface.__init__(sibling, collection)
        sibling._shared = self._shared
        sibling._owner = False
        return sibling

    def ping(self) -> None:
        if self._shared.closed:
            raise StorageError(f"{self._where()}: the interface is closed")
        try:
            with self._shared.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1")).scalar()
        except sa.exc.DBAPIError as exc:
            raise BackendUnavailableError(f"{self._where()}: {exc.orig}") from exc

    def close(self) -> None:
        """Close the connection pool (from the interface that opened it; siblings share it)."""
        if self._owner and not self._shared.closed:
            self._shared.closed = True
            self._shared.engine.dispose()

    # ----------------------------------------------------------------- transactions
    def _run(
        self,
        fn: Callable[[sa.Connection], _T],
        *,
        write: bool,
        retries: int | None = None,
        single_read: bool = False,
    ) -> _T:
        """Run ``fn`` in one transaction, retrying transient failures (never an interrupted commit).

        ``single_read``: ``fn`` only runs one SELECT, which is atomic by itself, so
        it runs without BEGIN/COMMIT (the pool's rollback at checkin ends it).
        """
        shared = self._shared
        self._prepare()
        limit = shared.retries if retries is None else retries
        attempt = 0
        while True:
            committing = False
            try:
                if single_read and not write:
                    with shared.read_engine.connect() as conn:
                        return fn(conn)
                with (shared.write_engine if write else shared.engine).connect() as conn:
                    with conn.begin():
                        result = fn(conn)
                        committing = write
                    return result
            except UnicodeEncodeError as exc:
                raise CodecError(
                    "", f"{self._where()}: text with a lone surrogate cannot be stored or queried in SQL ({exc})"
                ) from exc
            except _RetryOperation:
                attempt += 1
                if attempt > limit + 5:
                    raise StorageError(f"{self._where()}: gave up after {attempt} conflicting attempts") from None
                continue
            except sa.exc.DBAPIError as exc:
                if shared.dialect.is_too_large(exc):
                    raise DocumentTooLargeError(f"{self._where()}: {exc.orig}") from exc
                if not shared.dialect.is_transient(exc):
                    raise StorageError(f"{self._where()}: {exc.orig}") from exc
                if committing:
                    raise BackendUnavailableError(
                        f"{self._where()}: connection lost while committing; the write may or may not have "
                        f"been applied ({exc.orig})"
                    ) from exc
                if attempt >= limit:
                    raise BackendUnavailableError(
                        f"{self._where()}: unavailable after {attempt + 1} attempts ({exc.orig})"
                    ) from exc
                delay = shared.retry_backoff * (2**attempt)
                log.warning(
                    "ptutils: %s: transient failure (%s), retry %d in %.2fs",
                    self._where(),
                    exc.orig,
                    attempt + 1,
                    delay,
                )
                time.sleep(delay)
                attempt += 1

    def _prepare(self) -> None:
        """Refuse a closed interface; create or check the tables on first use."""
        if self._shared.closed:
            raise StorageError(f"{self._where()}: the interface is closed")
        if not self._shared.ready:
            self._ensure_schema()

    def _ensure_schema(self) -> None:
        shared = self._shared
        with shared.lock:
            if shared.ready:
                return
            attempt = 0
            while True:
                try:
                    self._create_or_check_schema()
                    break
                except sa.exc.DBAPIError as exc:
                    transient = shared.dialect.is_transient(exc)
                    if not transient or attempt >= shared.retries:
                        kind = BackendUnavailableError if transient else StorageError
                        raise kind(f"{self._where()}: cannot set up the ptutils tables: {exc.orig}") from exc
                    time.sleep(shared.retry_backoff * (2**attempt))
                    attempt += 1
            shared.ready = True

    def _create_or_check_schema(self) -> None:
        """Learn the server's limits; check the stored schema version, or create the tables."""
        shared = self._shared
        with shared.engine.connect() as conn:
            shared.dialect.read_limits(conn)
            shared.chunk = shared.dialect.blob_chunk(shared.chunk)
            shared.schema.create_or_check(conn, self._where())

    # ----------------------------------------------------------------- rows
    def _key(self) -> sa.ColumnElement[bool]:
        return self._shared.schema.docs.c.collection == self.collection_name

    def _columns(self) -> list[Any]:
        return self._shared.schema.columns

    def _row_doc(self, row: Sequence[Any]) -> dict:
        text = row[2]
        # Text without tags or escapes needs no codec walk: mark it so decode() only copies it.
        doc: dict[str, Any] = Untagged() if isinstance(text, str) and untagged_json(text) else {}
        doc["_id"], doc["_version"] = row[0], int(row[1])
        doc.update(self._shared.dialect.text.load(text, row[3]))
        return doc

    def _body_values(self, body: dict) -> dict[str, Any]:
        """Bound values of a stored body: ``b_`` (JSON text) and ``f_`` (PostgreSQL fixups)."""
        dialect = self._shared.dialect
        clean = {k: v for k, v in body.items() if k not in ("_id", "_version")}
        text, fixups = dialect.text.dump(clean)
        dialect.check_statement(text, self._where())
        return {"b_": text, "f_": fixups}

    def _locked_row(self, conn: sa.Connection, doc_id: str) -> Any:
        return conn.execute(self._shared.schema.select_row, {"c_": self.collection_name, "i_": doc_id}).first()

    def _insert_new(self, conn: sa.Connection, doc_id: str, values: dict) -> bool:
        """Insert version 1 of ``doc_id``; False if it already exists (nothing written)."""
        shared = self._shared
        params = {"c_": self.collection_name, "i_": doc_id, "v_": 1, **values}
        return shared.dialect.inserted(conn, shared.schema.insert_row, params)

    def _replace(self, conn: sa.Connection, doc_id: str, version: int, values: dict) -> None:
        params = {"c_": self.collection_name, "i_": doc_id, "v_": version, **values}
        conn.execute(self._shared.schema.update_row, params)

    # ----------------------------------------------------------------- primitives
    def _write(self, doc_id: str, body: dict) -> dict | None:
        return self._write_many([(doc_id, body)])[0]

    def _write_many(self, items: Sequence[tuple[str, dict]]) -> list[dict | None]:
        """Insert or replace each document, all in one transaction."""
        self._prepare()
        rows = [(doc_id, self._body_values(body)) for doc_id, body in items]

        def op(conn: sa.Connection) -> list[dict | None]:
            olds: list[dict | None] = []
            for doc_id, values in rows:
                if self._insert_new(conn, doc_id, values):
                    olds.append(None)
                    continue
                row = self._locked_row(conn, doc_id)
                if row is None:
                    raise _RetryOperation()
                self._replace(conn, doc_id, int(row[1]) + 1, values)
                olds.append(self._row_doc(row))
            return olds

        return self._run(op, write=True)

    def _get(self, ids: Sequence[str]) -> dict[str, dict]:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return {}
        stmt = self._shared.schema.select_ids

        def op(conn: sa.Connection) -> dict[str, dict]:
            found: dict[str, dict] = {}
            for start in range(0, len(unique), _IN_BATCH):
                params = {"c_": self.collection_name, "ids_": unique[start : start + _IN_BATCH]}
                for row in conn.execute(stmt, params):
                    found[row[0]] = self._row_doc(row)
            return found

        return self._run(op, write=False, single_read=len(unique) <= _IN_BATCH)

    def _select(self, query: Node) -> sa.Select:
        schema = self._shared.schema
        return sa.select(*self._columns()).where(self._key(), render_filter(query, schema))

    def find_statement(self, query: Node, sort: list[tuple[Path, int]], limit: int | None, skip: int) -> sa.Select:
        """The SELECT that :meth:`load` runs for parsed ``query``/``sort`` (for inspection and tests)."""
        stmt = self._select(query).order_by(*render_order(sort, self._shared.schema))
        if limit is not None:
            stmt = stmt.limit(limit)
        if skip:
            stmt = stmt.offset(skip)
        return stmt

    def _status_lookup(self, query: Node) -> tuple[tuple[str, ...], dict[str, str]] | None:
        """For equality on indexed fields only (the status queries of sessions): the fields and bound values."""
        clauses = query.clauses if isinstance(query, And) else (query,)
        if not clauses:
            return None
        fields, params = [], {}
        for k, clause in enumerate(clauses):
            if not (
                isinstance(clause, Compare)
                and clause.op == "$eq"
                and isinstance(clause.value, str)
                and indexed_column(clause.path, clause.value, self._shared.schema) is not None
            ):
                return None
            fields.append(clause.path[0])
            params[f"q{k}_"] = self._shared.dialect.text.stored(clause.value)
        return tuple(fields), params

    def _find(
        self, query: Node, sort: list[tuple[Path, int]], limit: int | None, skip: int, projection: list[Path] | None
    ) -> list[dict]:
        lookup = None if sort or limit is not None or skip else self._status_lookup(query)
        if lookup is not None:
            stmt, params = self._shared.schema.lookup_statement(lookup[0], count=False), lookup[1]
            params["c_"] = self.collection_name
        else:
            stmt, params = self.find_statement(query, sort, limit, skip), {}

        def op(conn: sa.Connection) -> list[dict]:
            return [self._row_doc(row) for row in conn.execute(stmt, params)]

        docs = self._run(op, write=False, single_read=True)
        return docs if projection is None else [project(d, projection) for d in docs]

    def _count(self, query: Node) -> int:
        schema = self._shared.schema
        lookup = self._status_lookup(query)
        if lookup is not None:
            stmt, params = schema.lookup_statement(lookup[0], count=True), {**lookup[1], "c_": self.collection_name}
        else:
            where = sa.and_(self._key(), render_filter(query, schema))
            stmt, params = sa.select(sa.func.count()).select_from(schema.docs).where(where), {}
        return int(self._run(lambda conn: conn.execute(stmt, params).scalar_one(), write=False, single_read=True))

    def _delete_returning(self, where: sa.ColumnElement[bool]) -> list[dict]:
        docs = self._shared.schema.docs
        stmt = sa.delete(docs).where(self._key(), where).returning(*self._columns())

        def op(conn: sa.Connection) -> list[dict]:
            return [self._row_doc(row) for row in conn.execute(stmt)]

        return self._run(op, write=True)

    def _remove_ids(self, ids: Sequence[str]) -> list[dict]:
        docs = self._shared.schema.docs
        removed: list[dict] = []
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), _IN_BATCH):
            removed.extend(self._delete_returning(docs.c.id.in_(unique[start : start + _IN_BATCH])))
        return removed

    def _remove_query(self, query: Node) -> list[dict]:
        return self._delete_returning(render_filter(query, self._shared.schema))

    def _update(
        self, doc_id: str, update: Update, expected_version: int | None, upsert: bool
    ) -> tuple[dict | None, dict] | None:
        def op(conn: sa.Connection) -> tuple[dict | None, dict] | None:
            row = self._locked_row(conn, doc_id)
            current = self._row_doc(row) if row is not None else None
            self.check_version(doc_id, current, expected_version)
            if current is None:
                if not upsert:
                    return None
                new = apply_update({"_id": doc_id}, update)
                new["_version"] = 1
                if not self._insert_new(conn, doc_id, self._body_values(new)):
                    raise _RetryOperation()
                return None, new
            new = apply_update(current, update)
            new["_version"] = current["_version"] + 1
            self._replace(conn, doc_id, new["_version"], self._body_values(new))
            return current, new

        return self._run(op, write=True)

    def _put_blob(self, blob_id: str, data: bytes) -> None:
        shared = self._shared
        self._prepare()
        blobs = shared.schema.blobs
        size = len(data)
        step = shared.chunk
        view = memoryview(data)
        pieces = [view[i : i + step] for i in range(0, size, step)] or [view[:0]]

        def op(conn: sa.Connection) -> None:
            conn.execute(sa.delete(blobs).where(blobs.c.collection == self.collection_name, blobs.c.blob_id == blob_id))
            rows = [
                {
                    "collection": self.collection_name,
                    "blob_id": blob_id,
                    "chunk": i,
                    "nchunks": len(pieces),
                    "size": size,
                    "data": bytes(piece),
                }
                for i, piece in enumerate(pieces)
            ]
            shared.dialect.insert_chunks(conn, blobs, rows)

        self._run(op, write=True)

    def _get_blob(self, blob_id: str) -> bytes:
        blobs = self._shared.schema.blobs
        stmt = (
            sa.select(blobs.c.chunk, blobs.c.nchunks, blobs.c.size, blobs.c.data)
            .where(blobs.c.collection == self.collection_name, blobs.c.blob_id == blob_id)
            .order_by(blobs.c.chunk)
        )

        def op(conn: sa.Connection) -> list[Any]:
            return conn.execute(stmt).all()

        rows = self._run(op, write=False)
        if not rows:
            raise NotFoundError("blob", blob_id, self._where())
        nchunks, size = rows[0][1], rows[0][2]
        if [r[0] for r in rows] != list(range(nchunks)):
            raise CorruptionError(
                f"blob {blob_id!r} in {self._where()}", f"has chunks {[r[0] for r in rows]} of {nchunks}"
            )
        data = b"".join(bytes(r[3]) for r in rows)
        if len(data) != size:
            raise CorruptionError(f"blob {blob_id!r} in {self._where()}", f"holds {len(data)} bytes, expected {size}")
        return data

    def _delete_blobs(self, blob_ids: Iterable[str]) -> None:
        blobs = self._shared.schema.blobs
        unique = list(dict.fromkeys(blob_ids))
        for start in range(0, len(unique), _IN_BATCH):
            batch = unique[start : start + _IN_BATCH]
            stmt = sa.delete(blobs).where(blobs.c.collection == self.collection_name, blobs.c.blob_id.in_(batch))
            self._run(lambda conn, stmt=stmt: conn.execute(stmt), write=True)
