"""ReplicatedInterface over real backends: a filesystem copy, SQLite and a MongoDB-wire server that is killed.

The secantus server of these tests is started and stopped by the tests
themselves (same port and storage path across the restart), so an outage is a
real one: the client sees connection refusals, not a stand-in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from ptutils import open_db
from ptutils.database import DBInterface
from ptutils.errors import BackendUnavailableError, ConflictError, NotFoundError
from ptutils.replicated import ReplicatedInterface, open_replicated
from ptutils.testing.assertions import assert_identical

from .conftest import selected_backends
from .support import services

pytestmark = pytest.mark.backend


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mongo_backend" in metafunc.fixturenames:
        chosen = [b for b in selected_backends(metafunc.config) if b == "mongo"]
        metafunc.parametrize("mongo_backend", chosen)


@pytest.fixture
def server(mongo_backend: str, tmp_path) -> Iterator[services.SecantusServer]:
    """A secantus server of this test's own, to stop and restart."""
    if not services.SecantusServer.installed():
        services.unavailable("mongo", "the secantusdb package is not installed")
    srv = services.SecantusServer(tmp_path / "secantus")
    try:
        srv.start()
    except (RuntimeError, OSError) as exc:
        services.unavailable("mongo", f"cannot start a secantus server: {exc}")
    try:
        yield srv
    finally:
        srv.stop()


def mongo_url(server: services.SecantusServer) -> str:
    return f"{server.url}/ptutils?serverSelectionTimeoutMS=1000&connectTimeoutMS=1000"


def local_urls(tmp_path) -> list[str]:
    return [(tmp_path / "fs").as_uri(), f"sqlite:///{tmp_path / 'copy.db'}"]


def assert_members_identical(rep: ReplicatedInterface, blob_ids: list[str] = ()) -> None:
    members = rep.members
    reference = members[0].load(sort="_id")
    for member in members[1:]:
        assert_identical(reference, member.load(sort="_id"), f"{member!r}")
    for blob_id in blob_ids:
        data = members[0].get_blob(blob_id)
        for member in members[1:]:
            assert member.get_blob(blob_id) == data, (member, blob_id)


def workload(rep: DBInterface, tag: str) -> None:
    """Every kind of write a session makes: saves with blobs, updates, deletes, checkpoints."""
    rep.save({"_id": f"{tag}-status", "state": "running", "step": 0, "w": np.full(20_000, 1.5)})
    for step in range(1, 4):
        rep.update(f"{tag}-status", {"$set": {"step": step}, "$push": {"log": step}})
    rep.update(f"{tag}-status", {"$set": {"w": torch.arange(30_000)}})
    for i in range(5):
        rep.save({"_id": f"{tag}-metric-{i}", "loss": 1.0 / (i + 1), "kind": "metric"})
    rep.delete({"kind": "metric", "loss": {"$lt": 0.3}})
    rep.put_blob(b"first" * 100_000, f"{tag}-ckpt")
    rep.put_blob(b"second" * 100_000, f"{tag}-ckpt")
    rep.put_blob(b"temporary", f"{tag}-tmp")
    rep.delete_blob(f"{tag}-tmp")


def test_every_write_reaches_every_member_and_reads_come_from_the_primary(server, tmp_path) -> None:
    rep = open_replicated([*local_urls(tmp_path), mongo_url(server)], collection="runs")
    workload(rep, "a")
    assert rep.load_from_id("a-status")["step"] == 3 and rep.count({"kind": "metric"}) == 3
    assert_members_identical(rep, ["a-ckpt"])
    assert all(s["in_sync"] and s["pending"] == 0 for s in rep.status()) and rep.failures == []
    for member in rep.members:
        with pytest.raises(NotFoundError):
            member.get_blob("a-tmp")
    # reads come from the first member: a document only member 1 has is invisible
    rep.members[1].save({"_id": "only-in-copy"})
    assert not rep.exists("only-in-copy")
    rep.members[0].save({"_id": "only-in-primary"})
    assert rep.exists("only-in-primary")
    rep.close()


