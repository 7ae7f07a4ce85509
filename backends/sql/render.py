"""Query rendering: :mod:`ptutils.query` nodes to SQLAlchemy expressions over one dialect's tables.

Every value and JSON path is bound as a parameter; filter, sort, skip and limit
run in the database.  The renderer is dialect-blind: it asks the schema's
dialect for a :class:`~ptutils.backends.sql.fields.Field` per path and combines
the field's kind predicates, so ``true != 1``, ``null`` matches missing and
orderings compare one kind only.  Equality and ``$in`` on an indexed field use
its generated column.

Numbers are compared exactly: stored integers as integers and stored floats as
doubles, each against a bound obtained from the query value (see
:func:`int_plan` / :func:`float_plan`), so ``2**53 + 1`` never equals ``2**53``.
Sorting uses the fields' sort keys (kind rank, then value), ties by id.

Like the Mongo backend's renderer these are module functions: a query is
rendered against a target passed in (here the :class:`Schema`, which knows its
dialect), and nothing is kept between calls.
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa

from ptutils.query import And, Exists, Node, Or, Path

from .fields import Constant, Field, VersionField, compare
from .schema import INDEXED_FIELDS, INDEXED_MAX_CHARS, Schema

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------- numbers
def int_plan(op: str, value: float) -> bool | tuple[str, int]:
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


def float_plan(op: str, value: float) -> bool | tuple[str, float]:
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


# --------------------------------------------------------------------------- filters and sorts
def render_filter(node: Node, schema: Schema) -> sa.ColumnElement[bool]:
    """The boolean expression over ``schema.docs`` with exactly the semantics of :func:`ptutils.query.matches`."""
    if isinstance(node, And):
        return sa.and_(sa.true(), *(render_filter(c, schema) for c in node.clauses))
    if isinstance(node, Or):
        return sa.or_(*(render_filter(c, schema) for c in node.clauses))
    field = _field(node.path, schema)
    if isinstance(node, Exists):
        return sa.not_(field.is_missing()) if node.exists else field.is_missing()
    op, value = node.op, node.value
    if op == "$eq":
        return _equal(node.path, field, value, schema)
    if op == "$ne":
        return sa.not_(_equal(node.path, field, value, schema))
    if op in ("$in", "$nin"):
        matched = _any_of(node.path, field, list(value), schema)
        return matched if op == "$in" else sa.not_(matched)
    if isinstance(value, str):
        return field.str_compare(op, value)
    return _number(field, op, value)


def render_order(sort: list[tuple[Path, int]], schema: Schema) -> list[Any]:
    """ORDER BY keys for ``sort`` in the ptutils order, ties by id."""
    keys: list[Any] = []
    for path, direction in sort:
        for key in _field(path, schema).sort_keys():
            keys.append(key.desc() if direction < 0 else key.asc())
    keys.append(schema.docs.c.id.asc())
    return keys


def indexed_column(path: Path, value: str, schema: Schema) -> Any:
    """The generated column answering ``path == value`` exactly, if there is one."""
    if len(path) == 1 and path[0] in INDEXED_FIELDS and len(schema.dialect.text.stored(value)) <= INDEXED_MAX_CHARS:
        return schema.docs.c[path[0]]
    return None


def _field(path: Path, schema: Schema) -> Field:
    docs = schema.docs
    if path[0] == "_id":
        return schema.dialect.id_field(docs.c.id) if len(path) == 1 else Constant()
    if path[0] == "_version":
        return VersionField(docs.c.version) if len(path) == 1 else Constant()
    return schema.dialect.field(docs.c.body, path)


def _text_param(value: str, schema: Schema) -> Any:
    return sa.literal(schema.dialect.text.stored(value), sa.Text)


def _equal(path: Path, field: Field, value: Any, schema: Schema) -> sa.ColumnElement[bool]:
    if value is None:
        return sa.or_(field.is_missing(), field.is_null())
    if isinstance(value, bool):
        return field.is_bool(value)
    if isinstance(value, str):
        column = indexed_column(path, value, schema)
        return column == _text_param(value, schema) if column is not None else field.str_compare("$eq", value)
    return _number(field, "$eq", value)


def _any_of(path: Path, field: Field, values: list, schema: Schema) -> sa.ColumnElement[bool]:
    indexed: list[str] = []
    clauses = []
    for value in values:
        if isinstance(value, str) and indexed_column(path, value, schema) is not None:
            indexed.append(value)
        else:
            clauses.append(_equal(path, field, value, schema))
    if indexed:
        column = schema.docs.c[path[0]]
        clauses.append(column.in_([_text_param(v, schema) for v in indexed]))
    return sa.or_(sa.false(), *clauses)


def _number(field: Field, op: str, value: float) -> sa.ColumnElement[bool]:
    clauses = []
    for plan, kind, current in (
        (int_plan(op, value), field.is_int, field.int_value),
        (float_plan(op, value), field.is_float, field.float_value),
    ):
        if plan is True:
            clauses.append(kind())
        elif plan:
            clauses.append(sa.and_(kind(), compare(current(), plan[0], plan[1])))
    return sa.or_(sa.false(), *clauses)
