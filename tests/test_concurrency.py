"""Concurrency: 8 processes updating one session record and one parent record at once lose nothing (issue 10).

Every test runs on every backend of the matrix.  The workers are separate
processes (a ``forkserver`` context, see :func:`ptutils.testing.processes.process_context`)
that open the database by URL and start together at a barrier, so their
updates really interleave.  What they do is what sessions do:

* link child sessions to one parent (``Session(..., parent=...)``: a ``$push``
  of the child's id into the parent's record, and ``$set`` of ``parent_id`` in
  the child's record);
* write status to one session record (``StatusWriter.write``: ``$set`` of
  progress fields with a ``$push`` onto its history) and ``$inc`` its counters;
* read-modify-write with ``expected_version``, retried on ConflictError.

Afterwards the records are counted exactly: every child id present once, every
history entry present once and in each writer's order, counters exact.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import torch

from ptutils import open_db
from ptutils.database import DBInterface
from ptutils.errors import ConflictError
from ptutils.model import Model
from ptutils.session import Session
from ptutils.status import SESSIONS, StatusWriter
from ptutils.testing.processes import process_context, run_processes

WORKERS = 8


def tiny_model() -> Model:
    """A model for sessions that are created, never run: without an optimizer, whose first
    construction in a fresh process imports torch._dynamo (seconds, times 8 processes)."""
    return Model(torch.nn.Linear(2, 1), torch.nn.MSELoss(), device="cpu")


# --------------------------------------------------------------------- workers (run in child processes)
def link_children_worker(url: str, parent_id: str, worker: int, children: int, barrier: Any) -> None:
    """Attach to the parent's record and create ``children`` sessions under it, as a process pool would."""
    with open_db(url) as db:
        parent = Session(tiny_model(), db=db, session_id=parent_id)  # an existing record: attaches, writes nothing
        barrier.wait(timeout=120)
        for k in range(children):
            Session(tiny_model(), db=db, session_id=f"{parent_id}-w{worker}-c{k}", parent=parent)


def status_worker(url: str, session_id: str, worker: int, rounds: int, barrier: Any) -> None:
    """Write status, events and counters to one shared session record."""
    with open_db(url) as db:
        status = StatusWriter(db, session_id, interval=0.0)
        sessions = db.collection(SESSIONS)
        barrier.wait(timeout=120)
        for k in range(rounds):
            status.event("metric", worker=worker, k=k)
            status.write({f"writers.w{worker}": k}, push={"history": {"worker": worker, "k": k}})
            sessions.update(session_id, {"$inc": {"step": 1, "metrics.samples": 16}})


def optimistic_worker(url: str, collection: str, doc_id: str, worker: int, times: int, barrier: Any, results: Any) -> None:
    """Read, compute the next count in Python, write it back only if nobody else wrote in between."""
    conflicts = 0
    with open_db(url, collection=collection) as db:
        barrier.wait(timeout=120)
        for _ in range(times):
            while True:
                doc = db.load_from_id(doc_id)
                try:
                    db.update(doc_id, {"$set": {"count": doc["count"] + 1}, "$push": {"by": worker}},
                              expected_version=doc["_version"])
                    break
                except ConflictError:
                    conflicts += 1
    results.put((worker, conflicts))


# --------------------------------------------------------------------- tests
def test_children_created_at_once_by_8_processes_are_all_linked_once(db: DBInterface, faults) -> None:
    children = 3
    parent = Session(tiny_model(), db=db, session_id=f"parent-{uuid.uuid4().hex[:10]}")
    sessions = db.collection(SESSIONS)
    version = sessions.load_from_id(parent.id)["_version"]
    ctx = process_context()
    barrier = ctx.Barrier(WORKERS)
    run_processes(ctx, link_children_worker, [(db.url, parent.id, w, children, barrier) for w in range(WORKERS)])

    expected = {f"{parent.id}-w{w}-c{k}" for w in range(WORKERS) for k in range(children)}
    record = sessions.load_from_id(parent.id)
    linked = Counter(record["children"])
    missing = expected - set(linked)
    assert not missing, f"lost links: {sorted(missing)}"
    assert set(linked) == expected and set(linked.values()) == {1}, linked
    assert record["_version"] == version + len(expected)  # one atomic $push per child, none lost or doubled
    child_records = sessions.load({"parent_id": parent.id})
    assert sorted(r["_id"] for r in child_records) == sorted(expected)
    assert all(r["state"] == "pending" and r["parent_id"] == parent.id for r in child_records)
    parent.close()
    faults.record("concurrency: children linked to one parent", injected=len(expected),
                  survived=sum(1 for c in expected if linked[c] == 1), lost=len(missing))


def test_status_writes_from_8_processes_to_one_session_record_lose_nothing(db: DBInterface, faults) -> None:
    rounds = 6
    owner = Session(tiny_model(), db=db, session_id=f"shared-{uuid.uuid4().hex[:10]}")
    sessions = db.collection(SESSIONS)
    version = sessions.load_from_id(owner.id)["_version"]
    ctx = process_context()
    barrier = ctx.Barrier(WORKERS)
    run_processes(ctx, status_worker, [(db.url, owner.id, w, rounds, barrier) for w in range(WORKERS)])

    record = sessions.load_from_id(owner.id)
    history = [(h["worker"], h["k"]) for h in record["history"]]
    expected = {(w, k) for w in range(WORKERS) for k in range(rounds)}
    missing = expected - set(history)
    assert not missing, f"lost status writes: {sorted(missing)}"
    assert len(history) == len(expected)  # and none twice
    for w in range(WORKERS):  # each process's own writes stay in its order
        assert [k for hw, k in history if hw == w] == list(range(rounds))
        assert record["writers"][f"w{w}"] == rounds - 1
    total = WORKERS * rounds
    assert record["step"] == total and record["metrics"]["samples"] == 16 * total
    assert record["_version"] == version + 2 * total
    events = StatusWriter(db, owner.id).load_events("metric")
    assert sorted((e["worker"], e["k"]) for e in events) == sorted(expected)
    owner.close()
    operations = 3 * total  # a status write, an increment and an event per round
    lost = len(missing) + (total - len(events))
    faults.record("concurrency: status writes to one session", injected=operations,
                  survived=operations - lost, lost=lost)


def test_optimistic_updates_from_8_processes_retry_conflicts_and_count_exactly(db: DBInterface, faults) -> None:
    times = 6
    doc_id = db.save({"count": 0, "by": []})
    ctx = process_context()
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    run_processes(
        ctx, optimistic_worker, [(db.url, db.collection_name, doc_id, w, times, barrier, results) for w in range(WORKERS)]
    )
    conflicts = dict(results.get(timeout=10) for _ in range(WORKERS))

    final = db.load_from_id(doc_id)
    total = WORKERS * times
    assert final["count"] == total, f"lost updates: {total - final['count']}"
    assert Counter(final["by"]) == {w: times for w in range(WORKERS)}
    assert final["_version"] == 1 + total
    faults.record("concurrency: optimistic updates", injected=total, survived=final["count"],
                  lost=total - final["count"], detail=f"{sum(conflicts.values())} conflicts retried")
