"""Status tracking as the notes list it: pending (blocking error, queue), running, complete, attempts."""

from __future__ import annotations

import threading
import time

import pytest

from ptutils import open_db
from ptutils.errors import SessionNotFound
from ptutils.status import (
    EVENTS,
    StatusWriter,
    describe,
    is_stale,
    request_pause,
)

from .support.sessionkit import session


def test_running_record_shows_stage_progress_and_eta(url):
    seen = []

    def peek(s):
        if s.step in (4, 10):
            s.drain()
            seen.append(dict(s.record))
        return s

    s = session(url, status_interval=0.0, updates=[peek], stages=[{"name": "train", "data": "train", "max_epochs": 3}])
    s.run()
    assert seen and all(r["state"] == "running" and r["stage"] == "train" for r in seen)
    last = seen[-1]
    assert 0.0 < last["progress"] < 1.0 and last["step"] >= 4
    assert last["eta_seconds"] is not None and last["eta_seconds"] >= 0
    assert s.record["progress"] == 1.0 and s.record["outcome"] == "success"


def test_stale_heartbeat_is_shown_as_interrupted(url):
    s = session(url)
    s.start()
    record = s.record
    assert describe(record) == "running" and not is_stale(record)
    later = record["heartbeat"] + 3600
    assert is_stale(record, now=later) and describe(record, now=later) == "interrupted"


def test_request_pause_on_a_record_sets_the_control_flag(url):
    s = session(url)
    s.start()
    record = request_pause(open_db(url), s.id, reason="maintenance")
    assert record["control"]["pause"] is True and record["control"]["reason"] == "maintenance"


def test_request_pause_takes_a_url_as_a_session_does_and_names_a_missing_session(url):
    s = session(url)
    s.start()
    assert request_pause(url, s.id, reason="from a script")["control"]["reason"] == "from a script"
    assert s.record["control"]["pause"] is True
    with pytest.raises(SessionNotFound, match=rf"no session with id 'typo' in {url}"):
        request_pause(url, "typo")


def test_new_session_and_restart_are_told_apart(url):
    s = session(url)
    assert s.record["attempt"] == 1 and s.record["previous_attempt"] is None
    s.run()
    s.restart()
    assert s.record["attempt"] == 2 and s.record["previous_attempt"].endswith(".attempt1")


def test_events_are_written_one_document_per_kind_and_read_back_in_order(url):
    db = open_db(url)
    status = StatusWriter(db, "s")
    db.collection(EVENTS).save({"_id": "s.older.00000001", "session_id": "s", "kind": "epoch", "time": 0.0, "seq": 1,
                                "stage_epoch": 0})  # an event stored on its own, as earlier versions did
    for epoch in range(1, 4):
        status.event("epoch", stage_epoch=epoch, metrics={"loss": 1.0 / epoch})
        status.event("checkpoint", checkpoint=f"c{epoch}")
    status.flush()
    status.event("epoch", stage_epoch=4, metrics={})
    status.flush()
    assert sorted(d["kind"] for d in db.collection(EVENTS).load({"session_id": "s"})) == [
        "checkpoint", "epoch", "epoch", "epoch"]
    epochs = status.load_events("epoch")
    assert [e["stage_epoch"] for e in epochs] == [0, 1, 2, 3, 4]
    assert epochs[2]["metrics"] == {"loss": 0.5} and epochs[2]["session_id"] == "s"
    assert [e["checkpoint"] for e in status.load_events("checkpoint")] == ["c1", "c2", "c3"]
    assert len(status.load_events()) == 8


def test_a_resume_drops_the_stored_events_of_the_steps_it_runs_again(url):
    db = open_db(url)
    crashed = StatusWriter(db, "s")
    crashed.event("epoch", attempt=1, step=5, stage_epoch=1)
    crashed.event("monitor", attempt=1, step=8, monitor="loss")
    crashed.flush()
    crashed.event("epoch", attempt=1, step=10, stage_epoch=2)
    crashed.event("warning", attempt=1, step=10, message="slow disk")
    crashed.flush()
    db.collection(EVENTS).save({"_id": "s.older.00000009", "session_id": "s", "kind": "epoch", "time": time.time(),
                                "seq": 9, "attempt": 1, "step": 12, "stage_epoch": 3})  # stored on its own, as before
    resumed = StatusWriter(db, "s")  # the process that resumes from the checkpoint at step 6
    resumed.event("interrupted", attempt=1, step=12)
    resumed.flush()
    assert resumed.drop_stored_after(attempt=1, step=6) == 3
    assert [(e["kind"], e["step"]) for e in resumed.load_events()] == [("epoch", 5), ("warning", 10), ("interrupted", 12)]
    assert resumed.drop_stored_after(attempt=1, step=6) == 0


def test_events_flushed_from_two_threads_while_a_third_logs_are_stored_once_each(url):
    status = StatusWriter(open_db(url), "s")
    done = threading.Event()

    def flusher() -> None:
        while not done.is_set():
            status.flush()

    flushers = [threading.Thread(target=flusher) for _ in range(2)]
    for t in flushers:
        t.start()
    for i in range(300):
        status.event("epoch", stage_epoch=i)
        if i % 10 == 0:
            time.sleep(0.001)  # let the flushers interleave with the logging
    done.set()
    for t in flushers:
        t.join()
    status.flush()
    assert sorted(e["stage_epoch"] for e in status.load_events("epoch")) == list(range(300))


def test_a_zombie_process_is_not_alive():
    """A killed worker whose parent has not reaped it yet must not keep its claim or its running record."""
    import os
    import subprocess
    import sys
    import time

    from ptutils.status import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while pid_alive(child.pid) and time.monotonic() < deadline:  # exited, not waited for: a zombie
        time.sleep(0.05)
    assert not pid_alive(child.pid)
    assert open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    child.wait()
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())
