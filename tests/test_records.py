"""Finding sessions from Python and getting their weights back: ptutils.sessions, session_record, load_weights."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import ptutils
from ptutils import Config, Session, load_weights, session_record, sessions
from ptutils.errors import CheckpointError, SessionError, SessionNotFound
from ptutils.status import SESSIONS
from ptutils.update import Evaluate

from .support.sessionkit import model, same_weights, session, weights

ROOT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The id of a process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def made(db, name: str, **fields) -> str:
    """A new session's record in ``db``, with ``fields`` written over it as its process would have."""
    s = session(db, name=name)
    s.close()
    if fields:
        db.collection(SESSIONS).update(s.id, {"$set": fields})
    return s.id


def test_sessions_filters_by_state_as_shown_name_and_parent_in_the_database(db):
    tag = uuid.uuid4().hex[:8]
    now = time.time()
    live = made(db, f"{tag}-live", state="running", heartbeat=now)
    slow = made(db, f"{tag}-slow", state="running", heartbeat=now - 60, status_interval=30.0)  # not yet stale
    gone = made(db, f"{tag}-gone", state="running", heartbeat=now - 3600)
    killed = made(db, f"{tag}-killed", state="running", heartbeat=now, pid=dead_pid())
    paused = made(db, f"{tag}-paused", state="paused")
    parent = session(db, name=f"{tag}-parent")
    child = session(db, name=f"{tag}-child", parent=parent)
    parent.close()
    child.close()

    def ids(**filters) -> set[str]:
        return {view.id for view in sessions(db, name=f"{tag}-*", **filters)}

    assert ids(state="running") == {live, slow}
    assert ids(state="interrupted") == {gone, killed}
    assert ids(state="paused") == {paused}
    assert ids(state="pending") == {parent.id, child.id}
    assert ids(parent=parent.id) == {child.id}
    assert [v.id for v in sessions(db, name=f"{tag}-gone")] == [gone]
    by_id = {v.id: v for v in sessions(db, name=f"{tag}-*")}
    assert by_id[gone].state == "interrupted" and by_id[gone].stored_state == "running"
    assert by_id[gone].heartbeat_age >= 3600
    assert by_id[child.id].parent_id == parent.id and by_id[child.id].record["name"] == f"{tag}-child"


def test_sessions_are_newest_first_and_limit_counts_what_the_filters_keep(db):
    tag = uuid.uuid4().hex[:8]
    made_ids = []
    for i in range(4):
        made_ids.append(made(db, f"{tag}-{i}", state="running", heartbeat=time.time() - (3600 if i % 2 else 0)))
        time.sleep(0.01)  # distinct creation times
    assert [v.id for v in sessions(db, name=f"{tag}-*")] == made_ids[::-1]
    assert [v.id for v in sessions(db, name=f"{tag}-*", limit=2)] == made_ids[:1:-1]
    assert [v.id for v in sessions(db, name=f"{tag}-*", state="running", limit=1)] == [made_ids[2]]
    assert [v.id for v in sessions(db, name=f"{tag}-*", state="interrupted", limit=5)] == [made_ids[3], made_ids[1]]


def test_a_killed_run_is_listed_interrupted_and_not_running(url):
    # SIGKILL at step 10: past its checkpoint at step 3, which waits for the record saying running.
    subprocess.run([sys.executable, "-m", "tests.support.crashkit", url, "killed", "--kill-at-step", "10"],
                   cwd=ROOT, capture_output=True, timeout=300, check=False)
    [view] = sessions(url)
    assert (view.id, view.stored_state, view.state) == ("killed", "running", "interrupted")
    assert sessions(url, state="running") == []
    assert [v.id for v in sessions(url, state="interrupted")] == ["killed"]


def test_archived_attempts_are_not_listed(url):
    s = session(url, stages=[{"name": "train", "data": "train", "max_steps": 2}]).run()
    s.restart()
    s.close()
    assert [v.id for v in sessions(url)] == [s.id]
    assert sessions(url)[0].attempt == 2


def test_session_record_shows_one_session_and_names_a_missing_one_with_the_database(url):
    s = session(url).run()
    s.close()
    view = session_record(url, s.id)
    assert (view.state, view.step, view.progress, view.name) == ("complete", 15, 1.0, "tiny")
    assert view.last_checkpoint["step"] == 15 and view.record["outcome"] == "success" and view.error is None
    with pytest.raises(SessionNotFound, match=rf"no session with id 'typo' in {url}"):
        session_record(url, "typo")


def test_an_unknown_state_or_a_bad_limit_is_refused_naming_what_is_allowed():
    with pytest.raises(ValueError, match="unknown session state 'done'; choose from pending, running"):
        sessions("file:///nonexistent", state="done")
    with pytest.raises(ValueError, match="limit must be a non-negative int or None, got -1"):
        sessions("file:///nonexistent", state="running", limit=-1)


