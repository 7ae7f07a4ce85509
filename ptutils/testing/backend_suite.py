"""The backend conformance suite: every DBInterface must pass these very tests.

The suite uses only the public DBInterface API, through a ``db`` fixture that
gives each test a fresh, empty interface (a collection of its own), never a
backend's internals.  The semantics pinned here are those of :mod:`ptutils.query`
(its module docstring) and :mod:`ptutils.database`; where a rule is subtle the
test says which.

ptutils runs it on each of its own backends.  A third-party backend (a
``DBInterface`` registered under the ``ptutils.backends`` entry point group)
runs the same tests by subclassing :class:`BackendSuite` in a test module of
its own, with a ``db`` fixture::

    import uuid

    import pytest

    from ptutils import open_db
    from ptutils.testing.backend_suite import BackendSuite


    class TestVaultBackend(BackendSuite):
        @pytest.fixture
        def db(self):
            with open_db("vault://127.0.0.1/test", collection=f"t_{uuid.uuid4().hex[:12]}") as db:
                yield db

``db`` is looked up like any fixture, so it may come from a conftest.py instead,
or be parametrised to run the suite on several configurations.  The class name
must start with ``Test`` for pytest to collect it.

A backend that lacks one of the :data:`CAPABILITIES` for a principled reason
(a store that lives inside one process cannot be shared with another) declares
what it has, and the tests that need the rest are skipped, each saying which
capability it lacks::

    class TestMemoryBackend(BackendSuite):
        capabilities = BackendSuite.capabilities - {"cross_process"}

The tests expect the default blob threshold (``DBInterface.blob_threshold``,
64 KiB).  The suite needs pytest and hypothesis (its differential test draws
random documents and queries).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptutils import open_db
from ptutils.database import DBInterface, check_id
from ptutils.errors import (
    CodecError,
    ConflictError,
    CorruptionError,
    InvalidIdError,
    NotFoundError,
    QueryError,
)
from ptutils.query import get_path, matches, sort_docs
from ptutils.testing.assertions import assert_identical, stored_body
from ptutils.testing.processes import increment_worker, process_context, run_processes

__all__ = ["CAPABILITIES", "BackendSuite"]

CAPABILITIES: Mapping[str, str] = {
    "cross_process": "another process that opens db.url sees the same data and updates it atomically",
}
"""What a backend may lack, by name, with what having it means."""


class _SuitePart:
    """What every part of the suite shares: the capabilities the backend under test declares."""

    capabilities: ClassVar[frozenset[str]] = frozenset(CAPABILITIES)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.capabilities) - set(CAPABILITIES))
        if unknown:
            raise TypeError(f"{cls.__name__} declares unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}")

    def require(self, capability: str) -> None:
        """Skip this test, saying why, unless the backend under test declares ``capability``."""
        if capability not in self.capabilities:
            pytest.skip(f"the backend does not declare {capability!r} ({CAPABILITIES[capability]})")


BIG = 10_000  # float64 elements: 80 kB, over the 64 kB blob threshold


def ids_of(docs: list[dict]) -> list[str]:
    return [d["_id"] for d in docs]


def save_all(db: DBInterface, docs: dict[str, dict]) -> None:
    for doc_id, body in docs.items():
        assert db.save({"_id": doc_id, **body}) == doc_id


def blob_ref(db: DBInterface, doc_id: str, field: str) -> str | None:
    """The blob id the stored form of ``field`` points to (via a projection), or None if inline."""
    projected = db.load({"_id": doc_id}, projection=[f"{field}.blob"])
    assert len(projected) == 1
    ref = get_path(projected[0], (field, "blob"))
    return ref if isinstance(ref, str) else None


def blob_exists(db: DBInterface, blob_id: str) -> bool:
    try:
        db.get_blob(blob_id)
    except NotFoundError:
        return False
    return True


# ------------------------------------------------------------------ round trips
NUMPY_DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "longdouble", "complex64", "complex128", "clongdouble",
    ">i4", ">f8", "<u2", ">c16", "datetime64[ns]", "datetime64[D]", "timedelta64[ms]", "S5", "U4",
]


def numpy_sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    dt_ = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.random.default_rng(1).integers(0, 120, size=n)
    if dt_.kind == "b":
        values = raw % 2 == 0
    elif dt_.kind in "mM":
        values = raw.astype("int64").astype(dt_)
    elif dt_.kind == "S":
        values = np.array([f"b{v}".encode() for v in raw], dtype=dt_)
    elif dt_.kind == "U":
        values = np.array([f"é{v}" for v in raw], dtype=dt_)
    elif dt_.kind == "c":
        values = (raw - 60 + 1j * raw / 7).astype(dt_)
    elif dt_.kind == "f":
        values = ((raw - 60) / 7).astype(dt_)
        if n >= 3:
            values[:3] = [np.nan, np.inf, -0.0]
    else:
        values = raw.astype(dt_)
    return values.reshape(shape)


TORCH_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32,
    torch.float64, torch.complex32, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


def torch_sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    base = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape) % 17 - 5
    if dtype == torch.bool:
        return base > 0
    if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        return (base + 5).to(torch.int64).to(dtype)
    if dtype.is_complex:
        return torch.complex(base, base / 3).to(dtype) if dtype != torch.complex32 else torch.complex(
            base.half(), (base / 3).half()
        )
    return base.to(dtype)


class RoundTrips(_SuitePart):
    """Documents come back with exactly their types, dtypes, shapes and values; large values go out of line."""

    def test_notes_example_round_trip(self, db: DBInterface) -> None:
        """The DBInterface example of the design notes, end to end."""
        doc = {
            "name": "PyTorch experiment",
            "config": {
                "model": {"arch": "alexnet", "layers": [64, 192, 384], "dropout": 0.5, "pretrained": False},
                "data": {"path": "/data/imagenet.h5", "batch_size": 256, "shuffle": True, "mean": None},
            },
            "results": [np.random.default_rng(0).random((100, 100)), torch.randn((100, 100))],
        }
        doc_id = db.save(doc)
        check_id(doc_id)
        from_id = db.load_from_id(doc_id)
        assert from_id["_id"] == doc_id and from_id["_version"] == 1
        assert_identical(doc, stored_body(from_id))
        from_query = db.load({"name": "PyTorch experiment"})
        assert ids_of(from_query) == [doc_id]
        assert_identical(doc, stored_body(from_query[0]))
        assert db.delete(doc_id) == 1
        with pytest.raises(NotFoundError):
            db.load_from_id(doc_id)
        assert db.load({"name": "PyTorch experiment"}) == []

    def test_numpy_arrays_round_trip_every_dtype_and_shape(self, db: DBInterface) -> None:
        doc: dict = {}
        for dtype in NUMPY_DTYPES:
            doc[dtype.replace("[", "_").replace("]", "").replace(">", "be_").replace("<", "le_")] = {
                "matrix": numpy_sample(dtype, (3, 4)),
                "scalar0d": numpy_sample(dtype, ()),
                "empty": numpy_sample(dtype, (0,)),
                "empty3d": numpy_sample(dtype, (2, 0, 3)),
                "npscalar": numpy_sample(dtype, (2,))[0],
            }
        doc["fortran"] = np.asfortranarray(np.arange(12.0).reshape(3, 4))
        doc["strided"] = np.arange(40, dtype=np.int32).reshape(4, 10)[::2, ::-3]
        doc["large"] = np.random.default_rng(2).standard_normal((BIG,))
        doc["large_int8"] = np.arange(200_000, dtype=np.int64).astype(np.int8).reshape(400, 500)
        loaded = db.load_from_id(db.save(doc))
        # non-contiguous arrays come back as their (contiguous) values
        doc["fortran"] = np.ascontiguousarray(doc["fortran"])
        doc["strided"] = np.ascontiguousarray(doc["strided"])
        assert_identical(doc, stored_body(loaded))

    @pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
    def test_torch_tensors_round_trip_every_dtype_and_shape(self, db: DBInterface) -> None:
        doc: dict = {}
        for dtype in TORCH_DTYPES:
            name = str(dtype).removeprefix("torch.")
            doc[name] = {
                "matrix": torch_sample(dtype, (3, 5)),
                "scalar0d": torch_sample(dtype, ()),
                "empty": torch_sample(dtype, (0,)),
                "empty3d": torch_sample(dtype, (2, 0, 4)),
            }
        doc["nan_inf"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=torch.bfloat16)
        doc["transposed"] = torch.arange(12.0).reshape(3, 4).t()
        doc["conj"] = torch.complex(torch.ones(3), torch.arange(3.0)).conj()
        doc["grad"] = torch.ones(2, 2, requires_grad=True)
        doc["param"] = torch.nn.Parameter(torch.full((3,), 0.5))
        doc["frozen_param"] = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
        doc["large"] = torch.randn(256, 128)
        doc["large_bf16"] = torch.randn(300, 200).to(torch.bfloat16)
        loaded = stored_body(db.load_from_id(db.save(doc)))
        doc["transposed"] = doc["transposed"].contiguous()
        doc["conj"] = doc["conj"].resolve_conj()
        assert_identical(doc, loaded)
        assert isinstance(loaded["param"], torch.nn.Parameter) and loaded["param"].requires_grad
        assert isinstance(loaded["frozen_param"], torch.nn.Parameter) and not loaded["frozen_param"].requires_grad

    def test_python_values_round_trip_exactly(self, db: DBInterface) -> None:
        doc = {
            "none": None,
            "bools": [True, False],
            "ints": [0, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, -(2**100)],
            "floats": [0.1, -0.0, 1.0, 1e308, 5e-324, -2.5e-10, float("nan"), float("inf"), -float("inf")],
            "strings": ["", "plain", "ünïcödé ✓ 🐍", "quote'\"\\back", "line\nbreak\ttab", "nul\x00inside", "\u2028"],
            "bytes": b"\x00\xff raw",
            "bytearray": bytearray(b"mutable"),
            "big_bytes": bytes(range(256)) * 400,
            "tuple": (1, "two", (3.0, None)),
            "empty": {"dict": {}, "list": [], "tuple": (), "str": ""},
            "datetimes": [
                dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
                dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc),
                dt.datetime(1999, 12, 31, 12, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
            ],
            "deep": {"a": {"b": {"c": {"d": {"e": [[[{"f": 1}]]]}}}}},
            "keys with spaces. and dots": {"k-1": 1, "ключ": 2},
        }
        loaded = db.load_from_id(db.save(doc))
        assert_identical(doc, stored_body(loaded))
        assert type(loaded["floats"][2]) is float  # 1.0 stays a float, never becomes the int 1

    def test_large_values_go_out_of_line_and_small_ones_stay_inline(self, db: DBInterface) -> None:
        big = np.random.default_rng(3).standard_normal(BIG)
        doc = {"big": big, "small": np.arange(10), "tensor": torch.randn(BIG // 2 + 1, 4), "blobbytes": b"b" * 70_000}
        doc_id = db.save(doc)
        for field, nbytes in (("big", 80_000), ("tensor", 80_016), ("blobbytes", 70_000)):
            ref = blob_ref(db, doc_id, field)
            assert ref is not None, f"{field} should be stored as a blob"
            assert len(db.get_blob(ref)) == nbytes
        assert blob_ref(db, doc_id, "small") is None
        assert_identical(doc, stored_body(db.load_from_id(doc_id)))

    def test_save_refuses_unstorable_values_naming_the_key(self, db: DBInterface) -> None:
        with pytest.raises(CodecError, match=r"config\.fn"):
            db.save({"config": {"fn": object()}})
        with pytest.raises(CodecError):
            db.save({"$set": 1})
        with pytest.raises(CodecError):
            db.save({1: "int key"})
        with pytest.raises(CodecError):
            db.save({"objects": np.array([object()], dtype=object)})
        with pytest.raises(CodecError):
            db.save({"big": np.zeros(BIG), "bad": {1, 2}})
        with pytest.raises(TypeError):
            db.save(["not", "a", "mapping"])  # type: ignore[arg-type]
        assert db.count() == 0


# ------------------------------------------------------------------ ids
BAD_IDS = [
    "../x", "..", ".", "a/b", "/etc/passwd", "x/../../etc/passwd", "a\x00b", "\x00", "", ".hidden",
    "a..b", "a\\b", "C:x", "a b", "x' OR '1'='1", "ü", "a" * 129, "a\n", 5, None, b"bytes",
]


class IdsAndReopening(_SuitePart):
    """Ids are checked, generated and kept; an interface reopened from its URL sees the same data."""

    def test_generated_ids_are_unique_and_safe(self, db: DBInterface) -> None:
        ids = [db.save({"i": i}) for i in range(20)]
        assert len(set(ids)) == 20
        for doc_id in ids:
            assert check_id(doc_id) == doc_id
        assert sorted(ids_of(db.load())) == sorted(ids)

    def test_given_id_is_kept_and_save_replaces_the_document(self, db: DBInterface) -> None:
        assert db.save({"_id": "run-1.a_B", "a": 1, "arr": np.arange(3)}) == "run-1.a_B"
        first = db.load_from_id("run-1.a_B")
        assert first["_version"] == 1
        assert db.save({"_id": "run-1.a_B", "b": 2, "_version": 99}) == "run-1.a_B"
        second = db.load_from_id("run-1.a_B")
        assert second == {"_id": "run-1.a_B", "_version": 2, "b": 2}  # old fields gone, _version not settable
        assert db.count() == 1
        assert db.exists("run-1.a_B") and not db.exists("run-2")

    def test_save_many_stores_new_documents_and_replaces_given_ids(self, db: DBInterface) -> None:
        db.save({"_id": "old", "v": 0, "w": np.ones(BIG)})
        stale = blob_ref(db, "old", "w")
        ids = db.save_many([{"_id": "a", "v": 1}, {"v": 2, "w": np.arange(BIG)}, {"_id": "old", "v": 3}, {"_id": "a", "v": 4}])
        assert ids[0] == ids[3] == "a" and ids[2] == "old" and check_id(ids[1]) == ids[1]
        assert {d["_id"]: (d["v"], d["_version"]) for d in db.load()} == {"a": (4, 2), ids[1]: (2, 1), "old": (3, 2)}
        assert_identical(np.arange(BIG), db.load_from_id(ids[1])["w"])
        assert not blob_exists(db, stale)  # the replaced document's blob went with it
        assert db.save_many([]) == []

    def test_save_many_stores_nothing_when_one_document_is_bad(self, db: DBInterface, monkeypatch) -> None:
        put, blobs = db.put_blob, []
        monkeypatch.setattr(db, "put_blob", lambda data, blob_id=None: blobs.append(put(data, blob_id)) or blobs[-1])
        with pytest.raises(InvalidIdError):
            db.save_many([{"_id": "fine", "w": np.ones(BIG)}, {"_id": "../escape", "v": 1}])
        with pytest.raises(CodecError, match="bad"):
            db.save_many([{"_id": "fine", "v": 1}, {"_id": "other", "bad": object()}])
        with pytest.raises(TypeError, match="mappings"):
            db.save_many([{"_id": "fine"}, ["not", "a", "mapping"]])
        assert db.count() == 0 and len(blobs) == 1 and not blob_exists(db, blobs[0])

    @pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
    def test_invalid_or_path_traversal_ids_are_rejected(self, db: DBInterface, bad: object) -> None:
        db.save({"_id": "keep", "v": 1})
        attempts = [
            lambda: db.save({"_id": bad, "v": 2}),
            lambda: db.load_from_id(bad),  # type: ignore[arg-type]
            lambda: db.load_from_ids(["keep", bad]),  # type: ignore[list-item]
            lambda: db.exists(bad),  # type: ignore[arg-type]
            lambda: db.update(bad, {"$set": {"v": 3}}, upsert=True),  # type: ignore[arg-type]
            lambda: db.get_blob(bad),  # type: ignore[arg-type]
            lambda: db.delete_blob(bad),  # type: ignore[arg-type]
        ]
        if isinstance(bad, str):
            attempts.append(lambda: db.delete(bad))
        if bad is not None:  # put_blob(data, None) means "generate an id"
            attempts.append(lambda: db.put_blob(b"x", bad))  # type: ignore[arg-type]
        for attempt in attempts:
            with pytest.raises(InvalidIdError):
                attempt()
        assert ids_of(db.load()) == ["keep"]
        assert db.load_from_id("keep")["v"] == 1

    @pytest.mark.parametrize(
        "bad", ["../x", "a/b", "", "1abc", "a.b", "a-b", "x" * 64, "a\x00", "a\n", "x; DROP TABLE y", 3], ids=repr
    )
    def test_invalid_collection_names_are_rejected(self, db: DBInterface, bad: object) -> None:
        with pytest.raises(InvalidIdError):
            db.collection(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidIdError):
            open_db(db.url, collection=bad)

    def test_load_from_ids_keeps_order_and_reports_missing(self, db: DBInterface) -> None:
        save_all(db, {"c": {"v": 3}, "a": {"v": 1}, "B": {"v": 2}})
        assert [d["v"] for d in db.load_from_ids(["B", "c", "a", "B"])] == [2, 3, 1, 2]
        assert db.load_from_ids([]) == []
        with pytest.raises(NotFoundError, match="nope"):
            db.load_from_ids(["a", "nope"])
        with pytest.raises(NotFoundError, match="ghost") as info:
            db.load_from_id("ghost")
        assert isinstance(info.value, KeyError)

    def test_reopening_by_url_sees_the_same_documents(self, db: DBInterface) -> None:
        doc = {"arr": np.arange(BIG), "t": torch.ones(2)}
        doc_id = db.save(doc)
        with open_db(db.url, collection=db.collection_name) as again:
            again.ping()
            assert_identical(doc, stored_body(again.load_from_id(doc_id)))

    def test_interface_is_a_context_manager_and_pings(self, db: DBInterface) -> None:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with open_db(db.url, collection=name) as opened:
            opened.ping()
            doc_id = opened.save({"a": 1})
        with open_db(db.url, collection=name) as again:
            assert again.load_from_id(doc_id)["a"] == 1
            again.delete({})


# ------------------------------------------------------------------ queries
QUERY_DOCS: dict[str, dict] = {
    "d1": {"n": 1, "s": "a", "flag": True, "x": None, "nest": {"v": 1, "w": "p"}, "l": [1, 2], "big": 2**53 + 1},
    "d2": {"n": 2.5, "s": "b", "flag": False, "nest": {"v": 2}},
    "d3": {"n": 1.0, "s": "B", "flag": 1, "x": 0, "nest": 5},
    "d4": {"n": "2", "s": "", "x": "null", "nest": {"v": None}},
    "d5": {"n": None, "s": "ab", "flag": 0, "nest": {"w": "q", "v": -3}},
    "d6": {"n": -7, "s": "é", "x": False, "l": []},
    "d7": {"n": True, "s": 5},
    "d8": {},
}


ALL = sorted(QUERY_DOCS)


QUERY_CASES = [
    ({}, ALL),
    ({"n": 1}, ["d1", "d3"]),  # int and float compare by value
    ({"n": 1.0}, ["d1", "d3"]),
    ({"n": {"$eq": 1}}, ["d1", "d3"]),
    ({"n": True}, ["d7"]),  # true never equals 1
    ({"flag": True}, ["d1"]),
    ({"flag": 1}, ["d3"]),
    ({"flag": False}, ["d2"]),
    ({"flag": 0}, ["d5"]),
    ({"x": None}, ["d1", "d2", "d5", "d7", "d8"]),  # null or missing
    ({"x": {"$eq": None}}, ["d1", "d2", "d5", "d7", "d8"]),
    ({"x": {"$ne": None}}, ["d3", "d4", "d6"]),
    ({"x": {"$exists": True}}, ["d1", "d3", "d4", "d6"]),  # present, even if null
    ({"x": {"$exists": False}}, ["d2", "d5", "d7", "d8"]),
    ({"x": False}, ["d6"]),
    ({"x": 0}, ["d3"]),
    ({"x": "null"}, ["d4"]),
    ({"n": {"$ne": 1}}, ["d2", "d4", "d5", "d6", "d7", "d8"]),  # negations match missing fields
    ({"n": {"$gt": 1}}, ["d2"]),  # orderings match their own kind only
    ({"n": {"$gte": 1}}, ["d1", "d2", "d3"]),
    ({"n": {"$lt": 1}}, ["d6"]),
    ({"n": {"$lte": 1, "$gt": -7}}, ["d1", "d3"]),
    ({"n": {"$gte": -7, "$lt": 2.5}}, ["d1", "d3", "d6"]),
    ({"n": {"$gt": "1"}}, ["d4"]),
    ({"s": {"$gt": "a"}}, ["d2", "d5", "d6"]),  # code point order: "B" < "a" < "ab" < "b" < "é"
    ({"s": {"$lt": "a"}}, ["d3", "d4"]),
    ({"s": {"$gte": "B", "$lte": "a"}}, ["d1", "d3"]),
    ({"s": {"$lt": 10}}, ["d7"]),
    ({"s": ""}, ["d4"]),
    ({"nest.v": 1}, ["d1"]),
    ({"nest.v": {"$gte": -3}}, ["d1", "d2", "d5"]),
    ({"nest.v": None}, ["d3", "d4", "d6", "d7", "d8"]),  # a path through a scalar is missing
    ({"nest.v": {"$exists": True}}, ["d1", "d2", "d4", "d5"]),
    ({"nest.w": {"$in": ["p", "q"]}}, ["d1", "d5"]),
    ({"nest": 5}, ["d3"]),
    ({"nest": {"$exists": True}}, ["d1", "d2", "d3", "d4", "d5"]),
    ({"nest.v.deep": {"$exists": True}}, []),
    ({"l": 1}, []),  # no array containment: comparisons against a list never match
    ({"l": {"$ne": 1}}, ALL),
    ({"l": {"$in": [1, 2]}}, []),
    ({"l": {"$exists": True}}, ["d1", "d6"]),
    ({"nest": {"$ne": 1}}, ALL),
    ({"n": {"$in": [1, "2", None]}}, ["d1", "d3", "d4", "d5", "d8"]),
    ({"n": {"$in": [True]}}, ["d7"]),
    ({"n": {"$in": []}}, []),
    ({"n": {"$nin": []}}, ALL),
    ({"n": {"$nin": [1, None]}}, ["d2", "d4", "d6", "d7"]),
    ({"big": 2**53 + 1}, ["d1"]),  # 64-bit integers compare exactly, not as doubles
    ({"big": 2**53}, []),
    ({"big": {"$gt": 2**53}}, ["d1"]),
    ({"$and": [{"n": {"$gte": 1}}, {"s": {"$in": ["a", "b"]}}]}, ["d1", "d2"]),
    ({"$or": [{"n": 1}, {"s": "ab"}]}, ["d1", "d3", "d5"]),
    ({"$or": [{"x": {"$exists": True}}, {"flag": False}], "s": {"$ne": "a"}}, ["d2", "d3", "d4", "d6"]),
    ({"$and": [{"$or": [{"n": 1}, {"n": -7}]}, {"$or": [{"s": "é"}, {"s": "B"}]}]}, ["d3", "d6"]),
    ({"n": 1, "s": "B"}, ["d3"]),
    ({"_id": "d2"}, ["d2"]),
    ({"_id": {"$in": ["d1", "d3", "nope"]}}, ["d1", "d3"]),
    ({"_id": {"$gt": "d6"}}, ["d7", "d8"]),
    ({"_version": 1}, ALL),
]


SORT_DOCS: dict[str, dict] = {
    "b": {"k": 2, "g": "x"},
    "A": {"k": None, "g": "y"},
    "a": {"g": "x"},
    "B": {"k": "s", "g": "y"},
    "_": {"k": True, "g": "x"},
    "-1": {"k": 1.5, "g": "y"},
    "0": {"k": 2, "g": "y"},
    "Z": {"k": False, "g": "x"},
    "z": {"k": "S", "g": "x"},
    "c": {"g": "y"},
    "C": {"k": None, "g": "x"},
}


class Queries(_SuitePart):
    """The query subset of :mod:`ptutils.query`: operators, sort order, skip, limit, projection, count."""

    @pytest.mark.parametrize(("query", "expected"), QUERY_CASES, ids=[repr(q) for q, _ in QUERY_CASES])
    def test_query_operators(self, db: DBInterface, query: dict, expected: list[str]) -> None:
        save_all(db, QUERY_DOCS)
        found = db.load(query)
        assert ids_of(found) == expected  # without a sort, results come in _id order
        assert db.count(query) == len(expected)
        for doc in found:
            assert_identical({"_id": doc["_id"], "_version": 1, **QUERY_DOCS[doc["_id"]]}, doc)

    @pytest.mark.parametrize(
        ("query", "expected"),
        [c for c in QUERY_CASES if c[0] and len(c[1]) not in (0, len(ALL))][::4],
        ids=repr,
    )
    def test_delete_by_query_removes_exactly_the_matches(self, db: DBInterface, query: dict, expected: list[str]) -> None:
        save_all(db, QUERY_DOCS)
        assert db.delete(query) == len(expected)
        assert ids_of(db.load()) == [i for i in ALL if i not in expected]
        assert db.delete(query) == 0

    @pytest.mark.parametrize(
        ("sort", "expected"),
        [
            # missing < null < numbers < strings < booleans; ties always in ascending _id order
            ("k", ["a", "c", "A", "C", "-1", "0", "b", "z", "B", "Z", "_"]),
            ([("k", 1)], ["a", "c", "A", "C", "-1", "0", "b", "z", "B", "Z", "_"]),
            ([("k", -1)], ["_", "Z", "B", "z", "0", "b", "-1", "A", "C", "a", "c"]),
            ({"g": 1, "k": -1}, ["_", "Z", "z", "b", "C", "a", "B", "0", "-1", "A", "c"]),
            ([("g", -1), ("k", 1)], ["c", "A", "-1", "0", "B", "a", "C", "b", "z", "Z", "_"]),
            (None, ["-1", "0", "A", "B", "C", "Z", "_", "a", "b", "c", "z"]),
            ([("_id", -1)], ["z", "c", "b", "a", "_", "Z", "C", "B", "A", "0", "-1"]),
            ([("missing.path", -1)], ["-1", "0", "A", "B", "C", "Z", "_", "a", "b", "c", "z"]),
        ],
        ids=repr,
    )
    def test_sort_orders_kinds_and_breaks_ties_by_id(self, db: DBInterface, sort: object, expected: list[str]) -> None:
        save_all(db, SORT_DOCS)
        assert ids_of(db.load(sort=sort)) == expected
        assert ids_of(db.load(sort=sort, skip=3, limit=4)) == expected[3:7]
        assert db.load_one(sort=sort)["_id"] == expected[0]

    def test_skip_and_limit(self, db: DBInterface) -> None:
        save_all(db, SORT_DOCS)
        order = ["a", "c", "A", "C", "-1", "0", "b", "z", "B", "Z", "_"]
        assert ids_of(db.load(sort="k", limit=2)) == order[:2]
        assert ids_of(db.load(sort="k", skip=9)) == order[9:]
        assert ids_of(db.load(sort="k", skip=20)) == []
        assert ids_of(db.load(sort="k", skip=1, limit=100)) == order[1:]
        assert db.load(sort="k", limit=0) == []
        assert ids_of(db.load({"g": "y"}, sort=[("k", -1)], skip=1, limit=2)) == ["0", "-1"]
        assert db.load_one({"g": "nope"}) is None
        for bad in ({"limit": -1}, {"skip": -1}, {"limit": "3"}, {"skip": 1.5}):
            with pytest.raises(ValueError):
                db.load(**bad)

    def test_projection_keeps_only_the_given_paths_and_id(self, db: DBInterface) -> None:
        doc = {"a": 1, "n": {"x": 1, "y": {"z": 2, "q": 3}}, "arr": np.arange(3), "big": np.zeros(BIG)}
        db.save({"_id": "p", **doc})
        db.save({"_id": "q", "a": 2})
        got = db.load(projection=["n.y.z", "arr", "nope", "big"], sort="_id")
        assert_identical({"_id": "p", "n": {"y": {"z": 2}}, "arr": np.arange(3), "big": np.zeros(BIG)}, got[0])
        assert got[1] == {"_id": "q"}
        assert db.load({"a": 2}, projection=[]) == [{"_id": "q"}]
        assert db.load({"a": 1}, projection=["a", "n.x"]) == [{"_id": "p", "a": 1, "n": {"x": 1}}]

    def test_count(self, db: DBInterface) -> None:
        assert db.count() == 0
        save_all(db, QUERY_DOCS)
        assert db.count() == len(QUERY_DOCS)
        assert db.count({"n": {"$exists": True}}) == 7
        db.put_blob(b"not a document")
        assert db.count() == len(QUERY_DOCS)


# ------------------------------------------------------------------ delete and blobs
class DeleteAndBlobs(_SuitePart):
    """Deleting documents and blobs, and the blobs a document no longer references."""

    def test_delete_by_id(self, db: DBInterface) -> None:
        save_all(db, {"a": {"v": 1}, "b": {"v": 2}})
        assert db.delete("a") == 1
        assert db.delete("a") == 0
        assert db.delete("never-existed") == 0
        assert ids_of(db.load()) == ["b"]
        assert db.delete({}) == 1
        assert db.count() == 0

    def test_deleting_documents_deletes_their_blobs(self, db: DBInterface) -> None:
        for name in ("one", "two", "three"):
            db.save({"_id": name, "group": name != "one", "w": np.full(BIG, 1.0), "v": torch.zeros(BIG // 2 + 1, 4)})
        refs = {name: [blob_ref(db, name, "w"), blob_ref(db, name, "v")] for name in ("one", "two", "three")}
        assert all(r is not None and blob_exists(db, r) for rs in refs.values() for r in rs)
        assert len({r for rs in refs.values() for r in rs}) == 6
        assert db.delete("one") == 1
        assert not any(blob_exists(db, r) for r in refs["one"])
        assert all(blob_exists(db, r) for r in refs["two"] + refs["three"])
        assert db.delete({"group": True}) == 2
        assert not any(blob_exists(db, r) for rs in refs.values() for r in rs)

    def test_replacing_or_updating_a_document_deletes_blobs_it_no_longer_uses(self, db: DBInterface) -> None:
        db.save({"_id": "d", "w": np.ones(BIG), "keep": np.zeros(BIG)})
        old_w, keep = blob_ref(db, "d", "w"), blob_ref(db, "d", "keep")
        db.update("d", {"$set": {"w": np.full(BIG, 2.0)}})
        new_w = blob_ref(db, "d", "w")
        assert new_w not in (None, old_w)
        assert not blob_exists(db, old_w) and blob_exists(db, new_w) and blob_exists(db, keep)
        db.update("d", {"$inc": {"step": 1}})
        assert blob_exists(db, new_w) and blob_exists(db, keep)
        db.update("d", {"$unset": {"w": ""}})
        assert not blob_exists(db, new_w) and blob_exists(db, keep)
        db.save({"_id": "d", "other": 1})
        assert not blob_exists(db, keep)
        assert stored_body(db.load_from_id("d")) == {"other": 1}

    def test_document_whose_blob_is_gone_is_reported_as_corrupt(self, db: DBInterface) -> None:
        db.save({"_id": "d", "w": np.ones(BIG), "tag": "x"})
        db.delete_blob(blob_ref(db, "d", "w"))
        with pytest.raises(CorruptionError, match="'d'"):
            db.load_from_id("d")
        with pytest.raises(CorruptionError):
            db.load({"tag": "x"})
        assert db.load({"tag": "x"}, projection=["tag"]) == [{"_id": "d", "tag": "x"}]
        assert db.delete("d") == 1

    def test_blob_put_get_delete(self, db: DBInterface) -> None:
        payload = np.random.default_rng(4).bytes(3_000_000)
        blob_id = db.put_blob(payload)
        check_id(blob_id, "blob id")
        assert db.get_blob(blob_id) == payload
        assert db.put_blob(b"", "empty") == "empty"
        assert db.get_blob("empty") == b""
        assert db.put_blob(bytearray(b"first"), "ckpt.latest") == "ckpt.latest"
        assert db.get_blob("ckpt.latest") == b"first"
        db.put_blob(memoryview(b"second version"), "ckpt.latest")
        assert db.get_blob("ckpt.latest") == b"second version"
        db.delete_blob("ckpt.latest")
        db.delete_blob("ckpt.latest")
        with pytest.raises(NotFoundError, match="ckpt.latest"):
            db.get_blob("ckpt.latest")
        assert db.get_blob(blob_id) == payload
        assert db.count() == 0

    def test_blob_from_pieces_and_with_its_sha256(self, db: DBInterface) -> None:
        rng = np.random.default_rng(5)
        matrix = rng.standard_normal((300, 1000))
        pieces = [b"head", bytearray(b""), memoryview(rng.bytes(2_000_000)), matrix, matrix[:, ::2], memoryview(b"tail")]
        whole = b"".join(bytes(memoryview(np.ascontiguousarray(p))) for p in pieces)
        assert db.put_blob(iter(pieces), "pieces") == "pieces"
        assert db.get_blob("pieces") == whole
        blob_id, digest = db.put_blob_sha256(pieces)
        assert digest == hashlib.sha256(whole).hexdigest()
        data, read_digest = db.get_blob_sha256(blob_id)
        assert read_digest == digest and data == whole and not data.readonly
        data[:4] = b"HEAD"  # a fresh buffer: the stored blob is unchanged
        assert db.get_blob(blob_id) == whole
        assert db.put_blob_sha256(b"")[1] == hashlib.sha256(b"").hexdigest()
        with pytest.raises(TypeError):
            db.put_blob("text is not bytes")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            db.put_blob([b"ok", "text"])  # type: ignore[list-item]
        with pytest.raises(NotFoundError, match="absent"):
            db.get_blob_sha256("absent")


# ------------------------------------------------------------------ update
class Updates(_SuitePart):
    """``update``: its operators, versions, optimistic guards and upserts."""

    def test_update_operators_apply_together(self, db: DBInterface) -> None:
        db.save({"_id": "u", "a": 1, "nest": {"b": "x"}, "list": [1], "f": 1.5, "i": 10})
        new = db.update(
            "u",
            {
                "$set": {"nest.c.d": 5, "s": "str", "arr": np.arange(4, dtype=np.int16)},
                "$unset": {"a": "", "not.there": ""},
                "$inc": {"count": 2, "nest.e": 0.5, "f": 1, "i": -3},
                "$push": {"list": 2, "fresh": torch.ones(2)},
            },
        )
        expected = {
            "nest": {"b": "x", "c": {"d": 5}, "e": 0.5},
            "s": "str",
            "arr": np.arange(4, dtype=np.int16),
            "count": 2,
            "f": 2.5,
            "i": 7,
            "list": [1, 2],
            "fresh": [torch.ones(2)],
        }
        assert new["_version"] == 2
        assert_identical(expected, stored_body(new))
        assert_identical(new, db.load_from_id("u"))
        assert type(db.update("u", {"$inc": {"i": 1.0}})["i"]) is float

    def test_update_without_operators_means_set(self, db: DBInterface) -> None:
        db.save({"_id": "u", "a": 1, "b": 2})
        assert stored_body(db.update("u", {"a": 10, "c.d": 3})) == {"a": 10, "b": 2, "c": {"d": 3}}

    def test_every_write_bumps_version(self, db: DBInterface) -> None:
        db.save({"_id": "v", "n": 0})
        assert db.load_from_id("v")["_version"] == 1
        assert db.update("v", {"$inc": {"n": 1}})["_version"] == 2
        db.save({"_id": "v", "n": 5})
        assert db.load_from_id("v")["_version"] == 3
        assert db.update("v", {"$set": {"n": 5}})["_version"] == 4
        assert db.load({"_version": 4}, projection=["n"]) == [{"_id": "v", "n": 5}]

    def test_expected_version_guards_updates(self, db: DBInterface) -> None:
        db.save({"_id": "v", "n": 0})
        assert db.update("v", {"$inc": {"n": 1}}, expected_version=1)["n"] == 1
        with pytest.raises(ConflictError):
            db.update("v", {"$inc": {"n": 100}}, expected_version=1)
        with pytest.raises(ConflictError):
            db.update("v", {"$set": {"big": np.zeros(BIG)}}, expected_version=7)
        assert stored_body(db.load_from_id("v")) == {"n": 1}
        assert db.load_from_id("v")["_version"] == 2
        # the version is checked against the current document first, so a missing one conflicts too
        with pytest.raises(ConflictError):
            db.update("ghost", {"$set": {"n": 1}}, expected_version=1, upsert=True)
        assert not db.exists("ghost")

    def test_upsert_creates_and_missing_document_raises(self, db: DBInterface) -> None:
        with pytest.raises(NotFoundError, match="ghost"):
            db.update("ghost", {"$set": {"n": 1}})
        with pytest.raises(NotFoundError):
            db.update("ghost", {"$set": {"w": np.zeros(BIG)}})
        assert db.count() == 0
        created = db.update("fresh", {"$inc": {"n": 1}, "$push": {"log": "start"}, "$set": {"a.b": True}}, upsert=True)
        assert created == {"_id": "fresh", "_version": 1, "n": 1, "log": ["start"], "a": {"b": True}}
        assert db.update("fresh", {"$inc": {"n": 1}}, upsert=True)["n"] == 2
        assert db.count() == 1

    @pytest.mark.parametrize(
        "changes",
        [
            {"$inc": {"s": 1}},  # not a number
            {"$inc": {"n": "1"}},
            {"$inc": {"n": True}},
            {"$inc": {"n": float("nan")}},
            {"$set": {"s.inner": 1}},  # through a scalar
            {"$push": {"s": 1}},  # not a list
            {"$rename": {"s": "t"}},
            {"$set": {"_id": "other"}},
            {"$set": {"_version": 9}},
            {"$inc": {"_version": 1}},
            {"$set": {"$where": 1}},
            {"$set": {"a": 1}, "$unset": {"a": ""}},  # conflicting paths
            {"$set": {"a": 1, "a.b": 2}},
            {},
            {"$set": "not a mapping"},
        ],
        ids=repr,
    )
    def test_invalid_updates_raise_and_change_nothing(self, db: DBInterface, changes: dict) -> None:
        db.save({"_id": "u", "s": "text", "n": 1})
        with pytest.raises(QueryError):
            db.update("u", changes)
        assert db.load_from_id("u") == {"_id": "u", "_version": 1, "s": "text", "n": 1}


# ------------------------------------------------------------------ rejected queries, injection
REJECTED_QUERIES = [
    {"$where": "this.a == 1"},
    {"$where": "function() { return true; }"},
    {"a": {"$where": "1"}},
    {"$function": {"body": "function() {return true}", "args": [], "lang": "js"}},
    {"$expr": {"$eq": ["$a", 1]}},
    {"a": {"$expr": 1}},
    {"a": {"$regex": ".*"}},
    {"a": {"$regex": "^a", "$options": "i"}},
    {"a": {"$not": {"$eq": 1}}},
    {"$nor": [{"a": 1}]},
    {"$text": {"$search": "x"}},
    {"a": {"$elemMatch": {"b": 1}}},
    {"a": {"$all": [1]}},
    {"a": {"$size": 1}},
    {"a": {"$type": "string"}},
    {"a": {"$mod": [2, 0]}},
    {"a": {"b": 1}},  # sub-document equality is outside the subset
    {"a": [1, 2]},
    {"a": {"$eq": {"$gt": ""}}},
    {"a": {"$ne": {"$gt": ""}}},
    {"a": {"$in": ["x", {"$gt": ""}]}},
    {"a": {"$nin": [{"$gt": ""}]}},
    {"a": {"$in": "abc"}},
    {"a": {"$in": [[1]]}},
    {"a": {"$gt": None}},
    {"a": {"$gt": True}},
    {"a": {"$lt": [1]}},
    {"a": {"$exists": 1}},
    {"a": float("nan")},
    {"a": float("inf")},
    {"a": 2**64},
    {"a": np.arange(3)},
    {"$and": []},
    {"$or": {"a": 1}},
    {"$or": [1]},
    {"": 1},
    {"a..b": 1},
    {"a.$b": 1},
    {".a": 1},
    {5: 1},
    {"a": {"$eq": 1, "b": 2}},
]


INJECTION_KEYS = [
    "'; DROP TABLE x; --",
    'a"b',
    "a'b",
    "a\\b",
    "%",
    "_",
    "a b",
    "[0]",
    "*",
    "ünï",
    "a$b",
    "-1",
    "{}",
    ") OR 1=1 --",
    "a$$b",
    "documents",
    "null",
]


INJECTION_VALUES = [
    "'; DROP TABLE x; --",
    "' OR '1'='1",
    '" OR ""="',
    "%",
    "_",
    "\\",
    '{"$gt": ""}',
    "*/ 1 /*",
    "$where",
    "null",
]


class RejectedQueriesAndInjection(_SuitePart):
    """Whatever is outside the subset is refused; keys and values that look like code are plain data."""

    @pytest.mark.parametrize("query", REJECTED_QUERIES, ids=repr)
    def test_queries_outside_the_subset_are_rejected(self, db: DBInterface, query: dict) -> None:
        save_all(db, {"a": {"a": 1}, "b": {"a": "x"}})
        for call in (db.load, db.count, db.load_one, db.delete):
            with pytest.raises(QueryError):
                call(query)
        assert ids_of(db.load()) == ["a", "b"]

    def test_malformed_sort_projection_and_query_types_are_rejected(self, db: DBInterface) -> None:
        db.save({"_id": "a", "a": 1})
        for bad_sort in ([("a", 2)], [("a", "asc")], [("$where", 1)], ["a", 1], 5):
            with pytest.raises(QueryError):
                db.load(sort=bad_sort)
        for bad_projection in ("a", ["$a"], [""], [1]):
            with pytest.raises(QueryError):
                db.load(projection=bad_projection)
        for bad_query in ("a", ["a"], 1):
            with pytest.raises(QueryError):
                db.load(bad_query)  # type: ignore[arg-type]
        assert db.count() == 1

    def test_injection_looking_keys_and_values_are_plain_data(self, db: DBInterface) -> None:
        other = db.collection(f"{db.collection_name}_other")
        other.save({"_id": "bystander", "v": 1})
        target = {key: f"v{i}" for i, key in enumerate(INJECTION_KEYS)}
        db.save({"_id": "target", **target, "nested": dict(target), "values": list(INJECTION_VALUES)})
        db.save({"_id": "decoy", **{key: "decoy" for key in INJECTION_KEYS}})
        for i, value in enumerate(INJECTION_VALUES):
            db.save({"_id": f"val{i}", "s": value})
        total = db.count()

        for i, key in enumerate(INJECTION_KEYS):
            assert ids_of(db.load({key: f"v{i}"})) == ["target"], key
            assert ids_of(db.load({f"nested.{key}": f"v{i}"})) == ["target"], key
            assert db.count({key: {"$exists": True}}) == 2, key
            assert ids_of(db.load({key: {"$gte": "d"}}, sort=key)) == ["decoy", "target"], key
        for i, value in enumerate(INJECTION_VALUES):
            assert ids_of(db.load({"s": value})) == [f"val{i}"], value
            assert ids_of(db.load({"s": {"$in": [value]}})) == [f"val{i}"], value
            assert db.count({"s": {"$ne": value}}) == total - 1, value
            assert db.delete({"s": value, "_id": "none"}) == 0
        assert db.load({"s": "%%"}) == [] and db.load({"s": "_%"}) == []

        updated = db.update("target", {"$set": {INJECTION_KEYS[0]: "new"}, "$inc": {f"nested.{INJECTION_KEYS[1]}x": 1}})
        assert updated[INJECTION_KEYS[0]] == "new" and updated["nested"][f"{INJECTION_KEYS[1]}x"] == 1
        assert stored_body(db.load_from_id("decoy")) == {key: "decoy" for key in INJECTION_KEYS}
        assert db.load_from_id("target")["values"] == INJECTION_VALUES
        assert db.count() == total
        assert other.load_from_id("bystander")["v"] == 1 and other.count() == 1


# ------------------------------------------------------------------ collections
class SiblingCollections(_SuitePart):
    """Sibling collections share a connection, never their data."""

    def test_sibling_collections_are_isolated(self, db: DBInterface) -> None:
        sibling = db.collection(f"{db.collection_name}_b")
        assert isinstance(sibling, DBInterface) and sibling.collection_name == f"{db.collection_name}_b"
        db.save({"_id": "same", "where": "a"})
        sibling.save({"_id": "same", "where": "b"})
        sibling.save({"_id": "only-b", "where": "b"})
        db.put_blob(b"blob of a", "ckpt")
        sibling.put_blob(b"blob of b", "ckpt")
        assert db.load_from_id("same")["where"] == "a" and sibling.load_from_id("same")["where"] == "b"
        assert db.count() == 1 and sibling.count() == 2
        assert not db.exists("only-b")
        assert db.get_blob("ckpt") == b"blob of a" and sibling.get_blob("ckpt") == b"blob of b"
        assert db.delete({}) == 1
        db.delete_blob("ckpt")
        assert sibling.count() == 2 and sibling.get_blob("ckpt") == b"blob of b"
        assert sibling.update("same", {"$inc": {"n": 1}})["_version"] == 2
        assert db.count() == 0


# ------------------------------------------------------------------ differential (hypothesis)
SCALARS = [None, True, False, 0, 1, -1, 2, 2.0, 0.5, -3.25, 1e10, "", "a", "B", "ab", "b", "é", "0"]


ORDERABLE = [v for v in SCALARS if v is not None and not isinstance(v, bool)]


ID_POOL = ["a", "B", "c", "D", "e1", "E2", "_x", "-y", "0", "9z", "Zz", "zz", "A0", "a-1"]


PATHS = ["a", "b", "c", "n", "n.x", "n.y", "missing", "n.x.deep"]


SORT_PATHS = ["b", "c", "n.y", "_id"]  # fields that only ever hold scalars (or are missing)


scalars = st.sampled_from(SCALARS)


values = st.one_of(scalars, st.lists(scalars, max_size=2))


documents = st.fixed_dictionaries(
    {},
    optional={
        "a": values,
        "b": scalars,
        "c": scalars,
        "n": st.one_of(scalars, st.fixed_dictionaries({}, optional={"x": values, "y": scalars})),
    },
)


leaf_queries = st.one_of(
    st.builds(lambda p, v: {p: v}, st.sampled_from(PATHS), scalars),
    st.builds(lambda p, o, v: {p: {o: v}}, st.sampled_from(PATHS), st.sampled_from(["$eq", "$ne"]), scalars),
    st.builds(
        lambda p, ops: {p: ops},
        st.sampled_from(PATHS),
        st.dictionaries(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), st.sampled_from(ORDERABLE), min_size=1),
    ),
    st.builds(
        lambda p, o, v: {p: {o: v}}, st.sampled_from(PATHS), st.sampled_from(["$in", "$nin"]), st.lists(scalars, max_size=3)
    ),
    st.builds(lambda p, e: {p: {"$exists": e}}, st.sampled_from(PATHS), st.booleans()),
)


queries = st.recursive(
    leaf_queries,
    lambda inner: st.one_of(
        st.builds(lambda o, qs: {o: qs}, st.sampled_from(["$and", "$or"]), st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda q1, q2: {**q1, **q2}, inner, inner),
    ),
    max_leaves=6,
)


sorts = st.lists(st.tuples(st.sampled_from(SORT_PATHS), st.sampled_from([1, -1])), max_size=2, unique_by=lambda t: t[0])


@st.composite
def collections(draw: st.DrawFn) -> list[dict]:
    docs = draw(st.lists(documents, max_size=8))
    ids = draw(st.lists(st.sampled_from(ID_POOL), min_size=len(docs), max_size=len(docs), unique=True))
    return [{"_id": doc_id, "_version": 1, **doc} for doc_id, doc in zip(ids, docs)]


# pytest runs a test method on a fresh instance of its class each time (once per backend here); the
# suite's classes hold no state, so these are not the different executors Hypothesis warns about.
DIFFERENTIAL = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.differing_executors,
    ],
)


class DifferentialQueries(_SuitePart):
    """Random documents and queries, checked against the reference evaluator."""

    @DIFFERENTIAL
    @given(
        stored=collections(),
        query=queries,
        sort=sorts,
        skip=st.integers(0, 3),
        limit=st.none() | st.integers(1, 4),
    )
    def test_differential_queries_match_the_reference_evaluator(
        self, db: DBInterface, stored: list[dict], query: dict, sort: list, skip: int, limit: int | None
    ) -> None:
        """Random documents and queries: the backend must agree with query.matches/sort_docs."""
        db.delete({})
        for doc in stored:
            db.save(doc)
        expected = sort_docs(sorted((d for d in stored if matches(query, d)), key=lambda d: d["_id"]), sort)
        assert db.count(query) == len(expected)
        got = db.load(query, sort=sort, skip=skip, limit=limit)
        window = expected[skip:] if limit is None else expected[skip : skip + limit]
        assert ids_of(got) == ids_of(window)
        for want, have in zip(window, got):
            assert_identical(want, have)
        assert db.delete(query) == len(expected)
        assert ids_of(db.load()) == sorted(d["_id"] for d in stored if not matches(query, d))


# ------------------------------------------------------------------ concurrency
class Concurrency(_SuitePart):
    """Writers in other processes lose no update."""

    def test_concurrent_increments_from_processes_lose_no_update(self, db: DBInterface) -> None:
        self.require("cross_process")
        workers, times = 8, 15
        doc_id = db.save({"counter": 0, "name": "shared"})
        ctx = process_context()
        barrier = ctx.Barrier(workers)
        run_processes(ctx, increment_worker, [(db.url, db.collection_name, doc_id, times, barrier)] * workers)
        final = db.load_from_id(doc_id)
        assert final["counter"] == workers * times
        assert final["_version"] == 1 + workers * times


class BackendSuite(
    RoundTrips,
    IdsAndReopening,
    Queries,
    DeleteAndBlobs,
    Updates,
    RejectedQueriesAndInjection,
    SiblingCollections,
    DifferentialQueries,
    Concurrency,
):
    """The whole conformance suite: subclass it as ``Test<Name>`` next to a ``db`` fixture (module docstring)."""
