"""MongoInterface on a real MongoDB-wire server (secantus by default, PTUTILS_MONGO_URL otherwise).

Includes the design notes' MongoInterface example as written there (with its
placeholders filled in), filter semantics that differ from MongoDB's own, GridFS
blob storage, indexes and behaviour when the server goes away and comes back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import gridfs
import numpy as np
import pymongo
import pytest
import torch

from ptutils import open_db
from ptutils.backends.mongo import MongoInterface, render_filter
from ptutils.errors import (
    BackendUnavailableError,
    CodecError,
    InvalidIdError,
    QueryError,
    StorageError,
)
from ptutils.query import parse_query
from ptutils.testing.assertions import assert_identical, stored_body

from .conftest import selected_backends
from .support import services
from .support.query_cases import check_translation

pytestmark = pytest.mark.backend


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mongo_backend" in metafunc.fixturenames:
        chosen = [b for b in selected_backends(metafunc.config) if b == "mongo"]
        metafunc.parametrize("mongo_backend", chosen, scope="module")


@pytest.fixture(scope="module")
def mongo_url(mongo_backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mongodb://host:port/<fresh database>``."""
    with services.provision(mongo_backend, tmp_path_factory) as url:
        yield url


@pytest.fixture
def mdb(mongo_url: str) -> Iterator[MongoInterface]:
    db = open_db(mongo_url, collection=f"t_{uuid.uuid4().hex[:12]}")
    assert isinstance(db, MongoInterface)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
def raw(mdb: MongoInterface) -> pymongo.collection.Collection:
    """The same collection through plain pymongo."""
    return mdb.client[mdb.db_name][mdb.collection_name]


def test_the_design_notes_example_runs_as_written(mongo_url: str) -> None:
    parts = urlsplit(mongo_url)
    hostname, port, db_name = parts.hostname, str(parts.port), parts.path.strip("/")
    model_config = {"arch": "alexnet", "num_classes": 1000}
    data_config = {"source": "imagenet.h5", "batch_size": 256}
    # ---- from ptutils-design-notes.md, "class MongoInterface(DBInterface)" ----
    import numpy as np
    import torch

    from ptutils.database import MongoInterface

    db = MongoInterface(db_name=db_name, collection_name="collection_name", hostname=hostname, port=port)

    # Nested dictionary containing numpy arrays and torch tensors:
    doc = {
        "name": "PyTorch experiment",
        "config": {"model": model_config, "data": data_config},
        "results": [np.random.random((100, 100)), torch.randn((100, 100))],
    }

    # Save to database
    doc_id = db.save(doc)

    # Load from ID
    doc_from_id = db.load_from_id(doc_id)

    # Or load using a MongoDb query
    doc_from_query = db.load({"name": "PyTorch experiment"})

    # Finally, delete from database
    db.delete(doc_id)
    # ---- end of the example ----
    assert isinstance(db, MongoInterface) and db.db_name == db_name
    assert_identical(doc, stored_body(doc_from_id))
    assert [d["_id"] for d in doc_from_query] == [doc_id]
    assert_identical(doc, stored_body(doc_from_query[0]))
    assert db.load({"name": "PyTorch experiment"}) == []
    # the results arrays (80 kB each) went to GridFS and were deleted with the document
    files = db.client[db_name]["collection_name.blobs.files"]
    assert files.count_documents({}) == 0
    db.close()


def test_url_names_database_and_collection(mongo_url: str) -> None:
    db = open_db(f"{mongo_url}/runs")
    assert db.collection_name == "runs" and db.url == f"{mongo_url}/runs"
    db.save({"_id": "x"})
    again = open_db(db.url)
    assert again.load_from_id("x")["_id"] == "x"
    other = open_db(db.url, collection="other")
    assert other.collection_name == "other" and other.count() == 0
    with pytest.raises(InvalidIdError):
        open_db("mongodb://127.0.0.1:1/bad.name/c")
    with pytest.raises(StorageError, match="expected mongodb://host:port/db/collection"):
        open_db("mongodb://127.0.0.1:1/db/c/extra")
    db.delete({})
    for d in (db, again, other):
        d.close()


