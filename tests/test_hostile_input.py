"""Hostile input: ids, queries, checkpoints, blobs, configs and sizes that try to break out (issue 10).

Each test hands ptutils what an attacker, a bug elsewhere or bit rot would, and
checks three things: a clear ptutils error naming the value (or exactly the
documented result), nothing written where it must not be, and nothing lost:
every document stored before is still there, unchanged.  ``lost`` in the
reliability table (``faults.record``) is computed from the store, never assumed.

Storage tests run on every backend of the matrix (the ``db`` fixture).  The
hypothesis fuzzers run 1,000 examples on the embedded backends (fs, SQLite);
on the server backends fewer (see ``examples_for``), which keeps the whole file
within a few minutes on two cores; the translation they check is the same code
on every example, only the server differs.

Every bug these tests found has been fixed; the tests that pinned them now
pass as ordinary tests, and the fuzzers cover those inputs too.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import json
import math
import os
import pickle
import re
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ptutils import checkpoint as ckpt
from ptutils import open_db
from ptutils.checkpoint import CheckpointStore
from ptutils.codec import TAG
from ptutils.config import Config
from ptutils.database import DBInterface
from ptutils.errors import (
    CodecError,
    ConfigError,
    CorruptionError,
    DocumentTooLargeError,
    InvalidIdError,
    QueryError,
    SessionError,
    StorageError,
)
from ptutils.model import Model
from ptutils.query import matches, parse_query, project, sort_docs
from ptutils.session import Session
from ptutils.status import request_pause
from ptutils.testing.assertions import assert_identical, stored_body

from .support.storage_helpers import Detonator

FUZZ_EMBEDDED = 1000
FUZZ_SERVER = 150


def examples_for(backend: str) -> int:
    """1,000 examples on the embedded backends; fewer on servers, where each costs round trips."""
    return FUZZ_EMBEDDED if backend in ("fs", "sqlite") else FUZZ_SERVER


def fuzz_settings(backend: str) -> settings:
    return settings(
        max_examples=examples_for(backend),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------------- helpers
def snapshot(db: DBInterface, query: dict | None = None) -> dict[str, dict]:
    """The stored documents (matching ``query``), without ``_version``: re-saving a document bumps it."""
    return {d["_id"]: stored_body(d) for d in db.load(query)}


def same(a: Any, b: Any) -> bool:
    """Exact equality, arrays and tensors included (types, dtypes, shapes, bits)."""
    try:
        assert_identical(a, b)
    except AssertionError:
        return False
    return True


def count_lost(before: dict[str, dict], db: DBInterface, query: dict | None = None) -> int:
    """Documents of ``before`` that are gone or changed now."""
    after = snapshot(db, query)
    return sum(1 for doc_id, body in before.items() if doc_id not in after or not same(body, after[doc_id]))


def ids_of(docs: list[dict]) -> list[str]:
    return [d["_id"] for d in docs]


def named(exc: BaseException, value: Any) -> bool:
    """Whether an error message names ``value`` (as repr() shows it, without the quotes)."""
    text = repr(value)
    return (text[1:-1] if isinstance(value, str) else text) in str(exc)


def tiny_model() -> Model:
    return Model(torch.nn.Linear(2, 1), torch.nn.MSELoss(), device="cpu")


def files_under(root: Path) -> set[str]:
    """Every file and directory below ``root``."""
    out = set()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.join(directory, name))
    return out


# ====================================================================== ids
def traversal_ids(marker: str) -> list[Any]:
    """Ids that would escape a directory, confuse a path, or only look like a safe id."""
    return [
        "../x", "..", ".", "a/b", "/etc/passwd", f"/tmp/{marker}", f"../../../../../../../../tmp/{marker}",
        f"..\\..\\{marker}", f"x/../../{marker}", "a\x00b", f"{marker}\x00.json", "\x00", "",
        "x" * 129, "y" * 4096,
        "\uff41\uff42",  # fullwidth "ab"
        "\uff0e\uff0e",  # fullwidth ".."
        "\u2024\u2024",  # one-dot leaders look like ".."
        "a\u2215b",  # division slash looks like "/"
        "a\u29f8b",  # big solidus
        "\u0430dmin",  # Cyrillic a
        "a\u200bb",  # zero-width space
        "\u202etxt.exe",  # right-to-left override
        "a\nb", "~", "$id", "a b", "%2e%2e%2fx", "C:x", "a..b", ".hidden",
        5, None, b"../x", ["a"],
    ]


def test_hostile_ids_are_refused_by_name_and_nothing_escapes_the_root(
    db: DBInterface, backend: str, tmp_path_factory: pytest.TempPathFactory, faults
) -> None:
    marker = f"ptutils-hostile-{uuid.uuid4().hex[:8]}"
    other = db.collection(f"{db.collection_name}_other")
    db.save({"_id": "keep", "v": 1, "arr": np.arange(20_000)})  # with an out-of-line blob
    db.put_blob(b"precious", "keep-blob")
    other.save({"_id": "bystander", "v": 2})
    sessions = db.collection("sessions")
    before, before_other, sessions_before = snapshot(db), snapshot(other), sessions.count()
    base = tmp_path_factory.getbasetemp()
    top_before = set(os.listdir(base))
    root_before = files_under(Path(db.root)) if backend == "fs" else set()

    refused = attempted = 0
    for bad in traversal_ids(marker):
        ops: list[tuple[str, Callable[[], Any]]] = [
            ("save", lambda bad=bad: db.save({"_id": bad, "v": 9})),
            ("load_from_id", lambda bad=bad: db.load_from_id(bad)),
            ("load_from_ids", lambda bad=bad: db.load_from_ids(["keep", bad])),
            ("exists", lambda bad=bad: db.exists(bad)),
            ("update", lambda bad=bad: db.update(bad, {"$set": {"v": 9}}, upsert=True)),
            ("get_blob", lambda bad=bad: db.get_blob(bad)),
            ("delete_blob", lambda bad=bad: db.delete_blob(bad)),
            ("request_pause", lambda bad=bad: request_pause(db, bad)),
            ("collection", lambda bad=bad: db.collection(bad)),
            ("open_db collection", lambda bad=bad: open_db(db.url, collection=bad)),
        ]
        if isinstance(bad, str):
            ops.append(("delete", lambda bad=bad: db.delete(bad)))
        if bad is not None:  # put_blob(data, None) means "make an id"
            ops.append(("put_blob", lambda bad=bad: db.put_blob(b"evil", bad)))
        for op, call in ops:
            attempted += 1
            with pytest.raises(InvalidIdError) as err:
                call()
            assert named(err.value, bad), (op, bad, str(err.value))
            refused += 1

        if bad:  # a falsy session_id (None, "") means "make one"
            attempted += 1
            with pytest.raises((InvalidIdError, SessionError)) as err:
                Session(tiny_model(), db=db, session_id=bad)
            assert named(err.value, bad), (bad, str(err.value))
            refused += 1

    # Valid as a document id (at most 128 characters) but over the session id limit of 80.
    attempted += 1
    with pytest.raises(SessionError, match="longer than 80"):
        Session(tiny_model(), db=db, session_id="s" * 100)
    refused += 1
    # A checkpoint store under a hostile session id builds its ids from it: refused when writing.
    for bad in ("../x", "a/b", "z" * 120):
        attempted += 1
        with pytest.raises(InvalidIdError) as err:
            CheckpointStore(db, bad).save({"w": torch.zeros(2)})
        assert named(err.value, bad)
        refused += 1

    if backend == "fs":  # the only backend that builds paths from ids
        inside = os.path.join(db.root, db.collection_name) + os.sep
        escaped = sorted(p for p in files_under(Path(db.root)) - root_before if not p.startswith(inside))
        assert not escaped, f"files appeared outside the collection: {escaped}"
    assert set(os.listdir(base)) == top_before, "something appeared beside the test databases"
    assert not list(base.rglob(f"*{marker}*")) and not list(Path("/tmp").glob(f"*{marker}*")), "a traversal id escaped"
    assert sessions.count() == sessions_before
    lost = count_lost(before, db) + count_lost(before_other, other) + (db.get_blob("keep-blob") != b"precious")
    assert_identical(np.arange(20_000), db.load_from_id("keep")["arr"])
    faults.record("hostile: path traversal ids", injected=attempted, survived=refused, lost=lost)
    assert lost == 0


# ====================================================================== query injection
HOSTILE_KEYS = [
    "'; DROP TABLE documents; --", 'a"]', "a'", 'q"', "a\\b", "\\", "%", "_", "a%", "a_b", "[0]", "*", "@",
    "-1", "0", "' OR 1=1 --", "`x`", "null", "\u00fc", " ", "k\n", "{}", "a b", ")", "#", "?", ":x", "a$b",
]
HOSTILE_VALUES = [
    "'; DROP TABLE documents; --", "' OR '1'='1", '" OR ""="', '{"$gt": ""}', "%", "_", "\\", "\\%", "%_%",
    "*", "$where", "null", "", 'a"', "'", "\u2028", "\u00fc", "1", "a]", "$.x", "\U0001f600", "a\x00b", "\x00",
]


def hostile_documents() -> dict[str, dict]:
    """Documents whose keys and values are made of SQL, JSON-path and wildcard metacharacters."""
    docs: dict[str, dict] = {}
    nk, nv = len(HOSTILE_KEYS), len(HOSTILE_VALUES)
    for i in range(14):
        doc: dict[str, Any] = {
            "s": HOSTILE_VALUES[i % nv],
            "n": [0, 1, -2.5, 1e300, True, False, None, "1"][i % 8],
            HOSTILE_KEYS[i % nk]: HOSTILE_VALUES[(i + 3) % nv],
            HOSTILE_KEYS[(i + 7) % nk]: HOSTILE_VALUES[(i + 5) % nv],
            "o": {HOSTILE_KEYS[(i + 1) % nk]: i, HOSTILE_KEYS[(i + 5) % nk]: HOSTILE_VALUES[i % nv], 'a"]': {"b": i % 3}},
        }
        if i % 3 == 0:
            doc["l"] = [HOSTILE_VALUES[i % nv], i]
        if i % 4 == 1:
            doc['a"]'] = {"b": i % 2}
        docs[f"d{i:02d}"] = doc
    docs["all-keys"] = {key: HOSTILE_VALUES[j % nv] for j, key in enumerate(HOSTILE_KEYS)}
    return docs


def injection_queries() -> list[Any]:
    queries: list[Any] = []
    for value in HOSTILE_VALUES:
        queries += [{"s": value}, {"s": {"$ne": value}}, {"s": {"$lte": value}}]
    for j, key in enumerate(HOSTILE_KEYS):
        queries += [
            {key: HOSTILE_VALUES[(j + 3) % len(HOSTILE_VALUES)]},
            {f"o.{key}": {"$gte": 0}},
            {key: {"$in": HOSTILE_VALUES[:5]}, "s": {"$nin": HOSTILE_VALUES[5:9]}},
        ]
    queries += [
        {'a"].b': 1}, {'a"].b': {"$exists": True}}, {'o.a"].b': {"$lt": 2}},
        {"$.x": 1}, {"x.$.y": 1}, {"$[0]": 1}, {"a[0]": 1}, {"l.0": HOSTILE_VALUES[0]}, {"l": HOSTILE_VALUES[0]},
        {"s": {"$gt": ""}}, {"s": {"$regex": ".*"}}, {"$where": "1 = 1"}, {"s": {"$eq": {"$gt": ""}}},
        {"s": {"$in": [{"$gt": ""}]}}, {"o": {"$gt": ""}}, {"o": {HOSTILE_KEYS[1]: 1}}, {"s": None}, {"s": {"$ne": None}},
        {"_id": {"$gt": ""}}, {"_id": "' OR '1'='1"}, {"_id": {"$in": ["d01", "x' OR 1=1 --"]}},
        {"n": {"$gt": 0}}, {"n": True}, {"n": "1"}, {"n": 1},
        {"$or": [{k: {"$exists": True}} for k in HOSTILE_KEYS[:6]]},
        {"$and": [{"s": {"$ne": v}} for v in HOSTILE_VALUES[:6]]},
        {"$or": [{"s": "x"}, {"$and": [{"%": {"$exists": False}}, {"_": {"$exists": True}}]}]},
        {"s": "x", "$or": [{"n": 1}, {"'; DROP TABLE documents; --": {"$exists": True}}]},
    ]
    return queries


def test_sql_metacharacters_and_operator_documents_in_queries_change_and_leak_nothing(db: DBInterface, faults) -> None:
    docs = hostile_documents()
    for doc_id, body in docs.items():
        db.save({"_id": doc_id, **body})
    other = db.collection(f"{db.collection_name}_other")
    for doc_id, body in docs.items():  # the same data in a sibling collection: none of it may come back
        other.save({"_id": f"other-{doc_id}", **body})
    reference = [{"_id": i, "_version": 1, **b} for i, b in sorted(docs.items())]
    before, before_other = snapshot(db), snapshot(other)
    sortable = [k for k in HOSTILE_KEYS if all(not isinstance(d.get(k), (list, dict)) for d in docs.values())]

    attempted = survived = 0
    for n, query in enumerate(injection_queries()):
        attempted += 1
        try:
            parse_query(query)
        except QueryError:
            for call in (db.load, db.count, db.load_one, db.delete):
                with pytest.raises(QueryError):
                    call(query)
            survived += 1
            continue
        expected = [d for d in reference if matches(query, d)]
        assert ids_of(db.load(query)) == ids_of(expected), query
        assert db.count(query) == len(expected), query
        key = sortable[n % len(sortable)]
        want = sort_docs(list(expected), [(key, -1)])
        assert ids_of(db.load(query, sort=[(key, -1)])) == ids_of(want), (query, key)
        paths = [key, f"o.{key}"]
        got = db.load(query, projection=paths)
        assert [stored_body(d) for d in got] == [stored_body(project(d, [(key,), ("o", key)])) for d in expected]
        if n % 3 == 0:  # deleting by a hostile query removes exactly the matches; they are then put back
            assert db.delete(query) == len(expected), query
            assert ids_of(db.load(projection=[])) == sorted(set(docs) - set(ids_of(expected))), query
            for d in expected:
                db.save(d)
        survived += 1
    lost = count_lost(before, db) + count_lost(before_other, other)
    faults.record("hostile: query injection", injected=attempted, survived=survived, lost=lost)
    assert lost == 0 and snapshot(db) == before and snapshot(other) == before_other


FORBIDDEN = {
    "$where": "function() { return true; }",
    "$function": {"body": "function() { return true }", "args": [], "lang": "js"},
    "$expr": {"$eq": ["$a", 1]},
    "$regex": ".*",
    "$text": {"$search": "x"},
    "$jsonSchema": {"required": ["a"]},
}


def nestings(op: str, arg: Any) -> Iterator[dict]:
    """``op`` as a top-level clause, a field operator, and inside $and/$or at several depths."""
    top, field = {op: arg}, {"a": {op: arg}}
    yield top
    yield field
    yield {"a": {"$gt": 0, op: arg}}
    yield {"o.x.y": {op: arg}}
    yield {"$and": [top]}
    yield {"$or": [{"a": 1}, field]}
    yield {"$and": [{"$or": [{"$and": [{"b": 2}, top]}]}]}
    yield {"a": 1, "$or": [{"b": 2}, {"$and": [{"c": {"$in": [1]}}, field]}]}


def test_forbidden_operators_are_refused_by_name_at_any_depth(db: DBInterface, faults) -> None:
    db.save({"_id": "a", "a": 1, "o": {"x": {"y": 2}}})
    db.save({"_id": "b", "a": "x", "b": 2})
    before = snapshot(db)
    attempted = refused = 0
    for op, arg in FORBIDDEN.items():
        for query in nestings(op, arg):
            for call in (db.load, db.count, db.load_one, db.delete, lambda q: db.load(q, sort="a", limit=1)):
                attempted += 1
                with pytest.raises(QueryError, match=re.escape(op)):
                    call(query)
                refused += 1
        # As an operand an operator document is just a non-scalar: refused, naming where it sits.
        for query in ({"a": {"$eq": {op: arg}}}, {"a": {"$in": [1, {op: arg}]}}, {"a": {"b": {op: arg}}},
                      {"$or": [{"a": {"$ne": [{op: arg}]}}]}):
            attempted += 1
            with pytest.raises(QueryError, match=r"query(\.\$or\[0\])?\.a"):
                db.load(query)
            refused += 1
        # In updates, sorts and projections.
        for call, kind in (
            (lambda op=op, arg=arg: db.update("a", {op: {"a": 1}}), QueryError),
            (lambda op=op, arg=arg: db.update("a", {"$set": {op: 1}}), QueryError),
            (lambda op=op, arg=arg: db.update("a", {"$set": {"a": {op: arg}}}), CodecError),
            (lambda op=op, arg=arg: db.update("a", {"$push": {"l": {op: arg}}}, upsert=True), CodecError),
            (lambda op=op, arg=arg: db.save({"_id": "c", op: arg}), CodecError),
            (lambda op=op, arg=arg: db.load(sort=[(op, 1)]), QueryError),
            (lambda op=op, arg=arg: db.load(projection=[op]), QueryError),
        ):
            attempted += 1
            with pytest.raises(kind, match=re.escape(op)):
                call()
            refused += 1
    lost = count_lost(before, db) + (sorted(snapshot(db)) != ["a", "b"])
    faults.record("hostile: forbidden query operators", injected=attempted, survived=refused, lost=lost)
    assert lost == 0


def test_strings_with_nul_are_compared_whole(db: DBInterface, faults) -> None:
    """SQLite once compared strings only up to an embedded NUL: {"s": "a"} matched, and deleted, "a\\x00b"."""
    db.save({"_id": "nul", "s": "a\x00b"})
    db.save({"_id": "plain", "s": "a"})
    before = snapshot(db)
    reference = [{"_id": "nul", "s": "a\x00b"}, {"_id": "plain", "s": "a"}]
    queries = [{"s": "a"}, {"s": "a\x00b"}, {"s": "a\x00c"}, {"s": {"$ne": "a"}}, {"s": {"$gt": "a"}},
               {"s": {"$in": ["a\x00b"]}}, {"s": {"$nin": ["a"]}}]
    mismatches = [q for q in queries if ids_of(db.load(q)) != [d["_id"] for d in reference if matches(q, d)]]
    removed = db.delete({"s": "a"})  # must remove "plain" only
    lost = count_lost({"nul": before["nul"]}, db)
    faults.record("hostile: NUL in string values", injected=len(queries) + 1,
                  survived=len(queries) + 1 - len(mismatches) - (removed != 1), lost=lost)
    assert not mismatches and removed == 1 and lost == 0


def test_id_queries_with_any_string_agree_with_the_reference(db: DBInterface) -> None:
    """Ids are ASCII, but a query may compare ``_id`` with any string: no match, never an error.

    (MariaDB once failed with "Illegal mix of collations" for a non-ASCII string.)
    """
    for doc_id in ("a", "B", "z-1"):
        db.save({"_id": doc_id, "v": 1})
    reference = [{"_id": i, "_version": 1, "v": 1} for i in ("B", "a", "z-1")]
    queries = [{"_id": "\u00e9"}, {"_id": "\U0001f600"}, {"_id": {"$ne": "\u00fc"}}, {"_id": {"$in": ["a", "\u00e9"]}},
               {"_id": {"$nin": ["\u00fc", "B"]}}, {"_id": {"$gt": "\u00e9"}}, {"_id": {"$lt": "\U0001f600"}},
               {"$or": [{"_id": "\u2028"}, {"v": 2}]}]
    for query in queries:
        assert ids_of(db.load(query)) == [d["_id"] for d in reference if matches(query, d)], query
        assert db.count(query) == sum(matches(query, d) for d in reference), query


def test_lone_surrogates_are_stored_exactly_or_refused_with_a_ptutils_error(db: DBInterface) -> None:
    """Text that is not valid UTF-8 (a lone surrogate): the filesystem stores it, the servers refuse it clearly."""
    db.save({"_id": "keep", "v": 1})
    outcomes = []
    for name, call in (
        ("save value", lambda: db.save({"_id": "s", "s": "\ud800"})),
        ("save key", lambda: db.save({"_id": "k", "\udfff": 1})),
        ("query", lambda: db.load({"s": "\ud800"})),
        ("update", lambda: db.update("keep", {"$set": {"s": "x\udc80"}})),
    ):
        try:
            call()
            outcomes.append((name, "ok"))
        except (CodecError, QueryError) as exc:  # refused as unstorable: fine, if said clearly
            outcomes.append((name, type(exc).__name__))
    if ("save value", "ok") in outcomes:
        assert db.load_from_id("s")["s"] == "\ud800"
        assert ids_of(db.load({"s": "\ud800"})) == ["s"]
    if ("update", "ok") in outcomes:
        assert db.load_from_id("keep")["s"] == "x\udc80"
    assert db.load_from_id("keep")["v"] == 1


# ====================================================================== malicious pickles
def pickle_payloads(marker: Path, tmp_path: Path) -> dict[str, bytes]:
    """A raw pickle and a torch.save() ``.pt`` file, both live (checked on a throwaway copy)."""
    probe = tmp_path / "probe"
    pickle._loads(pickle.dumps(Detonator(probe)))  # type: ignore[attr-defined]  # the pure-Python unpickler
    assert probe.exists(), "the payload is not live: this test could not fail"
    probe.unlink()
    buf = io.BytesIO()
    torch.save({"model": Detonator(marker), "w": torch.zeros(2)}, buf)
    return {"pickle": pickle.dumps(Detonator(marker)), "torch.save": buf.getvalue()}


def plant(store: CheckpointStore, data: bytes, seq: int, blob_id: str) -> dict:
    """What an attacker with write access to the database would add: a record with a matching checksum."""
    store.db.put_blob(data, blob_id)
    record = {
        "_id": f"{store.session_id}.ckpt{seq:08d}", "session_id": store.session_id, "seq": seq, "blob": blob_id,
        "nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "created": 0.0, "pinned": False,
    }
    store.db.save(record)
    return record


def test_a_malicious_pickle_checkpoint_is_never_executed_and_the_previous_one_is_used(
    db: DBInterface, tmp_path: Path, no_unpickling: None, faults
) -> None:
    marker = tmp_path / "pwned"
    payloads = pickle_payloads(marker, tmp_path)
    warnings: list[str] = []
    store = CheckpointStore(db, f"victim-{uuid.uuid4().hex[:8]}", keep=10, on_warning=warnings.append)
    good = store.save({"w": torch.arange(6.0), "step": 7})
    mine = {"session_id": store.session_id}
    records_before = snapshot(store.db, mine)

    injected = survived = 0
    seq = good["seq"]
    for name, data in payloads.items():
        for blob_id in (f"{store.session_id}.evil-{name.replace('.', '')}.st", f"model-{name.replace('.', '')}.pt"):
            seq += 1
            record = plant(store, data, seq, blob_id)
            injected += 1
            with pytest.raises(CorruptionError, match=re.escape(record["_id"])):
                store.read(record)
            state, used = store.load_latest()
            assert used["_id"] == good["_id"] and state["step"] == 7
            assert torch.equal(state["w"], torch.arange(6.0))
            assert any(record["_id"] in w for w in warnings)
            survived += not marker.exists()
        # The same bytes given straight to the parser, and as a file named like a .pt checkpoint.
        path = tmp_path / f"evil-{name}.pt"
        path.write_bytes(data)
        injected += 1
        with pytest.raises(CorruptionError, match=re.escape(str(path))):
            ckpt.deserialize(path.read_bytes(), str(path))
        survived += not marker.exists()

    assert not marker.exists()
    lost = count_lost(records_before, store.db, mine)
    faults.record("hostile: malicious pickle checkpoint", injected=injected, survived=survived, lost=lost)
    assert lost == 0 and survived == injected


# ====================================================================== truncated / garbled checkpoints
def checkpoint_cuts(data: bytes) -> dict[str, bytes]:
    """Every prefix length class of a safetensors file, and single flipped bytes in each part."""
    (head_len,) = struct.unpack("<Q", data[:8])
    body = 8 + head_len
    cuts = {
        "empty": b"",
        "7 bytes": data[:7],
        "length only": data[:8],
        "mid-header": data[: 8 + head_len // 2],
        "header only": data[:body],
        "mid-data": data[: body + (len(data) - body) // 2],
        "one byte short": data[:-1],
        "one byte long": data + b"\x00",
    }
    for name, pos in (("length", 0), ("header", 8), ("data", body + 4)):
        flipped = bytearray(data)
        flipped[pos] ^= 0x40
        cuts[f"flipped {name} byte"] = bytes(flipped)
    return cuts


ONLY_THE_CHECKSUM_SEES = {"flipped data byte"}  # still a well-formed file: the record's SHA-256 catches it


def test_truncated_or_flipped_checkpoints_are_corruption_and_the_previous_one_is_used(db: DBInterface, faults) -> None:
    warnings: list[str] = []
    store = CheckpointStore(db, f"trunc-{uuid.uuid4().hex[:8]}", keep=10, on_warning=warnings.append)
    good = store.save({"w": torch.arange(64.0), "opt": {"lr": 0.1}, "step": 1})
    newest = store.save({"w": torch.arange(64.0) * 2, "opt": {"lr": 0.05}, "step": 2})
    data = store.db.get_blob(newest["blob"])
    mine = {"session_id": store.session_id}
    records_before = snapshot(store.db, mine)
    injected = survived = 0
    for name, bad in checkpoint_cuts(data).items():
        injected += 1
        if name not in ONLY_THE_CHECKSUM_SEES:
            where = f"checkpoint under test ({name})"
            with pytest.raises(CorruptionError, match=re.escape(where)):
                ckpt.deserialize(bad, where)
        store.db.put_blob(bad, newest["blob"])
        with pytest.raises(CorruptionError) as err:
            store.read(newest)
        assert newest["_id"] in str(err.value) and newest["blob"] in str(err.value), name
        state, used = store.load_latest()
        assert used["_id"] == good["_id"] and state["step"] == 1, name
        assert any(newest["_id"] in w for w in warnings), name
        survived += 1
    store.db.put_blob(data, newest["blob"])
    state, used = store.load_latest()  # repaired: the newest one is used again
    assert used["_id"] == newest["_id"] and torch.equal(state["w"], torch.arange(64.0) * 2)
    lost = count_lost(records_before, store.db, mine) + (store.read(good)["step"] != 1)
    faults.record("hostile: truncated/garbled checkpoint", injected=injected, survived=survived, lost=lost)
    assert lost == 0


def safetensors_with(metadata: dict, tensors: dict[str, dict] | None = None, payload: bytes = b"") -> bytes:
    header = {"__metadata__": metadata, **(tensors or {})}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + payload


def garbled_structure(data: bytes) -> bytes:
    """A checkpoint whose metadata JSON stays valid but whose inner structure JSON does not (one byte)."""
    pos = data.index(b'{\\"')  # the first brace inside the structure string
    return data[:pos] + b"x" + data[pos + 1 :]


GOOD_META = {"format": ckpt.FORMAT}
GARBLED_METADATA = {
    "structure missing": safetensors_with(GOOD_META),
    "structure not JSON": safetensors_with({**GOOD_META, "structure": "not json"}),
    "reference to a missing tensor": safetensors_with({**GOOD_META, "structure": json.dumps({TAG: "ref", "key": "t9"})}),
    "items not a list": safetensors_with({**GOOD_META, "structure": json.dumps({TAG: "items", "items": 5})}),
    "pickle tag": safetensors_with({**GOOD_META, "structure": json.dumps({TAG: "pickle", "data": "gAN9cQAu"})}),
    "unknown dtype on a reference": safetensors_with(
        {**GOOD_META, "structure": json.dumps({"w": {TAG: "ref", "key": "t0", "dtype": "object", "shape": [1]}})},
        {"t0": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\x00" * 4,
    ),
}


@pytest.mark.parametrize("case", [*GARBLED_METADATA, "one byte flipped inside the structure"])
def test_garbled_checkpoint_metadata_is_corruption_and_the_previous_one_is_used(db: DBInterface, case: str, faults) -> None:
    store = CheckpointStore(db, f"meta-{uuid.uuid4().hex[:8]}", keep=10)
    good = store.save({"w": torch.arange(4.0), "step": 1})
    newest = store.save({"w": torch.arange(4.0), "step": 2})
    if case in GARBLED_METADATA:  # written with a matching checksum, as a buggy or hostile writer would
        bad = GARBLED_METADATA[case]
        plant(store, bad, newest["seq"] + 1, f"{store.session_id}.garbled.st")
        fallback, intact = newest, [good, newest]
    else:  # bit rot: the record's checksum no longer matches
        bad = garbled_structure(store.db.get_blob(newest["blob"]))
        store.db.put_blob(bad, newest["blob"])
        fallback, intact = good, [good]
    with pytest.raises(CorruptionError, match="garbled"):
        ckpt.deserialize(bad, "garbled")
    state, used = store.load_latest()
    assert used["_id"] == fallback["_id"] and state["step"] == fallback["seq"] + 1
    lost = sum(1 for r in intact if store.read(r)["step"] != r["seq"] + 1)
    faults.record("hostile: garbled checkpoint metadata", injected=1, survived=1, lost=lost)
    assert lost == 0


# ====================================================================== truncated / garbled array blobs
def blob_id_of(db: DBInterface, doc_id: str, field: str) -> str:
    projected = db.load({"_id": doc_id}, projection=[f"{field}.blob"])
    return projected[0][field]["blob"]


def test_truncated_or_garbled_array_blobs_are_corruption_naming_the_blob(db: DBInterface, faults) -> None:
    arr = np.arange(10_000, dtype=np.float64)  # 80 kB: out of line
    ten = torch.arange(20_000, dtype=torch.int32)
    db.save({"_id": "victim", "arr": arr, "ten": ten, "small": np.arange(3)})
    db.save({"_id": "neighbour", "arr": arr * 3})
    injected = survived = 0
    for field in ("arr", "ten"):
        blob_id = blob_id_of(db, "victim", field)
        data = db.get_blob(blob_id)
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        swapped = db.get_blob(blob_id_of(db, "neighbour", "arr"))
        for name, bad in {
            "empty": b"", "7 bytes": data[:7], "half": data[: len(data) // 2], "one byte short": data[:-1],
            "one byte long": data + b"\x00", "one bit flipped": bytes(flipped), "another array's bytes": swapped[: len(data)],
            "npy file": _npy_bytes(np.frombuffer(data, dtype=np.uint8)),
        }.items():
            injected += 1
            db.put_blob(bad, blob_id)
            for load in (lambda: db.load_from_id("victim"), lambda: db.load({"_id": "victim"})):
                with pytest.raises(CorruptionError) as err:
                    load()
                assert blob_id in str(err.value) and field in str(err.value), (field, name, str(err.value))
            survived += 1
        db.put_blob(data, blob_id)  # repaired through the API: loads again
    victim = db.load_from_id("victim")
    intact = [same(arr, victim["arr"]), same(ten, victim["ten"]), same(arr * 3, db.load_from_id("neighbour")["arr"])]
    lost = intact.count(False)
    faults.record("hostile: truncated/garbled array blob", injected=injected, survived=survived, lost=lost)
    assert lost == 0


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("ref", ["../../../x", "a/b", 5, None, ["x"]], ids=repr)
def test_a_stored_blob_reference_that_is_not_an_id_is_corruption(db: DBInterface, ref: Any) -> None:
    # The backend primitive stores an already-encoded document as is: what a damaged or hostile store holds.
    db._write("h", {"a": {TAG: "ndarray", "dtype": "<f8", "shape": [1], "blob": ref, "nbytes": 8, "sha256": "0" * 64}})
    with pytest.raises(CorruptionError, match="'h'"):
        db.load_from_id("h")
    db.save({"_id": "h", "v": 1})  # replacing the damaged document works and says nothing
    assert db.load_from_id("h")["v"] == 1


# ====================================================================== configs
VALID_CONFIG: dict[str, Any] = {
    "name": "hostile",
    "seed": 3,
    "model": {
        "module": {"cls": "torch.nn.Linear", "in_features": 2, "out_features": 1},
        "criterion": {"cls": "torch.nn.MSELoss"},
        "optimizer": {"cls": "torch.optim.SGD", "lr": 0.1},
        "device": "cpu",
        "grad_clip": 1.0,
    },
    "stages": [{"name": "train", "data": "train", "max_epochs": 2, "mode": "train"}],
    "checkpoint": {"every_epochs": 1, "keep": 2},
    "status_interval": 1.0,
    "metadata": {"owner": "ci"},
}


def config_with(changes: dict[str, Any], db_url: str | None = None) -> dict:
    """VALID_CONFIG with dotted-path changes ("stages.0.mode"); the value DELETE removes the key."""
    cfg = copy.deepcopy(VALID_CONFIG)
    if db_url is not None:
        cfg["db"] = db_url
    for path, value in changes.items():
        *parents, last = path.split(".")
        cur: Any = cfg
        for part in parents:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        key: Any = int(last) if isinstance(cur, list) else last
        if value is DELETE:
            del cur[key]
        else:
            cur[key] = value
    return cfg


class _Delete:
    def __repr__(self) -> str:  # a stable test id (pytest-xdist workers must agree)
        return "DELETE"


DELETE = _Delete()
CONFIG_CASES = [
    ({"seed": "3"}, "seed"),
    ({"seed": 3.0}, "seed"),
    ({"seed": True}, "seed"),
    ({"name": ["x"]}, "name"),
    ({"db": 5}, "db"),
    ({"status_interval": "fast"}, "status_interval"),
    ({"status_interval": 0}, "status_interval"),
    ({"metadata": "owner"}, "metadata"),
    ({"model": "torch.nn.Linear"}, "model"),
    ({"model.module": DELETE}, "model.module"),
    ({"model.module": {"in_features": 2}}, "model.module"),
    ({"model.module.cls": 5}, "model.module.cls"),
    ({"model.device": 0}, "model.device"),
    ({"model.grad_clip": "1"}, "model.grad_clip"),
    ({"model.grad_clip": -1.0}, "model.grad_clip"),
    ({"model.learning_rate": 0.1}, "model.learning_rate"),
    ({"checkpoint": [1]}, "checkpoint"),
    ({"checkpoint.keep": "2"}, "checkpoint.keep"),
    ({"checkpoint.every_steps": 1.5}, "checkpoint.every_steps"),
    ({"checkpoint.db": 5}, "checkpoint.db"),
    ({"checkpoint.where": "x"}, "checkpoint.where"),
    ({"stages": "train"}, "stages"),
    ({"stages.0": "train"}, "stages[0]"),
    ({"stages.0.name": DELETE}, "stages[0].name"),
    ({"stages.0.name": 5}, "stages[0].name"),
    ({"stages.0.mode": "test"}, "stages[0].mode"),
    ({"stages.0.max_epochs": "2"}, "stages[0].max_epochs"),
    ({"stages.0.max_steps": 0}, "stages[0].max_steps"),
    ({"stages.0.colour": "red"}, "stages[0].colour"),
    ({"transitions": [{"trigger": "go", "source": "train"}]}, "transitions[0].dest"),
    ({"transitions": [5]}, "transitions[0]"),
    ({"learning_rate": 0.1}, "learning_rate"),
    ({"$where": "1"}, "$where"),
]
# Fields only checked when the session builds them (kwargs against the constructor's signature).
BUILD_CASES = [
    ({"model.optimizer.lr": "fast"}, "model.optimizer.lr"),
    ({"model.optimizer.colour": 1}, "model.optimizer.colour"),
    ({"model.module.in_features": "2"}, "model.module"),
    ({"model.module.bias": "yes"}, "model.module.bias"),
    ({"model.criterion.reduction": 5}, "model.criterion.reduction"),
    ({"model.optimizer.cls": "torch.optim.NoSuchOptimizer"}, "model.optimizer.cls"),
    ({"model.module.cls": "no_such_module.Net"}, "model.module.cls"),
    ({"transitions": [{"trigger": "go", "source": "train", "dest": "nowhere"}]}, "transitions[0]"),
]


def to_toml(value: Any, prefix: str = "") -> str:
    """A config dict as TOML (inline tables and arrays; enough for these configs)."""

    def inline(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {inline(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(inline(x) for x in v) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return json.dumps(v)

    return "".join(f"{json.dumps(str(k))} = {inline(v)}\n" for k, v in value.items())


@pytest.mark.parametrize("changes, field", CONFIG_CASES, ids=lambda v: repr(v) if isinstance(v, dict) else v)
def test_wrong_types_and_unknown_keys_name_the_field_in_every_entry_point(
    changes: dict, field: str, tmp_path: Path, faults
) -> None:
    cfg = config_with(changes, db_url=(tmp_path / "db").as_uri())
    toml_path = tmp_path / "config.toml"
    toml_path.write_text(to_toml(cfg))
    attempts = {
        "from_dict": lambda: Config.from_dict(cfg),
        "from_toml": lambda: Config.from_toml(toml_path),
        "Session.from_config": lambda: Session.from_config(cfg).close(),
    }
    caught = 0
    for entry, call in attempts.items():
        with pytest.raises(ConfigError) as err:
            call()
        assert err.value.field == field, (entry, err.value.field)
        assert repr(field) in str(err.value)
        caught += 1
    assert not (tmp_path / "db").exists()  # refused before anything was written
    faults.record("hostile: invalid config", injected=len(attempts), survived=caught, lost=0)


@pytest.mark.parametrize("changes, field", BUILD_CASES, ids=lambda v: repr(v) if isinstance(v, dict) else v)
def test_spec_arguments_are_checked_when_the_session_builds_them(changes: dict, field: str, tmp_path: Path, faults) -> None:
    cfg = config_with(changes, db_url=(tmp_path / "db").as_uri())
    Config.from_dict(cfg)  # the shape is fine: specs are checked against the constructor when built
    with pytest.raises(ConfigError) as err:
        Session.from_config(cfg).close()
    assert err.value.field == field
    faults.record("hostile: invalid config", injected=1, survived=1, lost=0)


CONFIG_BUGS = [
    pytest.param({"db": "nonsense"}, "db", id="db not a URL -> StorageError"),
    pytest.param({"db": "http://x"}, "db", id="db unknown scheme -> StorageError"),
    pytest.param({"checkpoint.db": "nonsense"}, "checkpoint.db", id="checkpoint.db not a URL -> StorageError"),
    pytest.param({"seed": 2**70}, "seed", id="seed over 64 bits -> ValueError"),
    pytest.param({"model.module.in_features": -2}, "model.module", id="negative size -> RuntimeError"),
    pytest.param({"model.device": "quantum"}, "model.device", id="unknown device -> RuntimeError"),
    pytest.param({"model.module.cls": "..."}, "model.module.cls", id="relative import path -> TypeError"),
    pytest.param({"model.module": {"cls": "builtins.int"}}, "model.module", id="module not an nn.Module -> AttributeError"),
    pytest.param({"model.module": None}, "model.module", id="module null -> AttributeError"),
    pytest.param({"model.module": True}, "model.module", id="module a bool -> AttributeError"),
    pytest.param({"metadata": {"$where": 1}}, "metadata", id="metadata key with $ -> CodecError"),
    pytest.param({"stages.0.data": {"$gt": ""}}, "stages[0].data", id="stage data key with $ -> CodecError"),
    pytest.param({"stages.0.name": ""}, "stages[0].name", id="empty stage name -> field 'stages[].name'"),
    pytest.param({"updates": "abc"}, "updates", id="updates not a list -> accepted"),
    pytest.param({"updates": [5]}, "updates[0]", id="update not a spec -> accepted"),
]


@pytest.mark.parametrize("changes, field", CONFIG_BUGS)
def test_values_only_the_session_can_judge_are_config_errors_too(changes: dict, field: str, tmp_path: Path) -> None:
    cfg = config_with(changes, db_url=(tmp_path / "db").as_uri())
    with pytest.raises(ConfigError) as err:
        Session.from_config(cfg).close()
    assert err.value.field == field


def test_a_config_without_db_uses_the_default_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = copy.deepcopy(VALID_CONFIG)
    assert "db" not in cfg
    Session.from_config(cfg, session_id="default-db").close()
    assert (tmp_path / "ptutils-runs").is_dir()


@pytest.mark.parametrize("cfg", [{**VALID_CONFIG, 5: 1}, {**VALID_CONFIG, 5: 1, "x": 2},
                                 {**VALID_CONFIG, "model": {**VALID_CONFIG["model"], 5: 1, "y": 2}}], ids=["int", "mixed", "nested mixed"])
def test_keys_that_are_not_strings_are_config_errors_with_a_string_field(cfg: dict) -> None:
    with pytest.raises(ConfigError) as err:
        Config.from_dict(cfg)
    assert isinstance(err.value.field, str)


@pytest.mark.parametrize("text", [b'name = "\xff\xfe"\n', b"[metadata]\nwhen = 07:32:00\n", b"[metadata]\nday = 1979-05-27\n"],
                         ids=["invalid UTF-8", "TOML time in metadata", "TOML date in metadata"])
def test_toml_files_ptutils_cannot_use_are_config_errors(text: bytes, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    cfg = config_with({"metadata": DELETE}, db_url=(tmp_path / "db").as_uri())
    path.write_bytes(to_toml(cfg).encode() + text)
    with pytest.raises(ConfigError):
        Session.from_config(Config.from_toml(path)).close()


# --- hypothesis: mutate a valid config
def locations(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every (path) to a value inside a config dict (dict keys and list indices)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*path, k)
            yield from locations(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*path, i)
            yield from locations(v, (*path, i))


def containers(value: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict):
        yield path
        for k, v in value.items():
            yield from containers(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from containers(v, (*path, i))


def field_text(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def field_paths(cfg: Any) -> set[str]:
    return {field_text(p) for p in locations(cfg)}


# Keys are always strings: keys that are not are pinned by test_keys_that_are_not_strings...
json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
    st.sampled_from(["torch.nn.Linear", "train", "eval", "cpu", "file:///nonexistent-ptutils/x", "$where", "../x", ""]),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10_000), json_values),
    st.tuples(st.just("add"), st.integers(0, 10_000), st.tuples(st.text(min_size=1, max_size=8), json_values)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.none()),
)


def mutate(cfg: dict, steps: list[tuple]) -> dict:
    """Apply ("set", pick, value), ("add", pick, (new key, value)) and ("delete", pick, None) steps.

    ``pick`` chooses the place (modulo the number of places); "add" adds an
    unknown key to a mapping (a key already there is left alone).
    """
    cfg = copy.deepcopy(cfg)
    for kind, pick, arg in steps:
        if kind == "add":
            spots = list(containers(cfg))
            target = spots[pick % len(spots)]
        else:
            spots = list(locations(cfg))
            if not spots:
                continue
            target = spots[pick % len(spots)]
        parent: Any = cfg
        for part in (target if kind == "add" else target[:-1]):
            parent = parent[part]
        if kind == "add":
            parent.setdefault(arg[0], arg[1])
        elif kind == "set":
            parent[target[-1]] = arg
        elif isinstance(parent, dict):
            del parent[target[-1]]
        else:
            parent.pop(target[-1])
    return cfg


@settings(max_examples=FUZZ_EMBEDDED, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(mutation, min_size=1, max_size=3))
@example(steps=[("set", 1, "3")]).via("seed as a string")
@example(steps=[("add", 0, ("learning_rate", 0.1))]).via("unknown top-level key")
@example(steps=[("delete", 2, None)]).via("required key removed")
def test_fuzz_mutated_configs_raise_only_config_errors_naming_a_real_field(steps: list[tuple]) -> None:
    original = copy.deepcopy(VALID_CONFIG)
    cfg = mutate(original, steps)
    try:
        Config.from_dict(cfg)
    except ConfigError as err:
        assert isinstance(err.field, str)
        real = field_paths(cfg) | field_paths(original) | {"<root>"}
        assert err.field in real, (err.field, sorted(real))


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10_000), json_leaves.filter(lambda v: not isinstance(v, (int, float, str)) or isinstance(v, bool))),
    st.tuples(st.just("add"), st.integers(0, 10_000), st.tuples(
        st.text(min_size=1, max_size=8).filter(lambda k: not k.startswith("$") and "\x00" not in k), json_leaves)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.none()),
), min_size=1, max_size=2))
def test_fuzz_mutated_configs_through_the_session_raise_only_config_errors(steps: list[tuple], tmp_path_factory) -> None:
    """Through Session.from_config: builds every part; 200 examples (each builds a model and a record).

    Numbers and strings are not substituted here, and added keys never start
    with "$": bad URLs, huge seeds, bad import paths, $-keys and a module that
    is not a spec are the bugs pinned by test_values_only_the_session_can_judge...,
    as is the default database URL (test_a_config_without_db_uses_the_default_database).
    """
    cfg = mutate(config_with({}, db_url=tmp_path_factory.mktemp("cfgdb").as_uri()), steps)
    model = cfg.get("model")
    if "db" not in cfg or (isinstance(model, dict) and "module" in model and not isinstance(model["module"], dict)):
        return  # the default URL, and a module that is no spec: pinned by the tests named above
    if isinstance(cfg.get("checkpoint"), dict) and isinstance(cfg["checkpoint"].get("db"), str):
        return  # a URL string added as checkpoint.db: test_values_only_the_session_can_judge...
    try:
        Session.from_config(cfg).close()
    except ConfigError as err:
        assert isinstance(err.field, str) and err.field in field_paths(cfg) | field_paths(VALID_CONFIG) | {"<root>"}


# ====================================================================== oversized documents
OVER_16MB = 17 * 1024 * 1024
# The real limits: MariaDB refuses a statement over max_allowed_packet (16 MiB on
# the CI server), MongoDB a BSON document over 16 MiB; the filesystem, SQLite
# and PostgreSQL (jsonb up to 255 MiB) store 17 MiB.
REFUSES_17MB = {"mariadb", "mongo"}


def test_documents_over_the_backend_limit_are_refused_clearly_and_change_nothing(db: DBInterface, backend: str, faults) -> None:
    db.save({"_id": "neighbour", "v": 1, "s": "n" * 1000})
    db.save({"_id": "grows", "v": 1})
    before = snapshot(db)
    big_string = {"_id": "big-string", "s": "y" * OVER_16MB}
    big_list = {"_id": "big-list", "l": ["z" * 100] * (OVER_16MB // 100)}  # 17 MiB of small inline items
    attempts: list[tuple[str, Callable[[], Any]]] = [
        ("save 17 MiB string", lambda: db.save(big_string)),
        ("save 17 MiB inline list", lambda: db.save(big_list)),
        ("replace with 17 MiB", lambda: db.save({"_id": "neighbour", "s": "r" * OVER_16MB})),
        ("$set 17 MiB", lambda: db.update("grows", {"$set": {"s": "g" * OVER_16MB}})),
        ("$push 17 MiB", lambda: db.update("grows", {"$push": {"l": "p" * OVER_16MB}})),
    ]
    injected = survived = 0
    for name, call in attempts:
        injected += 1
        if backend in REFUSES_17MB:
            with pytest.raises(DocumentTooLargeError) as err:
                call()
            assert db.collection_name in str(err.value), name
            assert snapshot(db) == before, f"{name} changed the store"
        else:
            call()
        survived += 1
    if backend in REFUSES_17MB:
        assert not db.exists("big-string") and not db.exists("big-list")
        # Under the limit is stored: the limit is the backend's, not one of ours.
        db.save({"_id": "under", "s": "u" * (12 * 1024 * 1024)})
        assert db.load_from_id("under")["s"] == "u" * (12 * 1024 * 1024)
        lost = count_lost(before, db)
    else:
        assert db.load_from_id("big-string")["s"] == big_string["s"]
        assert db.load_from_id("big-list")["l"] == big_list["l"]
        assert db.load_from_id("grows")["l"] == ["p" * OVER_16MB]
        lost = count_lost({k: v for k, v in before.items() if k not in ("neighbour", "grows")}, db)
    faults.record("hostile: oversized document", injected=injected, survived=survived, lost=lost)
    assert lost == 0


# ====================================================================== fuzz: the query translator
FUZZ_KEYS = [k for k in HOSTILE_KEYS if k not in ('a"]',)] + ["s", "n", "o", "l", "_id", "missing"]
plain_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=5)
# Lone surrogates are kept out: SQL and Mongo refuse them with a CodecError
# (test_lone_surrogates_are_stored_exactly_or_refused_with_a_ptutils_error).
fuzz_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(width=64), st.sampled_from(HOSTILE_VALUES),
    st.sampled_from([0, 1, -2.5, 1e300, 2, "1", "", "a"]), plain_text,
)
fuzz_paths = st.one_of(
    st.sampled_from(FUZZ_KEYS),
    st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(["o", 'a"]', "l", "s"]), st.sampled_from(FUZZ_KEYS + ["b"])),
    st.sampled_from(["$.x", "x.$.y", "a..b", ".a", "a.", "", "$where", 'a"].b', "o.a\"].b", "l.0"]),
    plain_text.filter(bool),
)
fuzz_ops = st.sampled_from(
    ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists"] * 3
    + list(FORBIDDEN) + ["$not", "$elemMatch", "$size", "$type", "$mod", "$all", "$options", "$", "$and", "$or", "eq"]
)
fuzz_operands = st.one_of(
    fuzz_scalars, st.lists(fuzz_scalars, max_size=4), st.dictionaries(fuzz_ops, fuzz_scalars, max_size=2),
)
fuzz_leaf = st.one_of(
    st.dictionaries(fuzz_paths, fuzz_scalars, min_size=1, max_size=2),
    st.dictionaries(fuzz_paths, st.dictionaries(fuzz_ops, fuzz_operands, min_size=1, max_size=3), min_size=1, max_size=2),
)
any_queries = st.recursive(
    fuzz_leaf,
    lambda inner: st.one_of(
        st.builds(lambda op, qs: {op: qs}, st.sampled_from(["$and", "$or"]), st.lists(inner, max_size=3)),
        st.builds(lambda a, b: {**a, **b}, inner, inner),
        st.builds(lambda op, q: {op: q}, st.sampled_from(["$and", "$or", "$nor", "$not"]), inner),
    ),
    max_leaves=6,
)
# Valid queries built from the same hostile paths and values, so that most examples reach the backend.
valid_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(HOSTILE_VALUES), st.sampled_from([0, 1, -2.5, 1e300, 2, "1", "", "a"]), plain_text,
)
orderable = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
                      st.sampled_from(HOSTILE_VALUES), plain_text)
valid_paths = st.one_of(
    st.sampled_from(FUZZ_KEYS),
    st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(["o", 'a"]', "l", "s"]), st.sampled_from(FUZZ_KEYS + ["b"])),
    st.sampled_from(['a"].b', 'o.a"].b', "l.0"]),
    plain_text.filter(lambda k: k and "." not in k and not k.startswith("$")),
)
valid_conditions = st.one_of(
    valid_scalars,
    st.fixed_dictionaries({}, optional={
        "$eq": valid_scalars, "$ne": valid_scalars, "$gt": orderable, "$gte": orderable, "$lt": orderable,
        "$lte": orderable, "$in": st.lists(valid_scalars, max_size=4), "$nin": st.lists(valid_scalars, max_size=4),
        "$exists": st.booleans(),
    }).filter(bool),
)
valid_queries = st.recursive(
    st.dictionaries(valid_paths, valid_conditions, min_size=1, max_size=2),
    lambda inner: st.one_of(
        st.builds(lambda op, qs: {op: qs}, st.sampled_from(["$and", "$or"]), st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda a, b: {**a, **b}, inner, inner),
    ),
    max_leaves=6,
)
fuzz_queries = st.one_of(valid_queries, valid_queries, any_queries)


def test_fuzz_query_translator_agrees_with_the_reference_or_refuses(db: DBInterface, backend: str, faults) -> None:
    docs = hostile_documents()
    for doc_id, body in docs.items():
        db.save({"_id": doc_id, **body})
    other = db.collection(f"{db.collection_name}_other")
    other.save({"_id": "other-1", **docs["d01"]})
    reference = [{"_id": i, "_version": 1, **b} for i, b in sorted(docs.items())]
    before = snapshot(db)
    tally = {"examples": 0, "refused": 0, "agreed": 0}

    @fuzz_settings(backend)
    @given(query=fuzz_queries, limit=st.none() | st.integers(1, 3))
    def check(query: dict, limit: int | None) -> None:
        try:
            node = parse_query(query)
        except QueryError:
            node = None
        tally["examples"] += 1
        if node is None:
            with pytest.raises(QueryError):
                db.load(query)
            with pytest.raises(QueryError):
                db.count(query)
            tally["refused"] += 1
            return
        expected = [d for d in reference if matches(node, d)]
        got = db.load(query, limit=limit)
        assert ids_of(got) == ids_of(expected)[:limit], query
        for want, have in zip(expected, got):
            assert have == want, query
        assert db.count(query) == len(expected), query
        tally["agreed"] += 1

    check()
    lost = count_lost(before, db) + (other.count() != 1)
    faults.record("fuzz: query translator", injected=tally["examples"], survived=tally["refused"] + tally["agreed"],
                  lost=lost, detail=f"{tally['agreed']} agreed with the reference, {tally['refused']} refused")
    assert lost == 0


# ====================================================================== fuzz: the codec
NUMPY_DTYPES = ["|b1", "|u1", "|i1", "<i2", ">i2", "<u4", "<i8", ">i8", "<u8", "<f2", "<f4", ">f4", "<f8", ">f8",
                "<c8", "<c16", "<M8[ns]", "<m8[s]", "|S3", "<U2"]
TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
                torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2]
shapes = st.one_of(
    st.lists(st.integers(0, 4), max_size=3),
    st.just([9000]),  # over the 64 kB blob threshold for 8-byte dtypes: out of line
)


@st.composite
def np_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = tuple(draw(shapes))
    raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(dtype.itemsize * math.prod(shape))
    if dtype.kind == "b":
        return np.frombuffer(raw, np.uint8).reshape(shape) % 2 == 1
    if dtype.kind in "SU":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        alphabet = [b"", b"a", b"\x00x", b"abc", b"\xff"] if dtype.kind == "S" else ["", "a", "\u00e9", "ab", "\U0001f600"]
        return np.array(alphabet, dtype=dtype)[rng.integers(0, len(alphabet), shape)]
    return np.frombuffer(raw, dtype).reshape(shape).copy()


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(shapes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = bytearray(np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(itemsize * math.prod(shape)))
    if dtype is torch.bool:
        raw = bytearray(b % 2 for b in raw)
    t = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    if t.dim() > 1 and draw(st.booleans()):
        t = t.transpose(0, -1)  # not contiguous
    if t.is_floating_point() and dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) and draw(st.booleans()):
        t = torch.nn.Parameter(t.clone(), requires_grad=draw(st.booleans()))
    return t


# Strings without lone surrogates (see the query fuzzer); keys without NUL or a leading "$" (the codec refuses them).
codec_keys = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6).filter(
    lambda k: not k.startswith("$"))
codec_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(), st.text(
        st.characters(blacklist_categories=("Cs",)), max_size=8),
    st.binary(max_size=16), st.binary(max_size=16).map(bytearray),
    # Fixed offsets: a zoneinfo zone comes back as its offset (its name is not stored), and
    # Python never calls an ambiguous local time equal to one in another zone (PEP 495).
    st.datetimes(timezones=st.none() | st.builds(lambda m: dt.timezone(dt.timedelta(minutes=m)), st.integers(-1439, 1439))),
    np_arrays(), tensors(),
    st.sampled_from([np.float32(1.5), np.int64(-3), np.bool_(True), np.complex64(1 - 2j), np.uint8(255)]),
)
codec_values = st.recursive(
    codec_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(codec_keys, inner, max_size=3),
    ),
    max_leaves=6,
)


def test_fuzz_codec_round_trips_exactly_through_the_backend(db: DBInterface, backend: str, faults) -> None:
    db.save({"_id": "bystander", "v": np.arange(5)})
    tally = {"examples": 0, "exact": 0}

    @fuzz_settings(backend)
    @given(value=codec_values)
    def check(value: Any) -> None:
        tally["examples"] += 1
        doc_id = db.save({"_id": "fuzz", "value": value})
        assert_identical({"value": value}, stored_body(db.load_from_id(doc_id)))
        tally["exact"] += 1

    check()
    db.delete("fuzz")
    assert_identical(np.arange(5), db.load_from_id("bystander")["v"])
    lost = tally["examples"] - tally["exact"] + (db.count() != 1)
    faults.record("fuzz: codec round trip", injected=tally["examples"], survived=tally["exact"], lost=lost)
    assert lost == 0


def corrupt(text: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(text)
    for kind, pos, byte in edits:
        if not data:
            break
        pos %= len(data)
        if kind == "flip":
            data[pos] ^= 1 << (byte % 8)
        elif kind == "set":
            data[pos] = byte
        elif kind == "delete":
            del data[pos]
        elif kind == "insert":
            data.insert(pos, byte)
        else:
            del data[pos:]
    return bytes(data)


encodable = st.dictionaries(st.sampled_from(["a", "b", "c"]), codec_values, min_size=1, max_size=3)
edits = st.lists(st.tuples(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]), st.integers(0, 2**16),
                           st.integers(0, 255)), min_size=1, max_size=4)


def test_fuzz_corrupted_encoded_documents_load_or_raise_only_codec_or_corruption_errors(
    db: DBInterface, backend: str, faults
) -> None:
    from ptutils import codec

    db.save({"_id": "bystander", "v": 1})
    tally = {"examples": 0, "stored": 0, "loaded": 0, "refused": 0}

    @fuzz_settings(backend)
    @given(value=encodable, edit=edits)
    def check(value: dict, edit: list) -> None:
        tally["examples"] += 1
        written: list[str] = []
        encoded = codec.encode(value, put_blob=lambda b: written.append(db.put_blob(b)) or written[-1])
        damaged = corrupt(json.dumps(encoded).encode(), edit)
        try:
            stored = json.loads(damaged)
        except (ValueError, UnicodeDecodeError):
            stored = {"text": damaged.decode("latin-1")}  # unparsable: a store would hold it as text, if at all
        if not isinstance(stored, dict):
            stored = {"value": stored}
        # The backend primitive stores an already-encoded document as is: what a damaged store would hold.
        try:
            db._write("damaged", stored)
        except StorageError:
            return  # the backend cannot even hold it (NaN in JSON, a lone surrogate, $-keys on a server)
        tally["stored"] += 1
        try:
            db.load_from_id("damaged")
            tally["loaded"] += 1
        except (CodecError, CorruptionError):
            tally["refused"] += 1
        finally:
            for blob_id in written:
                db.delete_blob(blob_id)

    check()
    lost = int(db.load_from_id("bystander")["v"] != 1)
    faults.record("fuzz: codec corruption", injected=tally["stored"], survived=tally["loaded"] + tally["refused"], lost=lost)
    assert lost == 0 and tally["stored"] == tally["loaded"] + tally["refused"]
