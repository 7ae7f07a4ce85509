"""SQLInterface: documents and blobs in SQLite, PostgreSQL or MariaDB/MySQL (SQLAlchemy 2 Core).

URLs: ``sqlite:///path/to/file.db``, ``postgresql://user@host/db`` (psycopg 3 is
picked when no driver is named), ``mysql+pymysql://user@host/db`` (also
``mysql://`` and ``mariadb://``, which pick PyMySQL).

Schema (created on first use, its version stored in ``ptutils_meta``; a newer
version than this module knows raises :class:`SchemaVersionError`):

* ``ptutils_documents(collection, id, version, body, fixups, session_id, state,
  parent_id)``, primary key ``(collection, id)``.  ``body`` is the encoded
  document without ``_id``/``_version`` (which live in their own columns) as
  JSONB on PostgreSQL and JSON text elsewhere.  ``session_id``, ``state`` and
  ``parent_id`` are generated columns (STORED on PostgreSQL, VIRTUAL on MariaDB
  and SQLite) holding the top-level field when it is a string of at most 255
  characters, else NULL; each has an index ``(collection, <field>, id)``.  Equality
  and ``$in`` on those fields use the column (exact by construction), so the
  status queries of sessions are index lookups; every other path is evaluated
  with the dialect's JSON functions.  ``fixups`` is only used on PostgreSQL: JSONB
  cannot hold ``-0.0``, so such values are recorded there and restored on read.
  Strings holding U+0000 or U+0001 are stored escaped on SQLite and PostgreSQL
  by an order-preserving code (:func:`escape_text`), so they compare exactly.
* ``ptutils_blobs(collection, blob_id, chunk, nchunks, size, data)``: blobs in
  4 MiB chunks (smaller if MariaDB's ``max_allowed_packet`` asks for it), all
  written in one transaction, so readers see a whole blob or none.

Queries (:mod:`ptutils.query` nodes) are rendered to SQL expressions with every
value and JSON path bound as a parameter; filter, sort, skip and limit run in the
database.  The kind of a value (missing, null, integer, float, string, bool,
array/object) is read with ``json_type`` (SQLite), ``jsonb_typeof`` (PostgreSQL)
or ``JSON_TYPE`` (MariaDB) so that ``true != 1``, ``null`` matches missing, and
orderings compare one kind only.  Numbers are compared exactly: stored integers
as integers and stored floats as doubles, each against a bound obtained from the
query value (see :func:`_int_plan` / :func:`_float_plan`), so ``2**53 + 1`` never
equals ``2**53``.  Sorting uses a rank per kind (missing < null < numbers <
strings < booleans < arrays/objects) and then the value, strings in code point
order (``COLLATE "C"``, ``utf8mb4_nopad_bin``, SQLite's BINARY), ties by id.

Every operation is one transaction: updates read the row with ``SELECT ... FOR
UPDATE`` (``BEGIN IMMEDIATE`` on SQLite), apply :func:`ptutils.query.apply_update`
and write it back.  Reads made of one SELECT (``load``, ``count``,
``load_from_ids``) are atomic by themselves and run without BEGIN/COMMIT round
trips.  A pooled connection idle for more than :data:`PING_AFTER_IDLE_S` is
pinged before use and replaced if the server dropped it; transient failures
(disconnects, deadlocks, a busy SQLite file) are retried with exponential
backoff, and :class:`BackendUnavailableError` is raised after the last retry.
A failure while committing a write is never retried (its outcome is unknown)
and is reported as BackendUnavailableError saying so.
"""

from __future__ import annotations

import abc
import decimal
import functools
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql as mysql_types
from sqlalchemy.dialects import postgresql as pg_types
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.pool import StaticPool

from ptutils.codec import Untagged, untagged_json
from ptutils.database import DEFAULT_COLLECTION, DBInterface
from ptutils.errors import (
    BackendUnavailableError,
    CodecError,
    CorruptionError,
    DocumentTooLargeError,
    NotFoundError,
    SchemaVersionError,
    StorageError,
)
from ptutils.query import (
    COMPARE,
    And,
    Compare,
    Exists,
    Node,
    Or,
    Path,
    Update,
    apply_update,
    project,
)

log = logging.getLogger("ptutils")

