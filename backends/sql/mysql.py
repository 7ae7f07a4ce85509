"""MariaDB/MySQL: a JSON text body read with ``JSON_EXTRACT``/``JSON_VALUE`` and ``JSON_TYPE``; PyMySQL by default.

URL: ``mysql+pymysql://user@host/db`` (also ``mysql://`` and ``mariadb://``,
which pick PyMySQL; ``charset=utf8mb4`` unless the URL says otherwise).  The
generated columns are VIRTUAL; strings compare with ``utf8mb4_nopad_bin``
(code point order), ids are ASCII with ``ascii_bin``.

MariaDB's JSON paths cannot address keys starting with ``-``, so such keys are
stored with a ``~`` prefix (see :func:`mysql_key`); ``JSON_TYPE`` calls
``1e+16`` an INTEGER, so floats are always written with a decimal point.
Strings are stored as they are (no U+0000 escape is needed).

The server's ``max_allowed_packet`` bounds a statement: blob chunks are kept
under a third of it and inserted one row per statement, and a document too large
for one statement is refused before it is sent.  DDL commits implicitly here, so
the tables are created under a named lock (``GET_LOCK``).  Transactions run at
READ COMMITTED; errors are classified by MySQL error number.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql as mysql_types

from ptutils.errors import DocumentTooLargeError
from ptutils.query import Path

from .dialect import Dialect
from .fields import TWO_53, Field, IdField, compare, rank
from .text import BodyText

COLLATION = "utf8mb4_nopad_bin"
"""The collation of text compared in code point order."""
_TRANSIENT = {1040, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055, 4031}
_TOO_LARGE = {1153, 1301}
_DUPLICATE_KEY = 1062


def mysql_key(key: str) -> str:
    """How a key is stored on MariaDB/MySQL: their JSON paths cannot address keys starting with '-'.

    Such keys (and, to keep the mapping reversible, keys starting with '~') get a
    '~' prefix in the stored JSON and in query paths; reads strip it again.
    """
    return "~" + key if key[:1] in ("-", "~") else key


def _unmap_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {(k[1:] if k[:1] == "~" else k): _unmap_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unmap_keys(v) for v in value]
    return value


def _with_point(value: float) -> str:
    """A float's repr that always has a decimal point (``1e+16`` -> ``1.0e+16``)."""
    text = repr(value)
    return text if "." in text else text.replace("e", ".0e", 1)


class MySQLText(BodyText):
    """Strings as they are, keys through :func:`mysql_key`, floats with a decimal point."""

    care: ClassVar[re.Pattern[str]] = re.compile(r'[0-9][eE]|"[-~]')

    def stored(self, value: str) -> str:
        return value

    def key(self, key: str) -> str:
        return mysql_key(key)

    def number(self, value: float, path: list, fixups: list) -> str:
        return _with_point(value)

    def restore(self, text: str, body: dict) -> dict:
        return _unmap_keys(body) if '"~' in text else body


class MySQLField(Field):
    """MariaDB/MySQL: ``JSON_EXTRACT``/``JSON_VALUE`` with a bound ``$."seg"`` path and ``JSON_TYPE``.

    Floats are always written with a decimal point, which tells them from
    integers (``JSON_TYPE`` calls ``1e+16`` an INTEGER).
    """

    def __init__(self, body: Any, path: Path):
        jpath = "$" + "".join("." + json.dumps(mysql_key(seg), ensure_ascii=False) for seg in path)
        param = sa.bindparam(None, jpath, type_=sa.Text)
        self.json = sa.func.json_extract(body, param)
        self.text = sa.func.json_value(body, param)
        self.kind = sa.func.coalesce(sa.func.json_type(self.json), "MISSING")
        self.is_number = self.kind.in_(("INTEGER", "DOUBLE"))

    def is_missing(self):
        return self.kind == "MISSING"

    def is_null(self):
        return self.kind == "NULL"

    def is_int(self):
        return sa.and_(self.is_number, sa.func.instr(self.text, ".") == 0)

    def is_float(self):
        return sa.and_(self.is_number, sa.func.instr(self.text, ".") > 0)

    def is_string(self):
        return self.kind == "STRING"

    def is_bool(self, value):
        literal = sa.literal("true" if value else "false", sa.Text)
        return sa.and_(
            self.kind == "BOOLEAN", sa.cast(self.json, mysql_types.BINARY) == sa.cast(literal, mysql_types.BINARY)
        )

    def int_value(self):
        return sa.case((self.is_int(), sa.cast(self.text, sa.BigInteger)))

    def float_value(self):
        return sa.case((self.is_number, sa.cast(self.text, mysql_types.DOUBLE)))

    def str_compare(self, op, value):
        return sa.and_(self.is_string(), compare(sa.collate(self.text, COLLATION), op, value))

    def sort_keys(self):
        kind_rank = rank(
            [
                (self.kind == "MISSING", 0),
                (self.kind == "NULL", 1),
                (self.is_number, 2),
                (self.kind == "STRING", 3),
                (self.kind == "BOOLEAN", 4),
            ]
        )
        as_double = self.float_value()
        exact = self.int_value()
        half = sa.cast(as_double / 2, sa.BigInteger)
        beyond = sa.or_(exact > TWO_53, exact < -TWO_53)  # not abs(): abs(-2**63) overflows BIGINT
        remainder = sa.case((sa.and_(self.is_int(), beyond), exact - half - half), else_=0)
        text = sa.collate(sa.case((self.kind.in_(("STRING", "BOOLEAN")), self.text)), COLLATION)
        return [kind_rank, as_double, remainder, text]


