"""PostgreSQL: a JSONB body read with ``#>`` and ``jsonb_typeof``; psycopg 3 unless the URL names a driver.

URL: ``postgresql://user@host/db`` (or ``postgres://``).  The generated columns
are STORED, ids and collection names use ``COLLATE "C"`` (code point order).
JSONB cannot hold U+0000, so strings are stored through
:func:`~ptutils.backends.sql.text.escape_text`; it cannot hold ``-0.0`` either,
so such values are recorded in the ``fixups`` column and restored on read; and
its numbers drop exponents, so floats are written in positional notation (a
float keeps its decimal point, which tells it from an integer).

The tables are created under an advisory lock, so processes starting together
create them once.  Errors are classified by SQLSTATE class.
"""

from __future__ import annotations

import contextlib
import decimal
import math
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_types
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ptutils.query import Path

from .dialect import Dialect
from .fields import TWO_53, Field, compare, rank
from .text import BodyText, escape_text

_SCHEMA_LOCK = 0x70747574696C73  # "ptutils": the advisory lock held while creating the tables
_TRANSIENT_CLASSES = ("08", "40", "53")
_TRANSIENT_STATES = {"57P01", "57P02", "57P03"}
_TOO_LARGE = "54000"
_INDEX_LIKE = re.compile(r"\s*[+-]?[0-9]+")


def _positional(value: float) -> str:
    """A float as decimal digits with a point (PostgreSQL's numeric drops exponents and so float-ness)."""
    text = repr(value)
    if "e" not in text and "E" not in text:
        return text
    text = format(decimal.Decimal(text), "f")
    return text if "." in text else text + ".0"


class PostgresText(BodyText):
    """Escaped strings as on SQLite; floats positional, ``-0.0`` written as ``0.0`` plus a fixup."""

    care: ClassVar[re.Pattern[str]] = re.compile(r"[0-9][eE]|-0\.0|\\u000[01]")

    def number(self, value: float, path: list, fixups: list) -> str:
        if value == 0 and math.copysign(1.0, value) < 0:
            fixups.append([path, value])
        return _positional(value)


class PostgresField(Field):
    """PostgreSQL: ``body #> path`` (path bound as ``text[]``) and ``jsonb_typeof``.

    ``#>`` would index into an array with an integer-like segment, so each such
    segment is guarded by the parent being an object.
    """

    def __init__(self, body: Any, path: Path):
        arr = pg_types.ARRAY(sa.Text)
        guards = [
            sa.func.jsonb_typeof(
                body.op("#>", return_type=pg_types.JSONB)(sa.bindparam(None, list(path[:i]), type_=arr))
            )
            == "object"
            for i in range(1, len(path))
            if _INDEX_LIKE.fullmatch(path[i])
        ]
        param = sa.bindparam(None, list(path), type_=arr)
        value = body.op("#>", return_type=pg_types.JSONB)(param)
        text = body.op("#>>", return_type=sa.Text)(param)
        if guards:
            value = sa.case((sa.and_(*guards), value))
            text = sa.case((sa.and_(*guards), text))
        self.value, self.text = value, text
        self.kind = sa.func.coalesce(sa.func.jsonb_typeof(value), "missing")
        self.number = sa.case((self.kind == "number", sa.cast(value, sa.Numeric)))

    def is_missing(self):
        return self.kind == "missing"

    def is_null(self):
        return self.kind == "null"

    def is_int(self):
        return sa.and_(self.kind == "number", sa.func.scale(self.number) == 0)

    def is_float(self):
        return sa.and_(self.kind == "number", sa.func.scale(self.number) > 0)

    def is_string(self):
        return self.kind == "string"

    def is_bool(self, value):
        return sa.and_(self.kind == "boolean", self.text == ("true" if value else "false"))

    def int_value(self):
        return self.number

    def float_value(self):
        return sa.cast(self.number, pg_types.DOUBLE_PRECISION)

    def str_compare(self, op, value):
        return sa.and_(self.is_string(), compare(sa.collate(self.text, "C"), op, escape_text(value)))

    def sort_keys(self):
        kind_rank = rank(
            [
                (self.kind == "missing", 0),
                (self.kind == "null", 1),
                (self.kind == "number", 2),
                (self.kind == "string", 3),
                (self.kind == "boolean", 4),
            ]
        )
        as_double = sa.cast(self.number, pg_types.DOUBLE_PRECISION)
        # Integers beyond 2**53 that round to the same double are ordered by how far they are from it.
        half = sa.cast(sa.cast(as_double / 2, sa.BigInteger), sa.Numeric)
        remainder = sa.case(
            (sa.and_(sa.func.scale(self.number) == 0, sa.func.abs(self.number) > TWO_53), self.number - half - half),
            else_=0,
        )
        text = sa.collate(sa.case((self.kind.in_(("string", "boolean")), self.text)), "C")
        return [kind_rank, as_double, remainder, text]


class PostgreSQL(Dialect):
    """PostgreSQL (psycopg 3 by default)."""

    name = "postgresql"
    backends = ("postgresql", "postgres")
    install = "ptutils[postgres]"
    text = PostgresText()

    name_type = sa.String(63, collation="C")
    id_type = sa.String(128, collation="C")
    body_type = pg_types.JSONB
    text_type = sa.Text
    blob_type = pg_types.BYTEA
    mirror_sql = (
        "CASE WHEN jsonb_typeof(body -> '{f}') = 'string' AND length(body ->> '{f}') <= {n} "
        "THEN body ->> '{f}' END"
    )
    mirror_persisted = True

    @classmethod
    def normalise_url(cls, url: sa.URL, backend: str, driver: str) -> sa.URL:
        return url.set(drivername=f"postgresql+{driver or 'psycopg'}")

    @contextlib.contextmanager
    def schema_transaction(self, conn: sa.Connection) -> Iterator[None]:
        with conn.begin():
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
            yield

    def bind_body(self, param: Any) -> Any:
        return sa.cast(param, pg_types.JSONB)

    def select_body(self, column: Any) -> Any:
        return sa.cast(column, sa.Text)

    def insert_new(self, table: sa.Table, values: dict[str, Any]) -> Any:
        insert = pg_insert(table).values(**values).on_conflict_do_nothing(index_elements=["collection", "id"])
        return insert.returning(table.c.version)

    def inserted(self, conn: sa.Connection, stmt: Any, params: dict[str, Any]) -> bool:
        return conn.execute(stmt, params).first() is not None

    def field(self, body: Any, path: Path) -> Field:
        return PostgresField(body, path)

    def transient_error(self, exc: sa.exc.DBAPIError) -> bool:
        state = _sqlstate(exc)
        if state is not None:
            return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES
        # No SQLSTATE: the driver could not reach the server (refused, reset, timed out).
        return isinstance(exc, sa.exc.OperationalError) and exc.orig.__class__.__module__.startswith("psycopg")

    def is_too_large(self, exc: sa.exc.DBAPIError) -> bool:
        return _sqlstate(exc) == _TOO_LARGE or super().is_too_large(exc)


def _sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None) or None