SCHEMA_VERSION = 1
"""Version of the table layout written by this module (stored in ``ptutils_meta``)."""
INDEXED_FIELDS = ("session_id", "state", "parent_id")
"""Top-level string fields mirrored into indexed generated columns."""
INDEXED_MAX_CHARS = 255
BLOB_CHUNK = 4 * 1024 * 1024
DOCS_TABLE, BLOBS_TABLE, META_TABLE = "ptutils_documents", "ptutils_blobs", "ptutils_meta"

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TWO_53 = 2**53
_IN_BATCH = 500
PING_AFTER_IDLE_S = 1.0
"""A pooled server connection idle for longer than this is pinged at checkout (one in use is known alive)."""
_PG_SCHEMA_LOCK = 0x70747574696C73  # "ptutils": the advisory lock held while creating the tables
_T = TypeVar("_T")


# --------------------------------------------------------------------------- numbers
def _int_plan(op: str, value: float) -> bool | tuple[str, int]:
    """How stored 64-bit integers ``x`` satisfy ``x <op> value``: always/never, or an exact int comparison."""
    if isinstance(value, float):
        if value.is_integer():
            value = int(value)
        elif op == "$eq":
            return False
        elif op in ("$gt", "$gte"):
            op, value = "$gte", math.ceil(value)
        else:
            op, value = "$lte", math.floor(value)
    if value > _INT64_MAX:
        return op in ("$lt", "$lte")
    if value < _INT64_MIN:
        return op in ("$gt", "$gte")
    return op, int(value)


def _float_plan(op: str, value: float) -> bool | tuple[str, float]:
    """How stored finite doubles ``d`` satisfy ``d <op> value``: always/never, or an exact double comparison."""
    if isinstance(value, float):
        return op, value
    near = float(value)  # value is a 64-bit int: always finite
    if near == value:
        return op, near
    if op == "$eq":
        return False
    low, high = (near, math.nextafter(near, math.inf)) if near < value else (math.nextafter(near, -math.inf), near)
    return ("$gte", high) if op in ("$gt", "$gte") else ("$lte", low)


def _compare(expr: Any, op: str, value: Any) -> sa.ColumnElement[bool]:
    return COMPARE[op](expr, value)


# --------------------------------------------------------------------------- JSON text
_PG_CARE = re.compile(r"[0-9][eE]|-0\.0|\\u000[01]")
_SQLITE_CARE = re.compile(r"\\u000[01]")
_MYSQL_CARE = re.compile(r'[0-9][eE]|"[-~]')
_ESCAPED = re.compile("\x01([\x01\x02])")


def escape_text(value: str) -> str:
    """A string as stored on SQLite and PostgreSQL: U+0000 -> U+0001 U+0001, U+0001 -> U+0001 U+0002.

    SQLite's JSON functions end a string at U+0000 and PostgreSQL cannot hold it
    at all.  This code is injective and keeps code point order (U+0001 starts
    both two-character codes, every other character stands for itself, and no
    code is a prefix of another), so comparing escaped strings is comparing the
    originals; query values are escaped the same way and reads undo it.
    """
    if "\x00" not in value and "\x01" not in value:
        return value
    return value.replace("\x01", "\x01\x02").replace("\x00", "\x01\x01")


def _unescape_text(value: str) -> str:
    return _ESCAPED.sub(lambda m: "\x00" if m.group(1) == "\x01" else "\x01", value)


def _unescape_values(value: Any) -> Any:
    if isinstance(value, str):
        return _unescape_text(value) if "\x01" in value else value
    if isinstance(value, dict):
        return {k: _unescape_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unescape_values(v) for v in value]
    return value


def mysql_key(key: str) -> str:
    """How a key is stored on MariaDB/MySQL: their JSON paths cannot address keys starting with '-'.

    Such keys (and, to keep the mapping reversible, keys starting with '~') get a
    '~' prefix in the stored JSON and in query paths; reads strip it again.
    """
    return "~" + key if key[:1] in ("-", "~") else key


def _unmap_mysql_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {(k[1:] if k[:1] == "~" else k): _unmap_mysql_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unmap_mysql_keys(v) for v in value]
    return value


def _positional(value: float) -> str:
    """A float as decimal digits with a point (PostgreSQL's numeric drops exponents and so float-ness)."""
    text = repr(value)
    if "e" not in text and "E" not in text:
        return text
    text = format(decimal.Decimal(text), "f")
    return text if "." in text else text + ".0"


def _with_point(value: float) -> str:
    """A float's repr that always has a decimal point (``1e+16`` -> ``1.0e+16``)."""
    text = repr(value)
    return text if "." in text else text.replace("e", ".0e", 1)


