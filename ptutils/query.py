"""The Mongo-style query and update subset every backend understands.

Queries are parsed and validated once, here, into a small tree of nodes;
backends render that tree (SQL JSON functions, a Mongo filter, or
:meth:`Query.matches` for the embedded filesystem backend).  Anything outside
the subset (``$where``, ``$function``, ``$expr``, ``$regex`` ...) is rejected
with a :class:`~ptutils.errors.QueryError` naming the operator and its path.

Semantics (identical on every backend; the conformance suite pins them):

* Queries run on the *stored* (encoded) form of a document, so they compare JSON
  scalars: numbers (int and float compare by value), strings, booleans and null.
  ``true`` never equals ``1``.
* ``{"a": v}`` / ``$eq``: the value at path ``a`` has v's kind and equals it.
  ``{"a": None}`` matches a null *or missing* field, as in MongoDB.
* ``$ne`` / ``$nin`` are the negations of ``$eq`` / ``$in`` (so they match
  missing fields).
* ``$gt $gte $lt $lte`` take a number or a string and match values of the same
  kind only.
* ``$exists: true`` matches a present key, even if its value is null.
* Dotted paths walk nested objects; a path segment never indexes a list, and a
  comparison against a list or object value never matches (except negations).

Update documents: ``$set`` (dotted paths, objects created as needed),
``$unset``, ``$inc`` (numbers) and ``$push`` (append to a list, created if
absent).  A plain mapping without operators means ``$set`` of its keys.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import attrs

from .errors import QueryError

Scalar = Union[None, bool, int, float, str]
Path = tuple[str, ...]

COMPARISONS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin")
ORDERINGS = ("$gt", "$gte", "$lt", "$lte")
COMPARE = {"$eq": operator.eq, "$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}
"""The binary comparison of each operator, for values of one kind (Python values or SQL expressions)."""
UPDATE_OPERATORS = ("$set", "$unset", "$inc", "$push")
_MISSING = object()


@attrs.frozen
class Compare:
    """``path <op> value`` for one of :data:`COMPARISONS`; ``value`` is a list for $in/$nin."""

    path: Path
    op: str
    value: Any


@attrs.frozen
class Exists:
    """``path`` present (``exists=True``) or absent."""

    path: Path
    exists: bool


@attrs.frozen
class And:
    """All of ``clauses`` hold (an empty And matches everything)."""

    clauses: tuple["Node", ...]


@attrs.frozen
class Or:
    """At least one of ``clauses`` holds."""

    clauses: tuple["Node", ...]


Node = Union[Compare, Exists, And, Or]


def _kind(value: Any) -> str | None:
    """The comparison kind of a JSON value, or None for lists/objects."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _check_number(value: Any, where: str) -> None:
    """Refuse numbers no backend stores as a JSON number (non-finite, beyond 64 bits)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise QueryError(f"{where}: non-finite number {value!r} cannot be queried or added")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise QueryError(f"{where}: integer {value} is outside the 64-bit range stored as a number")


def _check_scalar(value: Any, where: str) -> Scalar:
    _check_number(value, where)
    if _kind(value) is None:
        raise QueryError(
            f"{where}: only JSON scalars (None, bool, int, float, str) can be compared, "
            f"got {type(value).__name__}"
        )
    return value


def _check_path(key: Any, where: str) -> Path:
    if not isinstance(key, str) or not key:
        raise QueryError(f"{where}: field names must be non-empty strings, got {key!r}")
    if key.startswith("$"):
        raise QueryError(f"{where}: unsupported operator {key!r} (supported: $and, $or)")
    parts = tuple(key.split("."))
    for part in parts:
        if not part or part.startswith("$") or "\x00" in part:
            raise QueryError(f"{where}: invalid path segment {part!r} in {key!r}")
    return parts


def _parse_field(path: Path, spec: Any, where: str) -> Node:
    if not (isinstance(spec, Mapping) and any(isinstance(k, str) and k.startswith("$") for k in spec)):
        return Compare(path, "$eq", _check_scalar(spec, where))
    clauses: list[Node] = []
    for op, operand in spec.items():
        at = f"{where}.{op}"
        if not isinstance(op, str) or not op.startswith("$"):
            raise QueryError(f"{where}: cannot mix operators and field names ({op!r})")
        if op == "$exists":
            if not isinstance(operand, bool):
                raise QueryError(f"{at}: expects true or false, got {operand!r}")
            clauses.append(Exists(path, operand))
        elif op in ("$in", "$nin"):
            if not isinstance(operand, (list, tuple)):
                raise QueryError(f"{at}: expects a list, got {type(operand).__name__}")
            values = tuple(_check_scalar(v, f"{at}[{i}]") for i, v in enumerate(operand))
            clauses.append(Compare(path, op, values))
        elif op in ORDERINGS:
            value = _check_scalar(operand, at)
            if _kind(value) not in ("number", "string"):
                raise QueryError(f"{at}: expects a number or a string, got {value!r}")
            clauses.append(Compare(path, op, value))
        elif op in ("$eq", "$ne"):
            clauses.append(Compare(path, op, _check_scalar(operand, at)))
        else:
            raise QueryError(f"{at}: unsupported operator {op!r}")
    return clauses[0] if len(clauses) == 1 else And(tuple(clauses))


def parse_query(query: Mapping[str, Any] | None, _where: str = "query") -> Node:
    """Validate a Mongo-style query and return its node tree."""
    if query is None:
        return And(())
    if isinstance(query, (And, Or, Compare, Exists)):
        return query
    if not isinstance(query, Mapping):
        raise QueryError(f"{_where}: a query is a mapping, got {type(query).__name__}")
    clauses: list[Node] = []
    for key, spec in query.items():
        where = f"{_where}.{key}"
        if key in ("$and", "$or"):
            if not isinstance(spec, (list, tuple)) or not spec:
                raise QueryError(f"{where}: expects a non-empty list of queries")
            subs = tuple(parse_query(s, f"{where}[{i}]") for i, s in enumerate(spec))
            clauses.append(And(subs) if key == "$and" else Or(subs))
        else:
            clauses.append(_parse_field(_check_path(key, _where), spec, where))
    return clauses[0] if len(clauses) == 1 else And(tuple(clauses))


def get_path(doc: Any, path: Sequence[str]) -> Any:
    """The value at ``path`` in nested mappings, or the module's missing sentinel."""
    cur = doc
    for part in path:
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def is_missing(value: Any) -> bool:
    """Whether :func:`get_path` found nothing."""
    return value is _MISSING