def test_a_failed_secondary_is_recorded_and_caught_up_when_it_returns(
    server, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    rep = ReplicatedInterface(
        [open_db(u, collection="runs") for u in [*local_urls(tmp_path), mongo_url(server)]], retry_interval=60
    )
    workload(rep, "before")
    server.stop()
    with caplog.at_level(logging.WARNING, logger="ptutils"):
        workload(rep, "during")  # the run goes on
        sibling = rep.collection("metrics")
        sibling.save({"_id": "m1", "v": 1})
    assert rep.load_from_id("during-status")["step"] == 3
    failures = rep.failures
    assert failures and {f.member for f in failures} == {2}
    assert "BackendUnavailableError" in failures[0].error and "ptutils" in failures[0].where
    state = rep.status()
    assert [s["in_sync"] for s in state] == [True, True, False] and state[2]["pending"] > 10
    assert any("replica 2" in r.getMessage() and "continuing without it" in r.getMessage() for r in caplog.records)
    assert not rep.resync()  # still down
    server.start()
    assert rep.resync()
    assert all(s["in_sync"] and s["pending"] == 0 for s in rep.status())
    assert_members_identical(rep, ["before-ckpt", "during-ckpt"])
    assert rep.members[2].load_from_id("during-status")["_version"] == rep.load_from_id("during-status")["_version"]
    assert rep.members[2].collection("metrics").load_from_id("m1")["v"] == 1
    rep.close()


def test_when_the_primary_fails_the_next_member_takes_over_and_the_primary_is_replayed(server, tmp_path) -> None:
    rep = ReplicatedInterface(
        [open_db(mongo_url(server), collection="runs"), open_db(local_urls(tmp_path)[1], collection="runs")],
        retry_interval=0.5,
    )
    rep.save({"_id": "s", "n": 0})
    server.stop()
    for _ in range(3):
        rep.update("s", {"$inc": {"n": 1}})
    assert rep.load_from_id("s")["n"] == 3  # served by the SQLite copy
    assert [s["in_sync"] for s in rep.status()] == [False, True]
    with pytest.raises(ConflictError):
        rep.update("s", {"$inc": {"n": 1}}, expected_version=1)
    server.start()
    time.sleep(0.6)
    assert rep.load_from_id("s")["n"] == 3  # this read replays the primary first, then reads from it
    assert [s["in_sync"] for s in rep.status()] == [True, True]
    assert rep.members[0].load_from_id("s") == rep.members[1].load_from_id("s") == {"_id": "s", "_version": 4, "n": 3}
    rep.members[1].save({"_id": "only-in-copy"})
    assert not rep.exists("only-in-copy")
    rep.close()


def test_no_member_available_raises_and_semantic_errors_are_not_replicated(server, tmp_path) -> None:
    rep = ReplicatedInterface([open_db(mongo_url(server), collection="c")], retry_interval=60)
    rep.save({"_id": "x", "n": 1})
    with pytest.raises(ConflictError):
        rep.update("x", {"$set": {"n": 2}}, expected_version=5)
    assert rep.load_from_id("x") == {"_id": "x", "_version": 1, "n": 1} and rep.failures == []
    server.stop()
    with pytest.raises(BackendUnavailableError, match="no member in sync"):
        rep.save({"_id": "y"})
    with pytest.raises(BackendUnavailableError):
        rep.load_from_id("x")
    rep.close()


def test_replicated_urls_round_trip(tmp_path) -> None:
    urls = local_urls(tmp_path)
    rep = open_replicated(urls, collection="c", retry_interval=2)
    rep.save({"_id": "x", "arr": np.arange(10)})
    again = open_db(rep.url, collection="c")
    assert isinstance(again, ReplicatedInterface) and [m.url for m in again.members] == [m.url for m in rep.members]
    assert_identical(np.arange(10), again.load_from_id("x")["arr"])
    assert [m.load_from_id("x")["_version"] for m in again.members] == [1, 1]
    rep.close()
    again.close()
