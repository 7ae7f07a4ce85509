"""The lifecycle: every trigger in every state, write-ahead, admission, taking over a record, restart."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ptutils import open_db
from ptutils.checkpoint import CheckpointStore
from ptutils.errors import (
    BackendUnavailableError,
    SessionError,
    SessionNotFound,
    StorageError,
    TransitionError,
)
from ptutils.session import Session
from ptutils.status import StatusWriter, request_pause
from ptutils.update import every_n_steps

from .support.sessionkit import same_weights, session, weights

LEGAL = {
    "pending": {"start": "running", "stop": "complete"},
    "running": {"pause": "paused", "complete": "complete", "stop": "complete"},
    "paused": {"resume": "running", "stop": "complete"},
    "complete": {"restart": "pending"},
    "failed": {"restart": "pending"},
}


TRIGGERS = ["start", "pause", "resume", "complete", "stop", "restart"]


def in_state(url: str, state: str) -> Session:
    s = session(url)
    if state == "pending":
        return s
    s.start()
    if state == "paused":
        s.pause()
    elif state == "complete":
        s.complete()
    elif state == "failed":
        s.fail(RuntimeError("boom"))
    assert s.state == state
    return s


@pytest.mark.parametrize("state", list(LEGAL))
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_every_lifecycle_trigger_in_every_state(url, state, trigger):
    s = in_state(url, state)
    expected = LEGAL[state].get(trigger)
    if expected is None:
        with pytest.raises(TransitionError) as err:
            s.trigger(trigger)
        assert err.value.state.split("/")[0] == state and err.value.trigger == trigger
        assert repr(trigger) in str(err.value) and state in str(err.value)
        assert s.state == state
    else:
        assert s.trigger(trigger) is True
        assert s.state == expected
        assert s.record["state"] == expected


@pytest.mark.parametrize("state", ["pending", "running", "paused"])
def test_fail_is_legal_from_every_active_state(url, state):
    s = in_state(url, state)
    s.fail(ValueError("bad"))
    assert s.state == "failed"
    assert s.record["error"]["type"] == "ValueError"


def test_start_enters_the_first_stage_and_records_it(url):
    s = session(url, stages=["warmup", {"name": "train", "data": "train"}])
    assert s.state == "pending" and s.record["state"] == "pending"
    s.start()
    assert s.state == "running" and s.stage == "warmup"
    assert s.record["stage"] == "warmup" and s.record["started"] is not None


def test_unknown_trigger_names_state_and_known_triggers(url):
    s = session(url)
    with pytest.raises(TransitionError, match="no such trigger"):
        s.trigger("launch")


def test_start_guard_keeps_session_pending_with_the_reason(url):
    def gpu_free(session):
        return False

    s = session(url, start_conditions=[gpu_free])
    assert s.start() is False
    assert s.state == "pending"
    assert "gpu_free" in s.record["blocked_by"]
    s.run()
    assert s.state == "pending"


def test_start_guard_that_raises_records_the_error(url):
    def db_reachable(session):
        raise ConnectionError("connection refused")

    s = session(url, start_conditions=[db_reachable])
    assert s.start() is False
    assert s.record["blocked_by"] == "ConnectionError: connection refused"


def test_stage_trigger_outside_running_is_refused(url):
    s = session(url, stages=["a", "b"], transitions=[{"trigger": "go", "source": "a", "dest": "b"}])
    with pytest.raises(TransitionError, match="'go'"):
        s.trigger("go")


def test_write_ahead_failure_cancels_the_transition(url, monkeypatch):
    s = session(url)
    s.start()

    def refuse(self, fields, push=None):
        raise StorageError("disk full")

    monkeypatch.setattr(StatusWriter, "write", refuse)
    with pytest.raises(StorageError):
        s.pause()
    monkeypatch.undo()
    assert s.state == "running" and s.record["state"] == "running"


@pytest.mark.parametrize("error", [StorageError("disk full"), BackendUnavailableError("database down")])
def test_a_start_run_cannot_record_is_undone_back_to_pending(url, monkeypatch, error):
    s = session(url, outage_wait=0.3)
    initial = weights(s)
    steps = []
    s.updates.append(lambda sess: steps.append(sess.step))
    write = CheckpointStore.write

    def refuse_initial(self, data, **info):
        if info["reason"] == "initial":
            raise error
        return write(self, data, **info)

    monkeypatch.setattr(CheckpointStore, "write", refuse_initial)
    with pytest.raises(type(error)):
        s.run()
    assert s.state == "pending" and s.record["state"] == "pending"
    assert s.step == 0 and same_weights(weights(s), initial)
    assert 1 <= max(steps) <= 5  # run() records its start while the first steps run, but not past the first epoch
    monkeypatch.undo()
    s.run()
    assert s.state == "complete" and same_weights(weights(s), weights(session(url).run()))
    assert [e["stage_epoch"] for e in s.events("epoch")] == [1, 2, 3]  # none from the undone steps


def test_restart_is_a_new_attempt_with_history_and_fresh_weights(url):
    s = session(url)
    initial = weights(s)
    s.run()
    trained = weights(s)
    assert not same_weights(initial, trained)
    s.restart()
    assert s.state == "pending" and s.attempt == 2
    assert same_weights(weights(s), initial)
    record = s.record
    assert record["attempt"] == 2 and record["previous_attempt"] == f"{s.id}.attempt1"
    assert record["history"][0]["outcome"] == "success" and record["history"][0]["attempt"] == 1
    assert s.db.collection("sessions").load_from_id(f"{s.id}.attempt1")["state"] == "complete"
    s.run()
    assert s.state == "complete" and same_weights(weights(s), trained)


def test_attach_to_existing_record_by_id(url):
    s = session(url, updates=[every_n_steps(4, "pause")])
    s.run()
    again = session(url, session_id=s.id)
    assert again.state == "paused" and again.step == 4 and again.stage == "train"


def test_must_exist_refuses_an_unknown_id_naming_it_and_the_database(url):
    s = session(url)
    typo = s.id[:-1] + ("x" if s.id[-1] != "x" else "y")
    with pytest.raises(SessionNotFound) as err:
        session(url, session_id=typo, must_exist=True)
    assert repr(typo) in str(err.value) and url in str(err.value) and f"did you mean {s.id!r}" in str(err.value)
    with pytest.raises(SessionNotFound, match="no session with id 'nothing-like-it'"):
        Session.resume(url, "nothing-like-it")
    assert not open_db(url).collection("sessions").exists(typo)


def test_resume_refuses_a_session_built_in_code_saying_how_to_resume_it(url):
    s = session(url, updates=[every_n_steps(4, "pause")]).run()
    with pytest.raises(SessionError, match=f"session_id={s.id!r}, must_exist=True"):
        Session.resume(url, s.id)


def test_attach_refuses_a_session_running_elsewhere(url):
    s = session(url)
    s.start()
    with pytest.raises(SessionError, match="is running in process"):
        session(url, session_id=s.id)


def test_complete_keeps_the_final_weights_in_a_checkpoint(url):
    s = session(url, checkpoint_every_epochs=None).run()
    final = [r for r in s.checkpoints.records() if r["reason"] == "final"]
    assert len(final) == 1 and final[0]["step"] == s.step and final[0]["pinned"]
    state = s.checkpoints.read(final[0])
    assert same_weights(state["model"]["module"], weights(s))


def test_no_duplicate_final_checkpoint_when_the_last_step_was_checkpointed(url):
    s = session(url).run()  # an epoch-end checkpoint falls on the last step
    assert [r["reason"] for r in s.checkpoints.records()].count("final") == 0
    assert s.checkpoints.records()[0]["step"] == s.step


def test_a_pause_request_to_a_pending_session_is_void_at_its_start(url):
    db = open_db(url)
    s = session(url)
    assert s.record["state"] == "pending"
    request_pause(db, s.id, reason="too early")
    s.run()
    assert s.state == "complete" and s.record["control"]["pause"] is False


def test_a_pause_request_to_a_paused_session_does_not_outlive_its_resume(url):
    db = open_db(url)
    s = session(url, updates=[every_n_steps(4, "pause")])
    s.updates[0].once = True
    s.run()
    request_pause(db, s.id, reason="late")  # arrives while it is already paused
    s.run()
    assert s.state == "complete" and s.record["control"]["pause"] is False


def test_completed_record_has_no_eta(url):
    s = session(url, status_interval=0.0).run()
    assert s.record["eta_seconds"] is None


def test_queue_positions_and_the_queue_advancing(url):
    sessions = [session(url, name=f"q{i}", queue="gpu0") for i in range(3)]
    other_queue = session(url, name="elsewhere", queue="gpu1")
    assert [s.queue_position() for s in sessions] == [1, 2, 3]
    assert other_queue.queue_position() == 1
    assert sessions[2].start() is False
    record = sessions[2].record
    assert record["queue_position"] == 3 and "behind 2 session(s)" in record["blocked_by"]
    assert sessions[0].start() is True
    assert sessions[0].record["queue_position"] is None and sessions[0].record["blocked_by"] is None
    assert [s.queue_position() for s in sessions[1:]] == [1, 2]
    assert sessions[1].start() is True and sessions[2].queue_position() == 1


def test_wait_to_start_gives_up_after_timeout(url):
    first = session(url, name="first", queue="q")
    second = session(url, name="second", queue="q")
    t0 = time.monotonic()
    assert second.wait_to_start(poll=0.05, timeout=0.3) is False
    assert time.monotonic() - t0 < 5
    first.start()
    assert second.wait_to_start(poll=0.05, timeout=5) is True and second.state == "running"


def test_a_refused_complete_leaves_the_outcome_as_the_record_has_it(url):
    s = session(url)
    s.start()
    s.pause()
    with pytest.raises(TransitionError, match="complete"):
        s.complete()  # a paused session cannot complete
    assert s.outcome is None and s.record["outcome"] is None


@pytest.mark.parametrize("end", ["stop", "fail"])
def test_a_refused_ending_keeps_the_outcome_and_error_of_the_completed_run(url, end):
    s = session(url, stages=[{"name": "train", "data": "train", "max_steps": 2}]).run()
    with pytest.raises(TransitionError, match=end):
        s.stop() if end == "stop" else s.fail(RuntimeError("too late"))
    assert (s.outcome, s.error) == ("success", None) == (s.record["outcome"], s.record["error"])


def test_a_session_without_a_model_has_the_lifecycle_and_record_of_any_other(url):
    parent = Session(None, db=url, name="tuner")
    child = session(url, parent=parent)
    assert parent.state == "pending" and parent.record["children"] == [child.id]
    assert parent.start() and parent.record["state"] == "running"
    assert parent.heartbeat()["state"] == "running"
    assert parent.pause() and parent.resume()
    assert parent.complete()
    record = parent.record
    assert (record["state"], record["outcome"]) == ("complete", "success")
    assert CheckpointStore(open_db(url), parent.id).records() == []  # nothing to checkpoint
    with pytest.raises(SessionError, match="has no model, so it has no loop to run"):
        Session(None, db=url).run()


def test_a_session_without_a_model_left_running_by_a_dead_process_resumes_and_completes(url):
    code = (
        "import os, sys\n"
        "from ptutils.session import Session\n"
        f"s = Session(None, db={url!r}, name='tuner', session_id='tuner-1', status_interval=0.05)\n"
        "s.start()\n"
        "os._exit(0)  # dies without a word: its record says running\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    parent = Session(None, db=url, session_id="tuner-1")
    assert parent.state == "paused" and parent.record["interrupted"] is True
    assert parent.resume() and parent.complete()
    assert parent.record["state"] == "complete"