def _dump_slow(value: Any, style: str, fixups: list, path: list) -> str:
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(
                json.dumps(mysql_key(k) if style == "mysql" else k, ensure_ascii=False)
                + ":"
                + _dump_slow(v, style, fixups, path + [k])
                for k, v in value.items()
            )
            + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(_dump_slow(v, style, fixups, path + [i]) for i, v in enumerate(value)) + "]"
    if isinstance(value, float):
        if style == "postgresql":
            if value == 0 and math.copysign(1.0, value) < 0:
                fixups.append([path, value])
            return _positional(value)
        return _with_point(value) if style == "mysql" else repr(value)
    if isinstance(value, str) and style != "mysql":
        value = escape_text(value)
    return json.dumps(value, ensure_ascii=False)


def _dump_body(body: dict, style: str) -> tuple[str, str | None]:
    """JSON text of a stored body for a dialect, and the PostgreSQL fixups (or None)."""
    try:
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StorageError(f"document is not plain JSON after encoding: {exc}") from exc
    care = {"postgresql": _PG_CARE, "mysql": _MYSQL_CARE}.get(style, _SQLITE_CARE)
    if not care.search(text):
        return text, None
    fixups: list = []
    text = _dump_slow(body, style, fixups, [])
    return text, (json.dumps(fixups) if fixups else None)


def _load_body(text: Any, fixups: str | None, style: str) -> dict:
    body = json.loads(text)
    if style == "mysql" and '"~' in text:
        body = _unmap_mysql_keys(body)
    elif style != "mysql" and "\\u0001" in text:
        body = _unescape_values(body)
    if fixups:
        for path, value in json.loads(fixups):
            cur = body
            for part in path[:-1]:
                cur = cur[part]
            cur[path[-1]] = value
    return body


# --------------------------------------------------------------------------- fields
class _Field(abc.ABC):
    """SQL expressions for the value at one path of a document.

    Every predicate is two-valued (never SQL NULL), so NOT works; the value
    expressions are only meaningful (and only evaluated, through CASE guards
    where a cast could fail) under their kind's predicate.
    """

    @abc.abstractmethod
    def is_missing(self) -> sa.ColumnElement[bool]:
        """The path does not resolve (absent key, or a prefix that is not an object)."""

    @abc.abstractmethod
    def is_null(self) -> sa.ColumnElement[bool]:
        """The value is JSON null."""

    @abc.abstractmethod
    def is_int(self) -> sa.ColumnElement[bool]:
        """The value is a number stored as an integer."""

    @abc.abstractmethod
    def is_float(self) -> sa.ColumnElement[bool]:
        """The value is a number stored as a double."""

    @abc.abstractmethod
    def is_string(self) -> sa.ColumnElement[bool]:
        """The value is a string."""

    @abc.abstractmethod
    def is_bool(self, value: bool) -> sa.ColumnElement[bool]:
        """The value is the boolean ``value``."""

    @abc.abstractmethod
    def int_value(self) -> Any:
        """The integer (exact) where :meth:`is_int` holds."""

    @abc.abstractmethod
    def float_value(self) -> Any:
        """The double where :meth:`is_float` holds."""

    @abc.abstractmethod
    def str_compare(self, op: str, value: str) -> sa.ColumnElement[bool]:
        """The value is a string and compares to ``value`` in code point order."""

    @abc.abstractmethod
    def sort_keys(self) -> list[Any]:
        """ORDER BY keys giving the ptutils order (kind rank first)."""


class _Constant(_Field):
    """A path that is missing in every document (e.g. ``_id.x``)."""

    def is_missing(self):
        return sa.true()

    def is_null(self):
        return sa.false()

    is_int = is_float = is_string = is_null

    def is_bool(self, value):
        return sa.false()

    def int_value(self):
        return sa.null()

    float_value = int_value

    def str_compare(self, op, value):
        return sa.false()

    def sort_keys(self):
        return []


class _IdField(_Constant):
    """``_id``: the id column, always an ASCII string (binary collation on every dialect)."""

    def __init__(self, column: Any, style: str):
        self.column, self.style = column, style

    def is_missing(self):
        return sa.false()

    def is_string(self):
        return sa.true()

    def str_compare(self, op, value):
        if self.style == "mysql" and not value.isascii():
            # The column is ASCII: MariaDB refuses to compare it with other text unless converted.
            column = sa.collate(sa.cast(self.column, mysql_types.CHAR(128, charset="utf8mb4")), _MySQLField.COLLATION)
            return _compare(column, op, value)
        return _compare(self.column, op, value if self.style == "mysql" else escape_text(value))

    def sort_keys(self):
        return [self.column]


