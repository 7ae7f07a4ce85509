"""Hard cases for backends that translate queries (SQL, MongoDB), checked against the reference evaluator.

The values sit where translations usually go wrong: 64-bit integers next to
doubles that round to them, -0.0, denormals, huge exponents, arrays where a path
expects objects (and objects with keys like "0" where an array index would be
read), keys a JSON path has trouble addressing, and every kind in one field for
the sort order.  :func:`check_translation` saves them and compares ``load``,
``count`` and sorted loads with :func:`ptutils.query.matches` / ``sort_docs``.
"""

from __future__ import annotations

from ptutils.database import DBInterface
from ptutils.query import matches, sort_docs
from ptutils.testing.assertions import assert_identical

BIG = 2**60
TRICKY_DOCS: dict[str, dict] = {
    "i_big_plus": {"n": BIG + 4},
    "f_big": {"n": float(BIG)},
    "i_big": {"n": BIG},
    "i_big_minus": {"n": BIG - 4},
    "i_53_plus": {"n": 2**53 + 1},
    "f_53": {"n": float(2**53)},
    "i_max": {"n": 2**63 - 1},
    "f_2_63": {"n": float(2**63)},
    "i_min": {"n": -(2**63)},
    "f_huge": {"n": 1e300},
    "f_neg_huge": {"n": -1e300},
    "f_tiny": {"n": 5e-324},
    "f_neg0": {"n": -0.0},
    "i_zero": {"n": 0},
    "f_half": {"n": 0.5},
    "f_exp": {"n": 1.5e16},
    "s_one": {"n": "1"},
    "s_empty": {"n": ""},
    "s_upper": {"n": "Z"},
    "s_lower": {"n": "a"},
    "s_space": {"n": "a "},
    "s_astral": {"n": "\U0001f600"},
    "s_bmp_top": {"n": "\uffff"},
    "b_true": {"n": True},
    "b_false": {"n": False},
    "null": {"n": None},
    "missing": {},
    "list": {"n": [BIG + 4]},
    "list_null": {"n": [None]},
    "obj": {"n": {"0": 1}},
    "arr_of_obj": {"a": [{"b": 1}]},
    "obj_of_arr": {"a": {"b": [1]}},
    "obj_zero_key": {"a": {"0": 5, "-1": 6}},
    "list_five": {"a": [5, 6]},
    "scalar_a": {"a": 5},
    "null_a": {"a": None},
    "odd_keys": {"-1": 1, "~x": 2, "~": 3, 'k"': 4, "k\\": 5, "k\n": 6, "[0]": 7, "*": 8, "a.b": 10},
    "nested_odd": {"o": {"-x": {"~y": "deep"}, 'q"': {"r\\": True}}},
}

TRICKY_QUERIES: list[dict] = [
    {"n": BIG + 4},
    {"n": BIG},
    {"n": float(BIG)},
    {"n": {"$gt": float(BIG)}},
    {"n": {"$gte": BIG}},
    {"n": {"$lt": BIG + 1}},
    {"n": {"$lte": BIG - 1}},
    {"n": {"$gt": BIG - 3, "$lt": BIG + 3}},
    {"n": 2**53 + 1},
    {"n": float(2**53)},
    {"n": {"$gt": 2**53}},
    {"n": 2**63 - 1},
    {"n": {"$gte": 2**63 - 1}},
    {"n": {"$gt": 2**63 - 1}},
    {"n": float(2**63)},
    {"n": {"$lt": -(2**63)}},
    {"n": {"$lte": -(2**63)}},
    {"n": {"$gt": 1e299}},
    {"n": {"$lt": -1e299}},
    {"n": {"$gt": 0}},
    {"n": {"$gte": 0}},
    {"n": 0},
    {"n": -0.0},
    {"n": {"$gt": -1e-300, "$lt": 1e-300}},
    {"n": 5e-324},
    {"n": {"$gt": 0.25, "$lte": 0.5}},
    {"n": {"$gt": 1.4e16}},
    {"n": {"$in": [2**63 - 1, 5e-324, "1", None]}},
    {"n": {"$nin": [BIG, float(BIG), True]}},
    {"n": {"$ne": BIG + 4}},
    {"n": "1"},
    {"n": {"$gt": "Z"}},
    {"n": {"$gte": "a", "$lt": "b"}},
    {"n": "a"},
    {"n": {"$gt": "\uffff"}},
    {"n": {"$lt": "\U0001f600"}},
    {"n": {"$lt": ""}},
    {"n": True},
    {"n": False},
    {"n": None},
    {"n": {"$exists": True}},
    {"n": {"$exists": False}},
    {"a.b": 1},
    {"a.b": None},
    {"a.b": {"$ne": None}},
    {"a.b": {"$exists": True}},
    {"a.0": 5},
    {"a.0": None},
    {"a.0": {"$exists": True}},
    {"a.-1": 6},
    {"a": 5},
    {"a": None},
    {"a": {"$in": [5, None]}},
    {"-1": 1},
    {"~x": 2},
    {"~": 3},
    {'k"': 4},
    {"k\\": 5},
    {"k\n": 6},
    {"[0]": 7},
    {"*": 8},
    {"a.b": {"$exists": False}},
    {"o.-x.~y": "deep"},
    {'o.q".r\\': True},
    {"$or": [{"n": {"$gt": BIG}}, {"a.0": {"$exists": True}}]},
    {"$and": [{"n": {"$exists": True}}, {"n": {"$nin": [None, True, False]}}]},
]

TRICKY_SORTS: list[list[tuple[str, int]]] = [
    [("n", 1)],
    [("n", -1)],
    [("a.b", 1), ("n", -1)],
    [("a.0", -1)],
    [("-1", 1)],
]


def stored(db: DBInterface) -> list[dict]:
    """Save :data:`TRICKY_DOCS` into ``db`` and return them as stored (with _id and _version)."""
    docs = []
    for doc_id, body in TRICKY_DOCS.items():
        assert db.save({"_id": doc_id, **body}) == doc_id
        docs.append({"_id": doc_id, "_version": 1, **body})
    return sorted(docs, key=lambda d: d["_id"])


def check_translation(db: DBInterface) -> None:
    """Every tricky query and sort gives exactly the reference evaluator's result on ``db``."""
    docs = stored(db)
    mismatches = []
    for query in TRICKY_QUERIES:
        want = [d["_id"] for d in docs if matches(query, d)]
        got = [d["_id"] for d in db.load(query)]
        if got != want or db.count(query) != len(want):
            mismatches.append((query, want, got))
    for sort in TRICKY_SORTS:
        want = [d["_id"] for d in sort_docs(list(docs), sort)]
        got = [d["_id"] for d in db.load(sort=sort)]
        if got != want:
            mismatches.append((sort, want, got))
        got_window = [d["_id"] for d in db.load({"n": {"$exists": True}}, sort=sort, skip=3, limit=5)]
        want_window = [d["_id"] for d in sort_docs([d for d in docs if "n" in d], sort)][3:8]
        if got_window != want_window:
            mismatches.append((sort, "window", want_window, got_window))
    assert not mismatches, "\n".join(repr(m) for m in mismatches)
    for doc in docs:
        assert_identical(doc, db.load_from_id(doc["_id"]), doc["_id"])