def trained_with_snapshots(url: str, **kwargs) -> tuple[Session, dict[int, dict[str, torch.Tensor]]]:
    """A finished session that kept the best checkpoint by val_loss, and its weights at every epoch's end."""
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(s: Session) -> Session:
        if s.event == "epoch":
            snapshots[s.step] = weights(s)
        return s

    s = session(url, stages=[{"name": "train", "data": "train", "max_epochs": 6}], updates=[Evaluate("val"), snapshot],
                keep_checkpoints=1, model=model(lr=2.0), **kwargs).run()
    s.close()
    return s, snapshots


def test_load_weights_gives_the_last_best_or_a_steps_weights_bitwise(url):
    s, snapshots = trained_with_snapshots(url, keep_best="val_loss")
    kept = s.checkpoints.records()
    best = min((r for r in kept if "best_by" in r), key=lambda r: r["best_by"]["value"])
    assert best["step"] < s.step, "the run must have got worse after its best epoch for this test to mean something"
    assert same_weights(load_weights(url, s.id), weights(s))
    assert same_weights(load_weights(url, s.id, "best"), snapshots[best["step"]])
    assert same_weights(load_weights(url, s.id, best["step"]), snapshots[best["step"]])
    assert all(t.device.type == "cpu" for t in load_weights(url, s.id, "best").values())


def test_load_weights_names_what_is_missing(url):
    s, _ = trained_with_snapshots(url)
    with pytest.raises(CheckpointError, match="ranked no checkpoint: run it with keep_best=METRIC"):
        load_weights(url, s.id, "best")
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 7; it has checkpoints at steps 0, 30"):
        load_weights(url, s.id, 7)
    with pytest.raises(SessionNotFound, match="'nope'"):
        load_weights(url, "nope")


CONFIG = {
    "name": "from-config",
    "model": {
        "module": {"cls": "torch.nn.Linear", "in_features": 8, "out_features": 2},
        "optimizer": {"cls": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
        "device": "cpu",
    },
    "data": {"cls": "tests.support.sessionkit.provider"},
    "stages": [{"name": "train", "data": "train", "max_epochs": 2}],
}


def test_session_load_rebuilds_a_configured_model_with_its_final_weights_and_leaves_the_rng_alone(url):
    s = Session.from_config(Config.from_dict(CONFIG), db=url).run()
    s.close()
    rng = torch.get_rng_state()
    loaded = Session.load(url, s.id)
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(loaded, ptutils.Model) and same_weights(weights(s), loaded.module.state_dict())
    momentum = [state["momentum_buffer"] for state in loaded.optimizer.state_dict()["state"].values()]
    trained = [state["momentum_buffer"] for state in s.model.optimizer.state_dict()["state"].values()]
    assert len(momentum) == 2 and all(torch.equal(a, b) for a, b in zip(momentum, trained))
    initial = Session.load(url, s.id, checkpoint=0)
    assert not same_weights(weights(s), initial.module.state_dict())


def test_session_load_without_a_config_takes_the_model_and_says_so_when_none_is_given(url):
    s = session(url).run()
    s.close()
    with pytest.raises(SessionError, match="was not built from a Config.*pass model="):
        Session.load(url, s.id)
    module = model(seed=9).module
    assert Session.load(url, s.id, model=module) is module and same_weights(module.state_dict(), weights(s))
    with pytest.raises(SessionError, match="does not fit the model"):
        Session.load(url, s.id, model=torch.nn.Linear(8, 2))


def test_weights_are_found_where_the_config_kept_the_checkpoints_or_where_told(url, tmp_path):
    apart = (tmp_path / "checkpoints").as_uri()
    s = Session.from_config(Config.from_dict({**CONFIG, "checkpoint": {"db": apart}}), db=url).run()
    s.close()
    assert same_weights(load_weights(url, s.id), weights(s))
    other = session(url, checkpoint_db=(tmp_path / "elsewhere").as_uri()).run()
    other.close()
    with pytest.raises(CheckpointError, match=rf"no readable checkpoint in {url}"):
        load_weights(url, other.id)
    assert same_weights(load_weights(url, other.id, checkpoint_db=(tmp_path / "elsewhere").as_uri()), weights(other))


def test_a_session_that_trained_nothing_has_no_weights_to_load(url):
    parent = Session(None, db=url, name="tuner")
    assert parent.start() and parent.complete()
    parent.close()
    with pytest.raises(CheckpointError, match=rf"session '{parent.id}' has no readable checkpoint in {url}"):
        Session.load(url, parent.id)