def _equal(actual: Any, expected: Scalar) -> bool:
    if expected is None:
        return actual is _MISSING or actual is None
    kind = _kind(expected)
    return actual is not _MISSING and _kind(actual) == kind and actual == expected


def _evaluate(node: Node, doc: Mapping[str, Any]) -> bool:
    if isinstance(node, And):
        return all(_evaluate(c, doc) for c in node.clauses)
    if isinstance(node, Or):
        return any(_evaluate(c, doc) for c in node.clauses)
    actual = get_path(doc, node.path)
    if isinstance(node, Exists):
        return (actual is not _MISSING) == node.exists
    op, value = node.op, node.value
    if op == "$eq":
        return _equal(actual, value)
    if op == "$ne":
        return not _equal(actual, value)
    if op == "$in":
        return any(_equal(actual, v) for v in value)
    if op == "$nin":
        return not any(_equal(actual, v) for v in value)
    if actual is _MISSING or _kind(actual) != _kind(value):
        return False
    return COMPARE[op](actual, value)


def matches(query: Mapping[str, Any] | Node | None, doc: Mapping[str, Any]) -> bool:
    """Evaluate a query against a stored (encoded) document in Python."""
    return _evaluate(parse_query(query), doc)


def parse_sort(sort: Any) -> list[tuple[Path, int]]:
    """Validate ``sort``: a field name, or a list of ``(field, 1 | -1)`` pairs."""
    if sort is None:
        return []
    if isinstance(sort, str):
        sort = [(sort, 1)]
    if isinstance(sort, Mapping):
        sort = list(sort.items())
    if not isinstance(sort, (list, tuple)):
        raise QueryError(f"sort: expects a field name or a list of (field, 1 | -1) pairs, got {sort!r}")
    out = []
    for item in sort:
        if isinstance(item, str):
            item = (item, 1)
        if not (isinstance(item, (list, tuple)) and len(item) == 2) or item[1] not in (1, -1):
            raise QueryError(f"sort: expects (field, 1 | -1) pairs, got {item!r}")
        out.append((_check_path(item[0], "sort"), int(item[1])))
    return out


_KIND_ORDER = {"missing": 0, "null": 1, "number": 2, "string": 3, "bool": 4}


def sort_key(doc: Mapping[str, Any], path: Path) -> tuple:
    """Order used by every backend: missing < null < numbers < strings < booleans."""
    value = get_path(doc, path)
    if value is _MISSING:
        return (0,)
    kind = _kind(value)
    if kind is None:
        return (5,)
    if kind == "null":
        return (1,)
    return (_KIND_ORDER[kind], value)


def sort_docs(docs: list[dict], sort: Any) -> list[dict]:
    """Sort documents in Python (stable, last key applied first)."""
    for path, direction in reversed(parse_sort(sort)):
        docs.sort(key=lambda d: sort_key(d, path), reverse=direction < 0)
    return docs


def parse_projection(projection: Iterable[str] | None) -> list[Path] | None:
    """Validate a projection: a list of dotted field paths to keep (``_id`` always kept)."""
    if projection is None:
        return None
    if isinstance(projection, (str, bytes)) or not isinstance(projection, Iterable):
        raise QueryError("projection: expects a list of field paths")
    return [_check_path(p, "projection") for p in projection]