class _VersionField(_Constant):
    """``_version``: the version column, always an integer."""

    def __init__(self, column: Any):
        self.column = column

    def is_missing(self):
        return sa.false()

    def is_int(self):
        return sa.true()

    def int_value(self):
        return self.column

    def sort_keys(self):
        return [self.column]


def _rank(kinds: list[tuple[sa.ColumnElement[bool], int]]) -> Any:
    return sa.case(*kinds, else_=5)


class _SQLiteField(_Field):
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
        return sa.and_(self.is_string(), _compare(self.value, op, escape_text(value)))

    def sort_keys(self):
        rank = _rank(
            [
                (self.kind == "missing", 0),
                (self.kind == "null", 1),
                (self.kind.in_(("integer", "real")), 2),
                (self.kind == "text", 3),
                (self.kind.in_(("true", "false")), 4),
            ]
        )
        scalar = sa.case((self.kind.in_(("integer", "real", "text", "true", "false")), self.value))
        return [rank, scalar]


_PG_INDEX_LIKE = re.compile(r"\s*[+-]?[0-9]+")


class _PostgresField(_Field):
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
            if _PG_INDEX_LIKE.fullmatch(path[i])
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
        return sa.and_(self.is_string(), _compare(sa.collate(self.text, "C"), op, escape_text(value)))

    def sort_keys(self):
        rank = _rank(
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
            (sa.and_(sa.func.scale(self.number) == 0, sa.func.abs(self.number) > _TWO_53), self.number - half - half),
            else_=0,
        )
        text = sa.collate(sa.case((self.kind.in_(("string", "boolean")), self.text)), "C")
        return [rank, as_double, remainder, text]


