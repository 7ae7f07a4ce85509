"""The value at one path of a document, as SQL expressions: what each dialect implements for the renderer.

A :class:`Field` reads the kind of the value (missing, null, integer, float,
string, bool, array/object) so that ``true != 1``, ``null`` matches missing and
orderings compare one kind only.  Each dialect module has its own body field
(``json_type`` on SQLite, ``jsonb_typeof`` on PostgreSQL, ``JSON_TYPE`` on
MariaDB); this module holds the interface and the fields that read a column
rather than the body (``_id``, ``_version``) or nothing at all.

Sorting uses a rank per kind (missing < null < numbers < strings < booleans <
arrays/objects, see :func:`rank`) and then the value, strings in code point order.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from ptutils.query import COMPARE

TWO_53 = 2**53
"""Integers beyond this may share a double with their neighbours: sort keys order them by their remainder."""


def compare(expr: Any, op: str, value: Any) -> sa.ColumnElement[bool]:
    """``expr <op> value`` for a comparison operator of :mod:`ptutils.query` (``$eq``, ``$lt``, ...)."""
    return COMPARE[op](expr, value)


def rank(kinds: list[tuple[sa.ColumnElement[bool], int]]) -> Any:
    """The sort rank of a value from ``(kind predicate, rank)`` pairs; arrays and objects (the rest) rank 5."""
    return sa.case(*kinds, else_=5)


class Field(abc.ABC):
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


class Constant(Field):
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


class IdField(Constant):
    """``_id``: the id column, always an ASCII string (binary collation on every dialect).

    ``stored`` turns a query string into the form the dialect stores (see
    :meth:`ptutils.backends.sql.text.BodyText.stored`).
    """

    def __init__(self, column: Any, stored: Callable[[str], str]):
        self.column, self.stored = column, stored

    def is_missing(self):
        return sa.false()

    def is_string(self):
        return sa.true()

    def str_compare(self, op, value):
        return compare(self.column, op, self.stored(value))

    def sort_keys(self):
        return [self.column]


class VersionField(Constant):
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
