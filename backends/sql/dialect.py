"""What a SQL dialect decides: the hooks that the interface, the schema and the renderer call.

One :class:`Dialect` subclass per database family lives in its own module
(``sqlite``, ``postgresql``, ``mysql``); the shared code never asks which one it
has, it calls a hook.  The defaults here are those of a database server
(PostgreSQL and MariaDB share them); SQLite, a file, overrides them.

Connections to a server: a pooled connection idle for more than
:data:`PING_AFTER_IDLE_S` is pinged before use and replaced (with the whole
pool) if the server dropped it; one checked in moments ago is used as it is.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import sqlalchemy as sa

from ptutils.query import Path

from .fields import Field, IdField
from .text import BodyText

PING_AFTER_IDLE_S = 1.0
"""A pooled server connection idle for longer than this is pinged at checkout (one in use is known alive)."""


class Dialect(abc.ABC):
    """One SQL database family: its URLs, engine, column types, statements, JSON functions and errors."""

    name: ClassVar[str]
    """What :attr:`ptutils.backends.sql.SQLInterface.dialect` says: ``sqlite``, ``postgresql`` or ``mysql``."""
    backends: ClassVar[tuple[str, ...]]
    """The URL backend names (before ``+driver``) that mean this dialect."""
    text: ClassVar[BodyText]
    """How document bodies are written as JSON text."""

    # Column types of the tables (see :class:`ptutils.backends.sql.schema.Schema`).
    name_type: ClassVar[Any]
    """Collection names."""
    id_type: ClassVar[Any]
    """Document and blob ids (ASCII, compared in binary order)."""
    body_type: ClassVar[Any]
    """The JSON body."""
    text_type: ClassVar[Any]
    """Free text (the fixups column)."""
    blob_type: ClassVar[Any]
    """Blob chunks."""
    mirror_sql: ClassVar[str]
    """SQL of a generated column holding top-level string field ``{f}`` when it has at most ``{n}`` characters."""
    mirror_persisted: ClassVar[bool] = False
    """Whether those generated columns are STORED (else VIRTUAL)."""
    table_options: ClassVar[dict[str, str]] = {}
    """Keyword options of every table."""
    install: ClassVar[str | None] = None
    """What installs this dialect's default driver (``pip install ...``), or None when Python ships it."""

    @classmethod
    def normalise_url(cls, url: sa.URL, backend: str, driver: str) -> sa.URL:
        """``url`` (whose drivername is ``backend+driver``, backend lower-cased) with this dialect's defaults."""
        return url

    # ----------------------------------------------------------------- engine
    def engine_options(self, url: sa.URL) -> dict[str, Any]:
        """Options of ``sqlalchemy.create_engine`` (``connect_args`` among them) before the caller's own."""
        return {"connect_args": {"connect_timeout": 10}}

    def listen(self, engine: sa.Engine, options: dict[str, Any]) -> None:
        """Attach the engine's event hooks: ping a connection that sat idle in the pool.

        Not when the caller asked ``pool_pre_ping`` (a ping at every checkout).
        """
        if not options.get("pool_pre_ping"):
            sa.event.listen(engine, "checkin", _note_checkin)
            sa.event.listen(engine, "checkout", functools.partial(_ping_if_idle, engine.dialect))

    def read_limits(self, conn: sa.Connection) -> None:
        """Learn the server's limits (on first use, before the tables are checked)."""

    def blob_chunk(self, chunk: int) -> int:
        """The size of blob chunks, given the one asked for (after :meth:`read_limits`)."""
        return chunk

    def check_statement(self, text: str, where: str) -> None:
        """Raise :class:`~ptutils.errors.DocumentTooLargeError` if a body of JSON ``text`` cannot be sent."""

    # ----------------------------------------------------------------- schema and statements
    def mirror_type(self, max_chars: int) -> Any:
        """The type of the generated columns mirroring string fields of at most ``max_chars`` characters."""
        return sa.Text

    @contextlib.contextmanager
    def schema_transaction(self, conn: sa.Connection) -> Iterator[None]:
        """The transaction that creates the tables, serialised with other processes doing the same."""
        with conn.begin():
            yield

    def bind_body(self, param: Any) -> Any:
        """The bound JSON text of a body as the body column takes it."""
        return param

    def select_body(self, column: Any) -> Any:
        """The body column as selected: JSON text."""
        return column

    def lock_rows(self, stmt: sa.Select) -> sa.Select:
        """``stmt`` locking the rows it reads until the transaction ends."""
        return stmt.with_for_update()

    @abc.abstractmethod
    def insert_new(self, table: sa.Table, values: dict[str, Any]) -> Any:
        """The INSERT of a new row of ``values`` that writes nothing if its key exists (see :meth:`inserted`)."""

    @abc.abstractmethod
    def inserted(self, conn: sa.Connection, stmt: Any, params: dict[str, Any]) -> bool:
        """Run :meth:`insert_new`'s statement: True if the row was written, False if its key existed."""

    def insert_chunks(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Insert a blob's chunk rows."""
        conn.execute(sa.insert(table), rows)

    # ----------------------------------------------------------------- queries
    @abc.abstractmethod
    def field(self, body: Any, path: Path) -> Field:
        """The value at ``path`` of the body column."""

    def id_field(self, column: Any) -> Field:
        """The ``_id`` column as a field."""
        return IdField(column, self.text.stored)

    # ----------------------------------------------------------------- errors
    def is_transient(self, exc: sa.exc.DBAPIError) -> bool:
        """A failure worth retrying: a lost connection, a deadlock, a busy database."""
        return exc.connection_invalidated or self.transient_error(exc)

    @abc.abstractmethod
    def transient_error(self, exc: sa.exc.DBAPIError) -> bool:
        """A driver error of this dialect that is worth retrying."""

    def is_too_large(self, exc: sa.exc.DBAPIError) -> bool:
        """The statement failed because a value is over a limit of the database.

        SQLite says "string or blob too big"; the wording is believed from any database.
        """
        return "too big" in str(exc.orig).lower()


def _note_checkin(dbapi_connection: Any, record: Any) -> None:
    record.info["ptutils_idle_since"] = time.monotonic()


def _ping_if_idle(dialect: sa.Dialect, dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Pre-ping a connection that sat idle in the pool (the server may have dropped it); skip a busy one.

    A connection checked in moments ago is alive but for a crash in between,
    which the retries of :meth:`SQLInterface._run` cover; sparing its ping halves
    the round trips of a quick read.
    """
    since = record.info.get("ptutils_idle_since")
    if since is None or time.monotonic() - since <= PING_AFTER_IDLE_S:
        return
    try:
        dialect.do_ping(dbapi_connection)
    except dialect.loaded_dbapi.Error as exc:
        if dialect.is_disconnect(exc, dbapi_connection, None):
            # As pool_pre_ping: a dropped connection means a restarted server, so renew the whole pool.
            raise sa.exc.InvalidatePoolError() from exc
        raise