class _MySQLField(_Field):
    """MariaDB/MySQL: ``JSON_EXTRACT``/``JSON_VALUE`` with a bound ``$."seg"`` path and ``JSON_TYPE``.

    Floats are always written with a decimal point, which tells them from
    integers (``JSON_TYPE`` calls ``1e+16`` an INTEGER).
    """

    COLLATION = "utf8mb4_nopad_bin"

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
        return sa.and_(self.is_string(), _compare(sa.collate(self.text, self.COLLATION), op, value))

    def sort_keys(self):
        rank = _rank(
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
        beyond = sa.or_(exact > _TWO_53, exact < -_TWO_53)  # not abs(): abs(-2**63) overflows BIGINT
        remainder = sa.case((sa.and_(self.is_int(), beyond), exact - half - half), else_=0)
        text = sa.collate(sa.case((self.kind.in_(("STRING", "BOOLEAN")), self.text)), self.COLLATION)
        return [rank, as_double, remainder, text]


# --------------------------------------------------------------------------- query rendering
class _Renderer:
    """Turns :mod:`ptutils.query` nodes into a SQLAlchemy boolean expression for one dialect."""

    def __init__(self, schema: _Schema):
        self.schema = schema
        self.docs = schema.docs

    def field(self, path: Path) -> _Field:
        if path[0] == "_id":
            return _IdField(self.docs.c.id, self.schema.style) if len(path) == 1 else _Constant()
        if path[0] == "_version":
            return _VersionField(self.docs.c.version) if len(path) == 1 else _Constant()
        body = self.docs.c.body
        if self.schema.style == "postgresql":
            return _PostgresField(body, path)
        if self.schema.style == "mysql":
            return _MySQLField(body, path)
        return _SQLiteField(body, path)

    def render(self, node: Node) -> sa.ColumnElement[bool]:
        if isinstance(node, And):
            return sa.and_(sa.true(), *(self.render(c) for c in node.clauses))
        if isinstance(node, Or):
            return sa.or_(*(self.render(c) for c in node.clauses))
        field = self.field(node.path)
        if isinstance(node, Exists):
            return sa.not_(field.is_missing()) if node.exists else field.is_missing()
        op, value = node.op, node.value
        if op == "$eq":
            return self.equal(node.path, field, value)
        if op == "$ne":
            return sa.not_(self.equal(node.path, field, value))
        if op in ("$in", "$nin"):
            matched = self.any_of(node.path, field, list(value))
            return matched if op == "$in" else sa.not_(matched)
        if isinstance(value, str):
            return field.str_compare(op, value)
        return self.number(field, op, value)

    def equal(self, path: Path, field: _Field, value: Any) -> sa.ColumnElement[bool]:
        if value is None:
            return sa.or_(field.is_missing(), field.is_null())
        if isinstance(value, bool):
            return field.is_bool(value)
        if isinstance(value, str):
            column = self.indexed_column(path, value)
            return column == self.schema.text_param(value) if column is not None else field.str_compare("$eq", value)
        return self.number(field, "$eq", value)

    def any_of(self, path: Path, field: _Field, values: list) -> sa.ColumnElement[bool]:
        indexed: list[str] = []
        clauses = []
        for value in values:
            if isinstance(value, str) and self.indexed_column(path, value) is not None:
                indexed.append(value)
            else:
                clauses.append(self.equal(path, field, value))
        if indexed:
            column = self.docs.c[path[0]]
            clauses.append(column.in_([self.schema.text_param(v) for v in indexed]))
        return sa.or_(sa.false(), *clauses)

    def indexed_column(self, path: Path, value: str) -> Any:
        """The generated column answering ``path == value`` exactly, if there is one."""
        if len(path) == 1 and path[0] in INDEXED_FIELDS and len(self.schema.stored_text(value)) <= INDEXED_MAX_CHARS:
            return self.docs.c[path[0]]
        return None

    @staticmethod
    def number(field: _Field, op: str, value: float) -> sa.ColumnElement[bool]:
        clauses = []
        for plan, kind, current in (
            (_int_plan(op, value), field.is_int, field.int_value),
            (_float_plan(op, value), field.is_float, field.float_value),
        ):
            if plan is True:
                clauses.append(kind())
            elif plan:
                clauses.append(sa.and_(kind(), _compare(current(), plan[0], plan[1])))
        return sa.or_(sa.false(), *clauses)

    def order_by(self, sort: list[tuple[Path, int]]) -> list[Any]:
        keys: list[Any] = []
        for path, direction in sort:
            for key in self.field(path).sort_keys():
                keys.append(key.desc() if direction < 0 else key.asc())
        keys.append(self.docs.c.id.asc())
        return keys


# --------------------------------------------------------------------------- schema
class _Schema:
    """The tables of one dialect (column types, collations and generated columns differ)."""

    def __init__(self, style: str):
        self.style = style
        self.metadata = sa.MetaData()
        if style == "postgresql":
            name_type: Any = sa.String(63, collation="C")
            id_type: Any = sa.String(128, collation="C")
            body_type: Any = pg_types.JSONB
            text_type: Any = sa.Text
            blob_type: Any = pg_types.BYTEA
            generated = (
                "CASE WHEN jsonb_typeof(body -> '{f}') = 'string' AND length(body ->> '{f}') <= {n} "
                "THEN body ->> '{f}' END"
            )
            gen_type: Any = sa.Text
            persisted = True
        elif style == "mysql":
            name_type = mysql_types.VARCHAR(63, charset="ascii", collation="ascii_bin")
            id_type = mysql_types.VARCHAR(128, charset="ascii", collation="ascii_bin")
            body_type = mysql_types.LONGTEXT(charset="utf8mb4", collation="utf8mb4_bin")
            text_type = mysql_types.LONGTEXT(charset="utf8mb4", collation="utf8mb4_bin")
            blob_type = mysql_types.LONGBLOB
            generated = (
                "CASE WHEN JSON_TYPE(JSON_EXTRACT(body, '$.{f}')) = 'STRING' "
                "AND CHAR_LENGTH(JSON_VALUE(body, '$.{f}')) <= {n} THEN JSON_VALUE(body, '$.{f}') END"
            )
            gen_type = mysql_types.VARCHAR(INDEXED_MAX_CHARS, charset="utf8mb4", collation=_MySQLField.COLLATION)
            persisted = False
        else:
            name_type, id_type, body_type, text_type, blob_type = sa.Text, sa.Text, sa.Text, sa.Text, sa.LargeBinary
            generated = (
                "CASE WHEN json_type(body, '$.{f}') = 'text' AND length(json_extract(body, '$.{f}')) <= {n} "
                "THEN json_extract(body, '$.{f}') END"
            )
            gen_type = sa.Text
            persisted = False
        options = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"} if style == "mysql" else {}
        self.docs = sa.Table(
            DOCS_TABLE,
            self.metadata,
            sa.Column("collection", name_type, primary_key=True),
            sa.Column("id", id_type, primary_key=True),
            sa.Column("version", sa.BigInteger, nullable=False),
            sa.Column("body", body_type, nullable=False),
            sa.Column("fixups", text_type, nullable=True),
            *(
                sa.Column(f, gen_type, sa.Computed(generated.format(f=f, n=INDEXED_MAX_CHARS), persisted=persisted))
                for f in INDEXED_FIELDS
            ),
            **options,
        )
        for f in INDEXED_FIELDS:
            sa.Index(f"ix_{DOCS_TABLE}_{f}", self.docs.c.collection, self.docs.c[f], self.docs.c.id)
        self.blobs = sa.Table(
            BLOBS_TABLE,
            self.metadata,
            sa.Column("collection", name_type, primary_key=True),
            sa.Column("blob_id", id_type, primary_key=True),
            sa.Column("chunk", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("nchunks", sa.Integer, nullable=False),
            sa.Column("size", sa.BigInteger, nullable=False),
            sa.Column("data", blob_type, nullable=False),
            **options,
        )
        self.meta = sa.Table(
            META_TABLE,
            self.metadata,
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("value", sa.String(255), nullable=False),
            **options,
        )
        self.renderer = _Renderer(self)
        self._lookups: dict[tuple, sa.Select] = {}
        self._prepare_statements()

    def _prepare_statements(self) -> None:
        """Statements of the by-id operations, built once (values are bound at execution)."""
        docs = self.docs
        collection, doc_id = sa.bindparam("c_", type_=sa.Text), sa.bindparam("i_", type_=sa.Text)
        body: Any = sa.bindparam("b_", type_=sa.Text)
        if self.style == "postgresql":
            body = sa.cast(body, pg_types.JSONB)
        self.columns = [docs.c.id, docs.c.version, self.body_column(), docs.c.fixups]
        key = sa.and_(docs.c.collection == collection, docs.c.id == doc_id)
        self.select_row = sa.select(*self.columns).where(key)
        if self.style != "sqlite":
            self.select_row = self.select_row.with_for_update()
        self.select_ids = sa.select(*self.columns).where(
            docs.c.collection == collection, docs.c.id.in_(sa.bindparam("ids_", expanding=True))
        )
        values = {"version": sa.bindparam("v_", type_=sa.BigInteger), "body": body, "fixups": sa.bindparam("f_")}
        self.update_row = sa.update(docs).where(key).values(**values)
        values.update(collection=collection, id=doc_id)
        if self.style in ("postgresql", "sqlite"):
            insert = pg_insert if self.style == "postgresql" else sqlite_insert
            self.insert_row = insert(docs).values(**values).on_conflict_do_nothing(index_elements=["collection", "id"])
            if self.style == "postgresql":
                self.insert_row = self.insert_row.returning(docs.c.version)
        else:
            self.insert_row = sa.insert(docs).values(**values)

    def lookup_statement(self, fields: tuple[str, ...], count: bool) -> sa.Select:
        """SELECT (or COUNT) of a collection's documents whose indexed ``fields`` equal bound ``q<k>_`` values."""
        key = (fields, count)
        stmt = self._lookups.get(key)
        if stmt is None:
            where = [self.docs.c.collection == sa.bindparam("c_", type_=sa.Text)]
            where += [self.docs.c[f] == sa.bindparam(f"q{k}_", type_=sa.Text) for k, f in enumerate(fields)]
            if count:
                stmt = sa.select(sa.func.count()).select_from(self.docs).where(*where)
            else:
                stmt = sa.select(*self.columns).where(*where).order_by(self.docs.c.id)
            self._lookups[key] = stmt
        return stmt

    def stored_text(self, value: str) -> str:
        """A string as this dialect stores it (see :func:`escape_text`)."""
        return value if self.style == "mysql" else escape_text(value)

    def text_param(self, value: str) -> Any:
        return sa.literal(self.stored_text(value), sa.Text)

    def body_column(self) -> Any:
        """The body column as selected: JSON text on every dialect."""
        if self.style == "postgresql":
            return sa.cast(self.docs.c.body, sa.Text)
        return self.docs.c.body


# --------------------------------------------------------------------------- errors
_PG_TRANSIENT_CLASSES = ("08", "40", "53")
_PG_TRANSIENT_STATES = {"57P01", "57P02", "57P03"}
_MYSQL_TRANSIENT = {1040, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055, 4031}
_MYSQL_TOO_LARGE = {1153, 1301}


def _error_code(exc: sa.exc.DBAPIError) -> Any:
    """The MySQL error number (an int) or the PostgreSQL SQLSTATE (a str), if any."""
    orig = exc.orig
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return getattr(orig, "sqlstate", None) or None


def _is_transient(exc: sa.exc.DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    code = _error_code(exc)
    if isinstance(code, str):
        return code[:2] in _PG_TRANSIENT_CLASSES or code in _PG_TRANSIENT_STATES
    if isinstance(code, int):
        return code in _MYSQL_TRANSIENT
    message = str(exc.orig).lower()
    if "database is locked" in message or "database table is locked" in message or "database is busy" in message:
        return True
    return isinstance(exc, sa.exc.OperationalError) and exc.orig.__class__.__module__.startswith("psycopg")


def _is_too_large(exc: sa.exc.DBAPIError) -> bool:
    code = _error_code(exc)
    if code == "54000" or code in _MYSQL_TOO_LARGE:
        return True
    return "too big" in str(exc.orig).lower()


class _RetryOperation(Exception):
    """Raised inside a transaction to run the whole operation again (a lost insert race)."""


# --------------------------------------------------------------------------- the interface
def normalise_url(url: str | sa.URL) -> sa.URL:
    parsed = sa.make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    backend = backend.lower()
    if backend in ("postgres", "postgresql"):
        return parsed.set(drivername=f"postgresql+{driver or 'psycopg'}")
    if backend in ("mysql", "mariadb"):
        parsed = parsed.set(drivername=f"{backend}+{driver or 'pymysql'}")
        if "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        return parsed
    if backend == "sqlite":
        return parsed
    raise StorageError(f"SQLInterface does not handle {parsed.drivername!r} URLs")


class _Shared:
    """What an interface shares with its sibling collections: engine, schema, settings."""

    def __init__(self, url: sa.URL, retries: int, retry_backoff: float, chunk: int | None, engine_options: dict):
        self.url = url
        self.style = {"postgresql": "postgresql", "sqlite": "sqlite"}.get(url.get_backend_name(), "mysql")
        self.schema = _Schema(self.style)
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.chunk = chunk or BLOB_CHUNK
        self.max_packet: int | None = None
        self.ready = False
        self.closed = False
        self.lock = threading.Lock()
        self.engine = self._create_engine(engine_options)
        self.read_engine = self.engine.execution_options(ptutils_single_read=True)
        self.write_engine = self.engine.execution_options(ptutils_write=True)

    def _create_engine(self, engine_options: dict) -> sa.Engine:
        options: dict[str, Any] = {}
        connect_args: dict[str, Any] = {}
        if self.style == "sqlite":
            database = self.url.database or ""
            memory = database in ("", ":memory:") or "mode=memory" in database
            connect_args.update(timeout=30, check_same_thread=False)
            if memory:
                options["poolclass"] = StaticPool
            elif not database.startswith("file:"):
                directory = os.path.dirname(os.path.abspath(database))
                os.makedirs(directory, exist_ok=True)
        elif self.style == "postgresql":
            connect_args["connect_timeout"] = 10
        else:
            options["isolation_level"] = "READ COMMITTED"
            connect_args["connect_timeout"] = 10
        options["connect_args"] = {**connect_args, **engine_options.pop("connect_args", {})}
        options.update(engine_options)
        engine = sa.create_engine(self.url, **options)
        if self.style == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_on_connect)
            sa.event.listen(engine, "begin", _sqlite_on_begin)  # a file has no connection to lose: no ping
        elif not options.get("pool_pre_ping"):  # unless the caller asked for a ping at every checkout
            sa.event.listen(engine, "checkin", _note_checkin)
            sa.event.listen(engine, "checkout", functools.partial(_ping_if_idle, engine.dialect))
        return engine


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


def _sqlite_on_connect(dbapi_connection: Any, record: Any) -> None:
    """Let SQLAlchemy's begin event emit BEGIN itself (pysqlite's implicit transactions off); use WAL."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        if cursor.execute("PRAGMA journal_mode").fetchone()[0] not in ("wal", "memory"):
            cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
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
        return self._shared.style

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
                if _is_too_large(exc):
                    raise DocumentTooLargeError(f"{self._where()}: {exc.orig}") from exc
                if not _is_transient(exc):
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
                    if not _is_transient(exc) or attempt >= shared.retries:
                        kind = BackendUnavailableError if _is_transient(exc) else StorageError
                        raise kind(f"{self._where()}: cannot set up the ptutils tables: {exc.orig}") from exc
                    time.sleep(shared.retry_backoff * (2**attempt))
                    attempt += 1
            shared.ready = True

    def _stored_version(self, conn: sa.Connection) -> Any:
        """The schema_version row, or None when the tables do not exist yet."""
        meta = self._shared.schema.meta
        if not sa.inspect(conn).has_table(META_TABLE):
            return None
        return conn.execute(sa.select(meta.c.value).where(meta.c.name == "schema_version")).scalar()

    def _create_or_check_schema(self) -> None:
        """Check the stored schema version; create the tables (under a lock) if there are none."""
        shared, schema = self._shared, self._shared.schema
        with shared.engine.connect() as conn:
            if shared.style == "mysql":
                shared.max_packet = int(conn.execute(sa.text("SELECT @@max_allowed_packet")).scalar())
                shared.chunk = min(shared.chunk, max(64 * 1024, shared.max_packet // 3))
            stored = self._stored_version(conn)
            conn.rollback()
            if stored is not None:
                self._check_version(stored)
                return
            conn.execution_options(ptutils_write=True)
            if shared.style == "mysql":
                # DDL commits implicitly on MariaDB/MySQL, so a session-level named lock serialises setup.
                conn.execute(sa.select(sa.func.get_lock("ptutils_schema", 60))).scalar()
                conn.commit()
            try:
                with conn.begin():
                    if shared.style == "postgresql":
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_SCHEMA_LOCK)))
                    stored = self._stored_version(conn)
                    if stored is not None:
                        self._check_version(stored)
                        return
                    schema.metadata.create_all(conn)
                    conn.execute(sa.insert(schema.meta).values(name="schema_version", value=str(SCHEMA_VERSION)))
                    log.info(
                        "ptutils: created the ptutils tables (schema version %d) in %s", SCHEMA_VERSION, self._where()
                    )
            finally:
                if shared.style == "mysql":
                    conn.execute(sa.select(sa.func.release_lock("ptutils_schema"))).scalar()
                    conn.commit()

    def _check_version(self, stored: Any) -> None:
        try:
            version = int(stored)
        except (TypeError, ValueError):
            raise SchemaVersionError(
                f"{self._where()}: table {META_TABLE} has no readable schema_version ({stored!r})"
            ) from None
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self._where()}: the ptutils tables have schema version {version}, newer than version "
                f"{SCHEMA_VERSION} that this ptutils understands; upgrade ptutils to use this database"
            )
        if version < 1:
            raise SchemaVersionError(f"{self._where()}: unknown ptutils schema version {version}")

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
        doc.update(_load_body(text, row[3], self._shared.style))
        return doc

    def _body_values(self, body: dict) -> dict[str, Any]:
        """Bound values of a stored body: ``b_`` (JSON text) and ``f_`` (PostgreSQL fixups)."""
        shared = self._shared
        clean = {k: v for k, v in body.items() if k not in ("_id", "_version")}
        text, fixups = _dump_body(clean, shared.style)
        if shared.max_packet is not None and len(text) > shared.max_packet // 4:
            import pymysql.converters

            size = len(pymysql.converters.escape_string(text).encode("utf-8")) + 4096
            if size > shared.max_packet:
                raise DocumentTooLargeError(
                    f"{self._where()}: the document needs {size} bytes in one statement, over MariaDB's "
                    f"max_allowed_packet of {shared.max_packet}; store large values as arrays/bytes (blobs)"
                )
        return {"b_": text, "f_": fixups}

    def _locked_row(self, conn: sa.Connection, doc_id: str) -> Any:
        return conn.execute(self._shared.schema.select_row, {"c_": self.collection_name, "i_": doc_id}).first()

    def _insert_new(self, conn: sa.Connection, doc_id: str, values: dict) -> bool:
        """Insert version 1 of ``doc_id``; False if it already exists (nothing written)."""
        shared = self._shared
        params = {"c_": self.collection_name, "i_": doc_id, "v_": 1, **values}
        if shared.style == "postgresql":
            return conn.execute(shared.schema.insert_row, params).first() is not None
        if shared.style == "sqlite":
            return conn.execute(shared.schema.insert_row, params).rowcount == 1  # 0: the id exists
        try:
            conn.execute(shared.schema.insert_row, params)
        except sa.exc.IntegrityError as exc:
            if _error_code(exc) == 1062:
                return False
            raise
        return True

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
        return sa.select(*self._columns()).where(self._key(), schema.renderer.render(query))

    def find_statement(self, query: Node, sort: list[tuple[Path, int]], limit: int | None, skip: int) -> sa.Select:
        """The SELECT that :meth:`load` runs for parsed ``query``/``sort`` (for inspection and tests)."""
        stmt = self._select(query).order_by(*self._shared.schema.renderer.order_by(sort))
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
                and self._shared.schema.renderer.indexed_column(clause.path, clause.value) is not None
            ):
                return None
            fields.append(clause.path[0])
            params[f"q{k}_"] = self._shared.schema.stored_text(clause.value)
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
            where = sa.and_(self._key(), schema.renderer.render(query))
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
        return self._delete_returning(self._shared.schema.renderer.render(query))

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
            if shared.style == "mysql":
                for row in rows:
                    conn.execute(sa.insert(blobs), row)
            else:
                conn.execute(sa.insert(blobs), rows)

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