class MySQLIdField(IdField):
    """The ASCII id column, compared with non-ASCII text through a utf8mb4 conversion."""

    def str_compare(self, op, value):
        if not value.isascii():
            # The column is ASCII: MariaDB refuses to compare it with other text unless converted.
            column = sa.collate(sa.cast(self.column, mysql_types.CHAR(128, charset="utf8mb4")), COLLATION)
            return compare(column, op, value)
        return super().str_compare(op, value)


class MySQL(Dialect):
    """MariaDB and MySQL (PyMySQL by default)."""

    name = "mysql"
    backends = ("mysql", "mariadb")
    install = "ptutils[mysql]"
    text = MySQLText()

    name_type = mysql_types.VARCHAR(63, charset="ascii", collation="ascii_bin")
    id_type = mysql_types.VARCHAR(128, charset="ascii", collation="ascii_bin")
    body_type = mysql_types.LONGTEXT(charset="utf8mb4", collation="utf8mb4_bin")
    text_type = mysql_types.LONGTEXT(charset="utf8mb4", collation="utf8mb4_bin")
    blob_type = mysql_types.LONGBLOB
    mirror_sql = (
        "CASE WHEN JSON_TYPE(JSON_EXTRACT(body, '$.{f}')) = 'STRING' "
        "AND CHAR_LENGTH(JSON_VALUE(body, '$.{f}')) <= {n} THEN JSON_VALUE(body, '$.{f}') END"
    )
    table_options: ClassVar[dict[str, str]] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}

    def __init__(self) -> None:
        self.max_packet: int | None = None
        """The server's ``max_allowed_packet`` (bytes), once read."""

    @classmethod
    def normalise_url(cls, url: sa.URL, backend: str, driver: str) -> sa.URL:
        url = url.set(drivername=f"{backend}+{driver or 'pymysql'}")
        if "charset" not in url.query:
            url = url.update_query_dict({"charset": "utf8mb4"})
        return url

    def engine_options(self, url: sa.URL) -> dict[str, Any]:
        return {**super().engine_options(url), "isolation_level": "READ COMMITTED"}

    def read_limits(self, conn: sa.Connection) -> None:
        self.max_packet = int(conn.execute(sa.text("SELECT @@max_allowed_packet")).scalar())

    def blob_chunk(self, chunk: int) -> int:
        return chunk if self.max_packet is None else min(chunk, max(64 * 1024, self.max_packet // 3))

    def check_statement(self, text: str, where: str) -> None:
        if self.max_packet is None or len(text) <= self.max_packet // 4:
            return
        import pymysql.converters

        size = len(pymysql.converters.escape_string(text).encode("utf-8")) + 4096
        if size > self.max_packet:
            raise DocumentTooLargeError(
                f"{where}: the document needs {size} bytes in one statement, over MariaDB's "
                f"max_allowed_packet of {self.max_packet}; store large values as arrays/bytes (blobs)"
            )

    def mirror_type(self, max_chars: int) -> Any:
        return mysql_types.VARCHAR(max_chars, charset="utf8mb4", collation=COLLATION)

    @contextlib.contextmanager
    def schema_transaction(self, conn: sa.Connection) -> Iterator[None]:
        # DDL commits implicitly on MariaDB/MySQL, so a session-level named lock serialises setup.
        conn.execute(sa.select(sa.func.get_lock("ptutils_schema", 60))).scalar()
        conn.commit()
        try:
            with conn.begin():
                yield
        finally:
            conn.execute(sa.select(sa.func.release_lock("ptutils_schema"))).scalar()
            conn.commit()

    def insert_new(self, table: sa.Table, values: dict[str, Any]) -> Any:
        return sa.insert(table).values(**values)

    def inserted(self, conn: sa.Connection, stmt: Any, params: dict[str, Any]) -> bool:
        try:
            conn.execute(stmt, params)
        except sa.exc.IntegrityError as exc:
            if _error_number(exc) == _DUPLICATE_KEY:
                return False
            raise
        return True

    def insert_chunks(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        for row in rows:  # one chunk per statement: a multi-row statement could pass max_allowed_packet
            conn.execute(sa.insert(table), row)

    def field(self, body: Any, path: Path) -> Field:
        return MySQLField(body, path)

    def id_field(self, column: Any) -> Field:
        return MySQLIdField(column, self.text.stored)

    def transient_error(self, exc: sa.exc.DBAPIError) -> bool:
        return _error_number(exc) in _TRANSIENT

    def is_too_large(self, exc: sa.exc.DBAPIError) -> bool:
        return _error_number(exc) in _TOO_LARGE or super().is_too_large(exc)


def _error_number(exc: sa.exc.DBAPIError) -> int | None:
    args = getattr(exc.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None