def project(doc: Mapping[str, Any], paths: list[Path] | None) -> dict:
    """Keep only ``paths`` (and ``_id``) of a document."""
    if paths is None:
        return dict(doc)
    out: dict[str, Any] = {}
    if "_id" in doc:
        out["_id"] = doc["_id"]
    for path in paths:
        value = get_path(doc, path)
        if value is _MISSING:
            continue
        cur = out
        for part in path[:-1]:
            cur = cur.setdefault(part, {})
        cur[path[-1]] = value
    return out


@attrs.frozen
class Update:
    """A validated update: ``sets``/``incs``/``pushes`` map paths to values, ``unsets`` lists paths."""

    sets: tuple[tuple[Path, Any], ...] = ()
    unsets: tuple[Path, ...] = ()
    incs: tuple[tuple[Path, float], ...] = ()
    pushes: tuple[tuple[Path, Any], ...] = ()

    def paths(self) -> list[Path]:
        return [p for p, _ in self.sets] + list(self.unsets) + [p for p, _ in self.incs] + [
            p for p, _ in self.pushes
        ]


def parse_update(changes: Mapping[str, Any]) -> Update:
    """Validate an update document (see module doc); values stay as given."""
    if not isinstance(changes, Mapping) or not changes:
        raise QueryError("update: expects a non-empty mapping")
    if not any(isinstance(k, str) and k.startswith("$") for k in changes):
        changes = {"$set": changes}
    parts: dict[str, list] = {op: [] for op in UPDATE_OPERATORS}
    for op, fields in changes.items():
        if op not in UPDATE_OPERATORS:
            raise QueryError(f"update: unsupported operator {op!r} (supported: {', '.join(UPDATE_OPERATORS)})")
        if not isinstance(fields, Mapping):
            raise QueryError(f"update.{op}: expects a mapping of field paths")
        for key, value in fields.items():
            path = _check_path(key, f"update.{op}")
            if path[0] in ("_id", "_version"):
                raise QueryError(f"update.{op}: the {path[0]} field is managed by the store and cannot be changed")
            if op == "$inc":
                if _kind(value) != "number":
                    raise QueryError(f"update.$inc.{key}: expects a number, got {value!r}")
                _check_number(value, f"update.$inc.{key}")
            parts[op].append(path if op == "$unset" else (path, value))
    upd = Update(tuple(parts["$set"]), tuple(parts["$unset"]), tuple(parts["$inc"]), tuple(parts["$push"]))
    seen: set[Path] = set()
    for path in upd.paths():
        for other in seen:
            n = min(len(path), len(other))
            if path[:n] == other[:n]:
                raise QueryError(f"update: paths {'.'.join(other)!r} and {'.'.join(path)!r} conflict")
        seen.add(path)
    return upd


def _parent(doc: dict, path: Path, create: bool, where: str) -> dict | None:
    cur = doc
    for i, part in enumerate(path[:-1]):
        nxt = cur.get(part, _MISSING)
        if nxt is _MISSING or nxt is None:
            if not create:
                return None
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise QueryError(f"{where}: {'.'.join(path[: i + 1])!r} is not an object")
        cur = nxt
    return cur


def apply_update(doc: Mapping[str, Any], update: Update | Mapping[str, Any]) -> dict:
    """Return a copy of a stored document with ``update`` applied (values already encoded)."""
    upd = update if isinstance(update, Update) else parse_update(update)
    out = copy.deepcopy(dict(doc))
    for path, value in upd.sets:
        _parent(out, path, True, "$set")[path[-1]] = copy.deepcopy(value)
    for path in upd.unsets:
        parent = _parent(out, path, False, "$unset")
        if parent is not None:
            parent.pop(path[-1], None)
    for path, amount in upd.incs:
        parent = _parent(out, path, True, "$inc")
        current = parent.get(path[-1], 0)
        if _kind(current) != "number":
            raise QueryError(f"$inc: {'.'.join(path)!r} holds {type(current).__name__}, not a number")
        result = current + amount
        if isinstance(result, int) and not -(2**63) <= result < 2**63:
            raise QueryError(f"$inc: {'.'.join(path)!r} would leave 64 bits ({result})")
        if isinstance(result, float) and not math.isfinite(result):
            raise QueryError(f"$inc: {'.'.join(path)!r} would become {result}")
        parent[path[-1]] = result
    for path, value in upd.pushes:
        parent = _parent(out, path, True, "$push")
        current = parent.setdefault(path[-1], [])
        if not isinstance(current, list):
            raise QueryError(f"$push: {'.'.join(path)!r} holds {type(current).__name__}, not a list")
        current.append(copy.deepcopy(value))
    return out
