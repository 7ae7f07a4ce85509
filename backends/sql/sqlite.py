"""SQLite: ``json_type``/``json_extract`` on a JSON text body; a file in WAL mode, locked by ``BEGIN IMMEDIATE``.

URL: ``sqlite:///path/to/file.db`` (the directory is created), or an in-memory
database shared by one engine.  The generated columns are VIRTUAL, strings
compare with SQLite's BINARY collation (code point order for UTF-8), and strings
are stored through :func:`~ptutils.backends.sql.text.escape_text`, since
SQLite's JSON functions end a string at U+0000.

Writes begin with ``BEGIN IMMEDIATE`` (the file's write lock, so no SELECT ...
FOR UPDATE is needed); a read made of one SELECT runs in autocommit mode.  A
busy or locked file is a transient failure, retried by the interface.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.pool import StaticPool

from ptutils.query import Path

from .dialect import Dialect
from .fields import Field, compare, rank
from .text import BodyText, escape_text


class SQLiteField(Field):
    """SQLite: ``json_type``/``json_extract`` on the body text.

    Path segments made of characters JSON never escapes are addressed as
    ``$."seg"``; others (quotes, backslashes, control characters) go through a
    ``json_each`` lookup on the parent object, since SQLite versions differ in
    how they match escaped keys in a path.
    """

    def __init__(self, body: Any, path: Path):
        src, jpath = body, "$"
        for seg in path:
            if '"' in seg or "\\" in seg or any(ord(c) < 0x20 for c in seg):
                each = sa.func.json_each(src, jpath).table_valued("key", "type", "value")
                child = sa.case(
                    (each.c.type.in_(("object", "array")), each.c.value),
                    (each.c.type.in_(("true", "false", "null")), each.c.type),
                    else_=sa.func.json_quote(each.c.value),
                )
                src, jpath = sa.select(child).where(each.c.key == seg).scalar_subquery(), "$"
            else:
                jpath += f'."{seg}"'
        self.kind = sa.func.coalesce(sa.func.json_type(src, jpath), "missing")
        self.value = sa.func.json_extract(src, jpath)

    def is_missing(self):
        return self.kind == "missing"

    def is_null(self):
        return self.kind == "null"

    def is_int(self):
        return self.kind == "integer"

    def is_float(self):
        return self.kind == "real"

    def is_string(self):
        return self.kind == "text"

    def is_bool(self, value):
        return self.kind == ("true" if value else "false")

    def int_value(self):
        return self.value

    def float_value(self):
        return self.value

    def str_compare(self, op, value):
        return sa.and_(self.is_string(), compare(self.value, op, escape_text(value)))

    def sort_keys(self):
        kind_rank = rank(
            [
                (self.kind == "missing", 0),
                (self.kind == "null", 1),
                (self.kind.in_(("integer", "real")), 2),
                (self.kind == "text", 3),
                (self.kind.in_(("true", "false")), 4),
            ]
        )
        scalar = sa.case((self.kind.in_(("integer", "real", "text", "true", "false")), self.value))
        return [kind_rank, scalar]


class SQLite(Dialect):
    """SQLite through the standard library's ``sqlite3`` driver."""

    name = "sqlite"
    backends = ("sqlite",)
    text = BodyText()

    name_type = id_type = body_type = text_type = sa.Text
    blob_type = sa.LargeBinary
    mirror_sql = (
        "CASE WHEN json_type(body, '$.{f}') = 'text' AND length(json_extract(body, '$.{f}')) <= {n} "
        "THEN json_extract(body, '$.{f}') END"
    )

    def engine_options(self, url: sa.URL) -> dict[str, Any]:
        options: dict[str, Any] = {"connect_args": {"timeout": 30, "check_same_thread": False}}
        database = url.database or ""
        if database in ("", ":memory:") or "mode=memory" in database:
            options["poolclass"] = StaticPool
        elif not database.startswith("file:"):
            directory = os.path.dirname(os.path.abspath(database))
            os.makedirs(directory, exist_ok=True)
        return options

    def listen(self, engine: sa.Engine, options: dict[str, Any]) -> None:
        sa.event.listen(engine, "connect", _on_connect)
        sa.event.listen(engine, "begin", _on_begin)  # a file has no connection to lose: no ping

    def lock_rows(self, stmt: sa.Select) -> sa.Select:
        return stmt  # the write transaction began with BEGIN IMMEDIATE: the file is locked already

    def insert_new(self, table: sa.Table, values: dict[str, Any]) -> Any:
        return sqlite_insert(table).values(**values).on_conflict_do_nothing(index_elements=["collection", "id"])

    def inserted(self, conn: sa.Connection, stmt: Any, params: dict[str, Any]) -> bool:
        return conn.execute(stmt, params).rowcount == 1  # 0: the id exists

    def field(self, body: Any, path: Path) -> Field:
        return SQLiteField(body, path)

    def transient_error(self, exc: sa.exc.DBAPIError) -> bool:
        message = str(exc.orig).lower()
        return "database is locked" in message or "database table is locked" in message or "database is busy" in message


def _on_connect(dbapi_connection: Any, record: Any) -> None:
    """Let SQLAlchemy's begin event emit BEGIN itself (pysqlite's implicit transactions off); use WAL."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        if cursor.execute("PRAGMA journal_mode").fetchone()[0] not in ("wal", "memory"):
            cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _on_begin(conn: sa.Connection) -> None:
    options = conn.get_execution_options()
    if options.get("ptutils_single_read"):
        return  # one SELECT in autocommit mode reads one snapshot: no BEGIN/COMMIT round trips
    # Straight to the driver, as pysqlite's own implicit BEGIN is (a statement round through
    # SQLAlchemy's execution machinery costs as much as the INSERT that follows).
    statement = "BEGIN IMMEDIATE" if options.get("ptutils_write") else "BEGIN"
    try:
        conn.connection.driver_connection.execute(statement)
    except sqlite3.Error as exc:  # wrapped as SQLAlchemy would, so that a busy file is retried
        raise sa.exc.OperationalError(statement, None, exc) from exc