def test_query_subset_only_where_function_expr_are_rejected(mdb: MongoInterface, raw) -> None:
    mdb.save({"_id": "a", "n": 1})
    for query in (
        {"$where": "sleep(1000) || true"},
        {"$function": {"body": "function() { return true }", "args": [], "lang": "js"}},
        {"$expr": {"$gt": ["$n", 0]}},
        {"n": {"$where": "true"}},
        {"n": {"$regex": "."}},
        {"$nor": [{"n": 2}]},
    ):
        with pytest.raises(QueryError):
            mdb.load(query)
        with pytest.raises(QueryError):
            mdb.delete(query)
    assert raw.count_documents({}) == 1


def test_array_semantics_differ_from_mongodb_and_are_closed(mdb: MongoInterface, raw) -> None:
    """Plain MongoDB matches array elements and walks arrays; the rendered filters do not."""
    mdb.save({"_id": "list", "l": [1, 2], "a": [{"b": 1}], "c": [5]})
    mdb.save({"_id": "flat", "l": 1, "a": {"b": 1}, "c": {"0": 5}})
    for query in ({"l": 1}, {"a.b": 1}, {"c.0": 5}):
        assert sorted(d["_id"] for d in raw.find(query)) == ["flat", "list"]  # MongoDB's own semantics
        assert [d["_id"] for d in mdb.load(query)] == ["flat"]
    assert [d["_id"] for d in mdb.load({"a.b": None})] == ["list"]  # a path through a list is missing
    assert sorted(d["_id"] for d in raw.find({"a.b": None})) == []
    assert [d["_id"] for d in mdb.load({"l": {"$in": [1, 2]}})] == ["flat"]
    assert [d["_id"] for d in mdb.load({"l": {"$ne": 1}})] == ["list"]
    flt = render_filter(parse_query({"a.b": 1}))
    assert {"a": {"$not": {"$type": "array"}}} in flt["$and"]


def test_status_queries_on_indexed_fields_keep_exact_semantics_and_id_order(mdb: MongoInterface, raw) -> None:
    """The lone indexed equality is answered from the index's plain filter; arrays holding the value stay out."""
    for doc_id, value in (("z", "s1"), ("arr", ["s1", "s2"]), ("a", "s1"), ("nested", [["s1"]]), ("m", "s2")):
        mdb.save({"_id": doc_id, "session_id": value, "big": 2**40})
    assert sorted(d["_id"] for d in raw.find({"session_id": "s1"})) == ["a", "arr", "z"]  # MongoDB's own semantics
    found = mdb.load({"session_id": "s1"})
    assert [d["_id"] for d in found] == ["a", "z"]
    assert all(type(d["big"]) is int for d in found)  # not bson's Int64
    assert [d["_id"] for d in mdb.load({"session_id": {"$in": ["s1", "s2"]}})] == ["a", "m", "z"]
    assert [d["_id"] for d in mdb.load({"session_id": "s1"}, limit=1)] == ["a"]
    assert [d["_id"] for d in mdb.load({"session_id": "s1", "big": {"$gt": 0}})] == ["a", "z"]
    assert mdb.count({"session_id": "s1"}) == 2
    assert [d["_id"] for d in mdb.load({"session_id": "s1"}, projection=["big"])] == ["a", "z"]


def test_translated_filters_agree_with_the_reference_on_hard_values(mdb: MongoInterface) -> None:
    check_translation(mdb)


def test_sorted_loads_follow_the_ptutils_kind_order(mdb: MongoInterface, raw) -> None:
    for doc_id, value in (("m", "missing"), ("n", None), ("b", True), ("o", {"x": 1}), ("i", 3), ("s", "a")):
        mdb.save({"_id": doc_id} if value == "missing" else {"_id": doc_id, "k": value})
    assert [d["_id"] for d in mdb.load(sort="k")] == ["m", "n", "i", "s", "b", "o"]
    assert [d["_id"] for d in raw.find().sort([("k", 1), ("_id", 1)])] == ["m", "n", "i", "s", "o", "b"]


