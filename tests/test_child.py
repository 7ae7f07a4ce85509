"""One round of a tuning child: claimed by one process at a time, refused to a stale parent, logged."""

from __future__ import annotations

import os
import subprocess
import sys

from ptutils import open_db
from ptutils.child import ChildTask, claim, claim_refused, release, run_child
from ptutils.status import SESSIONS

from .support.tuningkit import tuning


def _made(url: str):
    """A tuning whose children exist (records pending) and whose run token is set, without running it."""
    t = tuning(url)
    t._take_over_children()
    t._make_children()
    return t


def test_a_round_runs_the_child_to_the_step_and_leaves_it_unclaimed(tmp_path):
    url = (tmp_path / "db").as_uri()
    with _made(url) as t:
        child = t.children[0]
        out = run_child(ChildTask(url, child, t.id, t._state["token"], until=5))
        assert out == {"child": child, "outcome": "ran", "state": "paused", "step": 5}
        record = open_db(url).collection(SESSIONS).load_from_id(child)
        assert record["owner"] is None and [c["event"] for c in record["claims"]] == ["claim", "release"]
        assert run_child(ChildTask(url, child, t.id, t._state["token"], until=5))["step"] == 5  # already there


def test_a_task_from_before_the_parent_restarted_does_nothing(tmp_path):
    url = (tmp_path / "db").as_uri()
    with _made(url) as t:
        child = t.children[0]
        out = run_child(ChildTask(url, child, t.id, "an-old-token", until=5))
        assert out["outcome"] == "stale"
        record = open_db(url).collection(SESSIONS).load_from_id(child)
        assert (record["state"], record.get("claims")) == ("pending", None)


def test_a_child_another_live_process_holds_is_not_claimed_until_it_lets_go(tmp_path):
    url = (tmp_path / "db").as_uri()
    with _made(url) as t:
        child = t.children[0]
        sessions = open_db(url).collection(SESSIONS)
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            sessions.update(child, {"$set": {"owner": {"token": "x", "pid": holder.pid, "host": os.uname().nodename,
                                                       "claimed": 0.0}}})
            assert claim_refused(sessions.load_from_id(child)) == f"claimed by process {holder.pid}"
            out = run_child(ChildTask(url, child, t.id, t._state["token"], until=5))
            assert out["outcome"] == "busy" and "claimed by process" in out["reason"]
        finally:
            holder.kill()
            holder.wait()
        assert claim_refused(sessions.load_from_id(child)) is None  # its process is gone: the claim is dead
        assert run_child(ChildTask(url, child, t.id, t._state["token"], until=5))["outcome"] == "ran"


def test_two_claims_of_one_record_at_once_give_it_to_one(tmp_path):
    url = (tmp_path / "db").as_uri()
    with _made(url) as t:
        child = t.children[0]
        sessions = open_db(url).collection(SESSIONS)
        stale_view = sessions.load_from_id(child)
        first = claim(sessions, child, "a")
        assert isinstance(first, dict) and first["owner"]["token"] == "a"
        assert claim(sessions, child, "b") == f"claimed by process {os.getpid()}"
        racing = _AsReadBefore(sessions, stale_view)  # read before "a" claimed it, written after
        assert claim(racing, child, "b") == "claimed by another process at the same time"
        release(sessions, child, "b")  # not its claim: nothing happens
        assert sessions.load_from_id(child)["owner"]["token"] == "a"
        release(sessions, child, "a")
        assert sessions.load_from_id(child)["owner"] is None


class _AsReadBefore:
    """A sessions collection whose reads return an earlier view of the record (a claimer that lost the race)."""

    def __init__(self, sessions, view):
        self.sessions, self.view = sessions, view

    def load_from_id(self, doc_id):
        return self.view

    def update(self, *args, **kwargs):
        return self.sessions.update(*args, **kwargs)
