"""Property tests of the query subset: the parser's refusals and the reference evaluator's semantics.

``oracle`` below is a second, independent reading of the semantics written in
:mod:`ptutils.query`'s docstring; hypothesis checks that ``matches`` agrees
with it on random documents and queries.  The backends are then held to
``matches`` by the conformance suite.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptutils.errors import QueryError
from ptutils.query import (
    And,
    Compare,
    Exists,
    Or,
    apply_update,
    get_path,
    is_missing,
    matches,
    parse_projection,
    parse_query,
    parse_sort,
    parse_update,
    project,
    sort_docs,
    sort_key,
)

SETTINGS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUPPORTED = {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$and", "$or"}

# ------------------------------------------------------------------ the oracle
MISSING = object()


def lookup(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return MISSING
        doc = doc[part]
    return doc


def kind(value: Any) -> str | None:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return None  # lists and objects


def equal(actual: Any, expected: Any) -> bool:
    if expected is None:
        return actual is MISSING or actual is None
    return actual is not MISSING and kind(actual) == kind(expected) and actual == expected


def compare(actual: Any, op: str, operand: Any) -> bool:
    if op == "$eq":
        return equal(actual, operand)
    if op == "$ne":
        return not equal(actual, operand)
    if op == "$in":
        return any(equal(actual, v) for v in operand)
    if op == "$nin":
        return not any(equal(actual, v) for v in operand)
    if op == "$exists":
        return (actual is not MISSING) is operand
    if actual is MISSING or kind(actual) != kind(operand):
        return False
    return {"$gt": actual > operand, "$gte": actual >= operand, "$lt": actual < operand, "$lte": actual <= operand}[op]


def oracle(query: Mapping[str, Any], doc: dict) -> bool:
    for key, spec in query.items():
        if key == "$and":
            ok = all(oracle(q, doc) for q in spec)
        elif key == "$or":
            ok = any(oracle(q, doc) for q in spec)
        elif isinstance(spec, dict):
            ok = all(compare(lookup(doc, key), op, operand) for op, operand in spec.items())
        else:
            ok = equal(lookup(doc, key), spec)
        if not ok:
            return False
    return True


# ------------------------------------------------------------------ strategies
SCALARS = [None, True, False, 0, 1, -1, 2, 2.0, 0.5, -0.0, 1e300, -(2**63), 2**63 - 1, "", "a", "B", "ab", "é", "1"]
scalars = st.one_of(st.sampled_from(SCALARS), st.integers(-5, 5), st.text(alphabet="aAb1", max_size=2))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("xyz"), inner, max_size=3), max_leaves=6
)
documents = st.dictionaries(st.sampled_from(["a", "b", "x", "y"]), json_values, max_size=4)
paths = st.sampled_from(["a", "b", "x", "a.x", "a.y", "a.x.y", "b.z", "nope"])
orderable = scalars.filter(lambda v: kind(v) in ("number", "string"))
operator_specs = st.dictionaries(
    st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists"]),
    st.just(None),
    min_size=1,
    max_size=3,
)


@st.composite
def field_specs(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(scalars)
    spec = {}
    for op in draw(operator_specs):
        if op in ("$in", "$nin"):
            spec[op] = draw(st.lists(scalars, max_size=3))
        elif op == "$exists":
            spec[op] = draw(st.booleans())
        elif op in ("$eq", "$ne"):
            spec[op] = draw(scalars)
        else:
            spec[op] = draw(orderable)
    return spec


queries = st.recursive(
    st.dictionaries(paths, field_specs(), max_size=2),
    lambda inner: st.dictionaries(st.sampled_from(["$and", "$or"]), st.lists(inner, min_size=1, max_size=3), min_size=1),
    max_leaves=6,
)


# ------------------------------------------------------------------ evaluator
@SETTINGS
@given(queries, documents)
def test_matches_agrees_with_the_documented_semantics(query: dict, doc: dict) -> None:
    assert matches(query, doc) == oracle(query, doc)


@SETTINGS
@given(st.lists(queries, min_size=1, max_size=3), documents)
def test_and_or_combine_like_all_and_any(subs: list[dict], doc: dict) -> None:
    results = [matches(q, doc) for q in subs]
    assert matches({"$and": subs}, doc) == all(results)
    assert matches({"$or": subs}, doc) == any(results)


@SETTINGS
@given(paths, scalars, st.lists(scalars, max_size=3), documents)
def test_negations_are_exact_complements(path: str, value: Any, values: list, doc: dict) -> None:
    assert matches({path: {"$ne": value}}, doc) != matches({path: {"$eq": value}}, doc)
    assert matches({path: {"$nin": values}}, doc) != matches({path: {"$in": values}}, doc)
    assert matches({path: {"$exists": False}}, doc) != matches({path: {"$exists": True}}, doc)
    assert matches({path: value}, doc) == matches({path: {"$eq": value}}, doc)
    assert matches({path: {"$in": [value]}}, doc) == matches({path: value}, doc)


@pytest.mark.parametrize(
    ("query", "doc", "expected"),
    [
        ({"a": 1}, {"a": True}, False),  # true never equals 1
        ({"a": True}, {"a": 1}, False),
        ({"a": 0}, {"a": False}, False),
        ({"a": 1}, {"a": 1.0}, True),  # numbers compare by value
        ({"a": None}, {}, True),  # null matches missing
        ({"a": None}, {"a": None}, True),
        ({"a": None}, {"a": 0}, False),
        ({"a": {"$ne": None}}, {}, False),
        ({"a": {"$exists": True}}, {"a": None}, True),
        ({"a": {"$ne": 1}}, {}, True),  # negations match missing fields
        ({"a": {"$nin": [1]}}, {}, True),
        ({"a": {"$in": [None]}}, {}, True),
        ({"a": {"$gt": 0}}, {"a": True}, False),  # orderings stay within their kind
        ({"a": {"$lt": "b"}}, {"a": 1}, False),
        ({"a": {"$lt": "b"}}, {"a": "B"}, True),  # code point order
        ({"a": {"$gt": "a"}}, {"a": "é"}, True),
        ({"a": {"$gte": 2**63 - 1}}, {"a": 2**63 - 1}, True),
        ({"a": 1}, {"a": [1]}, False),  # no array containment
        ({"a": {"$ne": 1}}, {"a": [1]}, True),
        ({"a.0": 1}, {"a": [1]}, False),  # a path segment never indexes a list
        ({"a": {"$exists": True}}, {"a": []}, True),
        ({"a": 1}, {"a": {"$eq": 1}}, False),
        ({"a.b": 1}, {"a": {"b": 1}}, True),
        ({"a.b": None}, {"a": 5}, True),  # a path through a scalar is missing
        ({"a.b": {"$exists": False}}, {"a": "text"}, True),
        ({"a": {"$gt": 0, "$lt": 2}}, {"a": 1}, True),
        ({"a": {"$gt": 0, "$lt": 2}}, {"a": 3}, False),
        ({}, {}, True),
    ],
    ids=repr,
)
def test_documented_examples(query: dict, doc: dict, expected: bool) -> None:
    assert matches(query, doc) is expected


def test_parse_query_builds_the_node_tree() -> None:
    node = parse_query({"a.b": {"$gt": 1, "$exists": True}, "$or": [{"c": None}, {"d": {"$in": [1, "x"]}}]})
    assert node == And(
        (
            And((Compare(("a", "b"), "$gt", 1), Exists(("a", "b"), True))),
            Or((Compare(("c",), "$eq", None), Compare(("d",), "$in", (1, "x")))),
        )
    )
    assert parse_query(None) == And(()) and parse_query({}) == And(())
    assert parse_query(node) is node


# ------------------------------------------------------------------ parser refusals
unsupported_ops = st.text(min_size=1, max_size=10).map(lambda s: "$" + s).filter(lambda s: s not in SUPPORTED)
non_scalars = st.one_of(
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(alphabet="abc", max_size=3), st.integers(), max_size=2),
    st.sets(st.integers(), max_size=2),
    st.binary(max_size=3),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 2**63, -(2**63) - 1, 1j, object(), (1,)]),
)


@SETTINGS
@given(unsupported_ops, paths, st.integers())
def test_operators_outside_the_subset_are_rejected(op: str, path: str, value: int) -> None:
    for query in ({op: value}, {path: {op: value}}, {"$and": [{path: {op: value}}]}, {"$or": [{op: [value]}]}):
        with pytest.raises(QueryError, match=r"\$"):
            parse_query(query)


@pytest.mark.parametrize("op", ["$where", "$function", "$expr", "$regex", "$text", "$jsonSchema", "$not", "$nor", "$elemMatch", "$all", "$size", "$type", "$mod", "$options", "$comment"])
def test_named_dangerous_or_unsupported_operators_are_rejected(op: str) -> None:
    for query in ({op: "x"}, {"a": {op: "x"}}, {"a": {"$eq": 1, op: "x"}}):
        with pytest.raises(QueryError, match=op.replace("$", r"\$")):
            parse_query(query)


@SETTINGS
@given(paths, st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin"]), non_scalars)
def test_operands_that_are_not_json_scalars_are_rejected(path: str, op: str, value: Any) -> None:
    operand = [value] if op in ("$in", "$nin") else value
    with pytest.raises(QueryError):
        parse_query({path: {op: operand}})
    with pytest.raises(QueryError):
        parse_query({path: value})


@pytest.mark.parametrize(
    "query",
    [
        {"a": {"$gt": None}},
        {"a": {"$lte": True}},
        {"a": {"$in": "ab"}},
        {"a": {"$in": 1}},
        {"a": {"$exists": "yes"}},
        {"a": {"$exists": 1}},
        {"$and": []},
        {"$or": {}},
        {"$or": [[]]},
        {"": 1},
        {"a.": 1},
        {".a": 1},
        {"a..b": 1},
        {"a.$b": 1},
        {"a\x00b": 1},
        {1: 1},
        {"a": {"$eq": 1, "b": 1}},
        {"a": {"b": 1, "$eq": 1}},
        "a",
        ["a"],
    ],
    ids=repr,
)
def test_malformed_queries_are_rejected(query: Any) -> None:
    with pytest.raises(QueryError):
        parse_query(query)


junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(alphabet="$ab.\x00", max_size=4), st.binary(max_size=2)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet="$abeinx.", max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(junk)
def test_parsers_raise_only_query_errors_on_arbitrary_input(value: Any) -> None:
    for parse in (parse_query, parse_update, parse_sort, parse_projection):
        try:
            parse(value)
        except QueryError:
            pass


# ------------------------------------------------------------------ sort and projection
sortable_docs = st.lists(
    st.fixed_dictionaries({"_id": st.text(alphabet="aAbB0_-", min_size=1, max_size=3)}, optional={"k": scalars, "j": scalars}),
    max_size=10,
    unique_by=lambda d: d["_id"],
)


@SETTINGS
@given(sortable_docs, st.sampled_from([1, -1]))
def test_sort_orders_kinds_and_keeps_ties_stable(docs: list[dict], direction: int) -> None:
    by_id = sorted(docs, key=lambda d: d["_id"])
    out = sort_docs(list(by_id), [("k", direction)])
    ranks = {"missing": 0, "null": 1, "number": 2, "string": 3, "bool": 4}

    def rank(d: dict) -> tuple:
        v = d.get("k", MISSING)
        k = "missing" if v is MISSING else kind(v)
        return (ranks[k],) if k in ("missing", "null") else (ranks[k], v)

    for before, after in itertools.pairwise(out):
        a, b = rank(before), rank(after)
        assert (a <= b) if direction == 1 else (a >= b)
        if a == b:  # equal keys keep ascending _id order, in both directions
            assert before["_id"] < after["_id"]
    assert sorted(out, key=lambda d: d["_id"]) == by_id


@SETTINGS
@given(sortable_docs)
def test_multi_key_sort_is_lexicographic(docs: list[dict]) -> None:
    out = sort_docs(sorted(docs, key=lambda d: d["_id"]), [("k", 1), ("j", -1)])
    for before, after in itertools.pairwise(out):
        kb, ka = sort_key(before, ("k",)), sort_key(after, ("k",))
        assert kb <= ka
        if kb == ka:
            assert sort_key(before, ("j",)) >= sort_key(after, ("j",))


def test_sort_key_kind_order() -> None:
    docs = [{"v": "s"}, {"v": True}, {}, {"v": 3}, {"v": None}, {"v": False}, {"v": -1.5}]
    assert [d.get("v", "<missing>") for d in sort_docs(docs, "v")] == ["<missing>", None, -1.5, 3, "s", False, True]


def test_parse_sort_forms() -> None:
    assert parse_sort(None) == []
    assert parse_sort("a.b") == [(("a", "b"), 1)]
    assert parse_sort([("a", -1), "b"]) == [(("a",), -1), (("b",), 1)]
    assert parse_sort({"a": 1, "b": -1}) == [(("a",), 1), (("b",), -1)]
    for bad in (5, [("a", 0)], [("a", "desc")], [("$a", 1)], [("a", 1, 2)]):
        with pytest.raises(QueryError):
            parse_sort(bad)


@SETTINGS
@given(documents.map(lambda d: {"_id": "x", **d}), st.lists(paths, max_size=3))
def test_projection_keeps_exactly_the_paths_and_id(doc: dict, wanted: list[str]) -> None:
    out = project(doc, parse_projection(wanted))
    assert out["_id"] == "x"
    for path in wanted:
        value = get_path(doc, path.split("."))
        got = get_path(out, path.split("."))
        assert (is_missing(got) and is_missing(value)) or got == value
    for key in out:
        assert key == "_id" or any(p.split(".")[0] == key for p in wanted)


def test_projection_of_nothing_is_the_id() -> None:
    assert project({"_id": 1, "a": 2}, []) == {"_id": 1}
    assert project({"_id": 1, "a": 2}, None) == {"_id": 1, "a": 2}
    for bad in ("a", b"a", 5, ["$x"], [""]):
        with pytest.raises(QueryError):
            parse_projection(bad)


# ------------------------------------------------------------------ updates
@SETTINGS
@given(documents, st.dictionaries(paths.filter(lambda p: p != "nope"), scalars, min_size=1, max_size=1))
def test_set_then_read_back(doc: dict, changes: dict) -> None:
    original = copy.deepcopy(doc)
    try:
        out = apply_update(doc, {"$set": changes})
    except QueryError:
        # only when an intermediate of the path holds a non-object value
        (path,) = changes
        parts = path.split(".")
        assert any(
            not is_missing(get_path(doc, parts[:i])) and not isinstance(get_path(doc, parts[:i]), (dict, type(None)))
            for i in range(1, len(parts))
        )
    else:
        for path, value in changes.items():
            assert get_path(out, path.split(".")) == value
    assert doc == original  # the input is never mutated


@SETTINGS
@given(st.one_of(st.integers(-(2**40), 2**40), st.floats(-1e9, 1e9)), st.one_of(st.integers(-100, 100), st.floats(-100, 100)))
def test_inc_adds_and_keeps_ints_int(start: float, amount: float) -> None:
    out = apply_update({"n": start}, {"$inc": {"n": amount, "fresh.m": amount}})
    assert out["n"] == start + amount and out["fresh"]["m"] == 0 + amount
    assert type(out["n"]) is type(start + amount)


def test_update_operators_together() -> None:
    doc = {"_id": "d", "a": 1, "l": [1], "o": {"p": None}}
    out = apply_update(doc, {"$set": {"o.q.r": 1, "o.p.s": 2}, "$unset": {"a": "", "zz.y": ""}, "$push": {"l": {"x": 1}, "m": 2}, "$inc": {"c": 1}})
    assert out == {"_id": "d", "l": [1, {"x": 1}], "o": {"p": {"s": 2}, "q": {"r": 1}}, "m": [2], "c": 1}
    assert apply_update({"a": 1}, {"b": 2}) == {"a": 1, "b": 2}  # no operators: $set


@pytest.mark.parametrize(
    ("doc", "changes"),
    [
        ({"a": "x"}, {"$inc": {"a": 1}}),
        ({"a": True}, {"$inc": {"a": 1}}),
        ({"a": 1}, {"$push": {"a": 1}}),
        ({"a": 1}, {"$set": {"a.b": 1}}),
        ({"a": [1]}, {"$set": {"a.0": 2}}),
        ({}, {"$inc": {"a": "1"}}),
        ({}, {"$inc": {"a": True}}),
        ({}, {"$inc": {"a": float("nan")}}),
        ({}, {"$inc": {"a": float("inf")}}),
        ({}, {"$inc": {"a": 2**63}}),
        ({}, {"$set": {"_id": 1}}),
        ({}, {"$set": {"_id.x": 1}}),
        ({}, {"$set": {"_version": 1}}),
        ({}, {"$unset": {"_version": ""}}),
        ({}, {"$set": {"a": 1}, "$inc": {"a": 1}}),
        ({}, {"$set": {"a": 1, "a.b": 1}}),
        ({}, {"$rename": {"a": "b"}}),
        ({}, {"$setOnInsert": {"a": 1}}),
        ({}, {"$set": 1}),
        ({}, {}),
        ({}, {"$set": {"$a": 1}}),
        ({}, {"$set": {"a..b": 1}}),
    ],
    ids=repr,
)
def test_invalid_updates_raise_query_error(doc: dict, changes: dict) -> None:
    with pytest.raises(QueryError):
        apply_update(doc, changes)


def test_query_integers_are_limited_to_64_bits() -> None:
    assert parse_query({"a": 2**63 - 1}) == Compare(("a",), "$eq", 2**63 - 1)
    assert parse_query({"a": -(2**63)}) == Compare(("a",), "$eq", -(2**63))
    for bad in (2**63, -(2**63) - 1, 10**30):
        with pytest.raises(QueryError, match="64-bit"):
            parse_query({"a": bad})
        with pytest.raises(QueryError, match="64-bit"):
            parse_query({"a": {"$in": [1, bad]}})
    assert math.isfinite(parse_query({"a": 1e308}).value)


def test_inc_that_would_leave_64_bits_or_overflow_is_refused():
    from ptutils.errors import QueryError
    from ptutils.query import apply_update

    with pytest.raises(QueryError, match="64 bits"):
        apply_update({"n": 2**63 - 1}, {"$inc": {"n": 1}})
    with pytest.raises(QueryError, match="inf"):
        apply_update({"x": 1.7e308}, {"$inc": {"x": 1.7e308}})
    assert apply_update({"n": 2**63 - 2}, {"$inc": {"n": 1}})["n"] == 2**63 - 1