def test_blobs_live_in_gridfs_and_replacing_keeps_one_revision(mdb: MongoInterface) -> None:
    database = mdb.client[mdb.db_name]
    files = database[f"{mdb.collection_name}.blobs.files"]
    doc_id = mdb.save({"w": np.arange(50_000, dtype=np.float64)})
    ref = mdb.load({"_id": doc_id}, projection=["w.blob"])[0]["w"]["blob"]
    stored = files.find_one({"filename": ref})
    assert stored is not None and stored["length"] == 400_000
    for k in range(3):
        mdb.put_blob(bytes([k]) * 5_000_000, "ckpt")
    assert files.count_documents({"filename": "ckpt"}) == 1
    assert mdb.get_blob("ckpt") == bytes([2]) * 5_000_000
    bucket = gridfs.GridFSBucket(database, bucket_name=f"{mdb.collection_name}.blobs")
    assert bucket.open_download_stream_by_name("ckpt").read() == bytes([2]) * 5_000_000
    mdb.delete(doc_id)
    assert files.count_documents({"filename": ref}) == 0
    assert database[f"{mdb.collection_name}.blobs.chunks"].count_documents({"files_id": stored["_id"]}) == 0


def test_indexes_on_session_fields_and_retryable_writes(mdb: MongoInterface, raw) -> None:
    mdb.save({"session_id": "s1", "state": "running", "parent_id": None})
    names = set(raw.index_information())
    assert {"session_id", "state", "parent_id"} <= names
    assert mdb.client.options.retry_writes and mdb.client.options.retry_reads


def test_injection_looking_values_and_keys_stay_data(mdb: MongoInterface, raw) -> None:
    mdb.save({"_id": "t", "k": '{"$gt": ""}', "j": "this.k == 1", "where": "$where"})
    assert [d["_id"] for d in mdb.load({"k": '{"$gt": ""}'})] == ["t"]
    assert mdb.load({"k": {"$gt": "{"}})[0]["_id"] == "t"
    assert mdb.load({"where": "$where", "j": {"$ne": "x"}})[0]["_id"] == "t"
    with pytest.raises(QueryError):
        mdb.load({"k": {"$in": [{"$gt": ""}]}})
    assert raw.count_documents({}) == 1


def test_server_going_away_is_reported_and_recovered(tmp_path) -> None:
    if not services.SecantusServer.installed():
        services.unavailable("mongo", "the secantusdb package is not installed")
    server = services.SecantusServer(tmp_path / "data")
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        services.unavailable("mongo", f"cannot start a secantus server: {exc}")
    url = f"{server.url}/ptutils?serverSelectionTimeoutMS=1500&connectTimeoutMS=1500"
    db = open_db(url, collection="c")
    try:
        db.save({"_id": "a", "w": torch.ones(20_000)})
        server.stop()
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            db.save({"_id": "b"})
        with pytest.raises(BackendUnavailableError):
            db.load_from_id("a")
        with pytest.raises(BackendUnavailableError):
            db.ping()
        assert time.monotonic() - started < 30
        server.start()
        db.ping()
        assert_identical(torch.ones(20_000), db.load_from_id("a")["w"])
        db.save({"_id": "b"})
        assert db.count() == 2
    finally:
        db.close()
        server.stop()


def test_lone_surrogates_are_refused_as_codec_errors(mdb: MongoInterface, raw) -> None:
    with pytest.raises(CodecError, match="lone surrogate"):
        mdb.save({"_id": "s", "text": "a\ud800b", "w": np.zeros(20_000)})
    with pytest.raises(CodecError, match="lone surrogate"):
        mdb.load({"text": "a\ud800b"})
    assert raw.count_documents({}) == 0
    assert mdb.client[mdb.db_name][f"{mdb.collection_name}.blobs.files"].count_documents({}) == 0


def test_an_unreachable_server_is_one_line_naming_host_port_and_the_wait() -> None:
    port = services.free_port()  # nothing listens there
    db = open_db(f"mongodb://127.0.0.1:{port}/ptutils/c?serverSelectionTimeoutMS=200")
    try:
        with pytest.raises(BackendUnavailableError) as caught:
            db.save({"_id": "a"})
    finally:
        db.close()
    message = str(caught.value)
    assert "\n" not in message and "Topology" not in message and len(message) < 300
    assert f"127.0.0.1:{port}" in message and "within 0.2s" in message and "serverSelectionTimeoutMS" in message
