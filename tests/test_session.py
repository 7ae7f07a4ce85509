"""The session state machine: lifecycle, guards, stages, updates, failures and records."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator

import pytest
import torch

from ptutils import open_db
from ptutils.checkpoint import CheckpointStore, deserialize, serialize
from ptutils.errors import BackendUnavailableError, SessionError, StorageError, TransitionError
from ptutils.session import Session
from ptutils.status import StatusWriter, request_pause
from ptutils.update import Monitor, Threshold, every_n_steps

from .support.sessionkit import model, same_weights, session, weights


@pytest.fixture
def url(tmp_path):
    return tmp_path.as_uri()


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


def test_run_trains_through_budget_and_completes(url):
    s = session(url).run()
    assert s.state == "complete" and s.outcome == "success"
    record = s.record
    assert record["outcome"] == "success" and record["progress"] == 1.0
    assert record["step"] == s.step == 3 * 5  # 72 training samples / 16 per batch = 5 batches
    assert record["finished"] >= record["started"]


def test_max_steps_budget(url):
    s = session(url, stages=[{"name": "train", "data": "train", "max_steps": 7}]).run()
    assert s.step == 7 and s.state == "complete"


def test_stage_done_moves_through_stages_and_eval_metrics(url):
    s = session(
        url,
        stages=[{"name": "train", "data": "train", "max_epochs": 2},
                {"name": "test", "data": "val", "mode": "eval", "max_epochs": 1}],
        transitions=[{"trigger": "stage_done", "source": "train", "dest": "test"}],
    ).run()
    assert s.state == "complete"
    assert [h["stage"] for h in s.record["stage_history"]] == ["train", "test"]
    assert 0.0 <= s.metrics["test_accuracy"] <= 1.0 and "test_loss" in s.metrics
    assert s.step == 10  # eval steps do not count as training steps


def test_guarded_stage_done_completes_when_guard_refuses(url):
    s = session(
        url,
        stages=[{"name": "train", "data": "train", "max_epochs": 1}, {"name": "finetune", "data": "train"}],
        transitions=[{"trigger": "stage_done", "source": "train", "dest": "finetune",
                      "conditions": [lambda s: False]}],
    ).run()
    assert s.state == "complete" and s.stage == "train"


def test_polled_guard_changes_stage_as_soon_as_it_holds(url):
    s = session(
        url,
        stages=[{"name": "train", "data": "train", "max_epochs": 5},
                {"name": "short", "data": "train", "max_steps": 2}],
        transitions=[{"trigger": "move", "source": "train", "dest": "short", "conditions": [lambda s: s.step >= 3]}],
    ).run()
    assert [h["stage"] for h in s.record["stage_history"]] == ["train", "short"]
    assert [h["step"] for h in s.record["stage_history"]] == [0, 3]
    assert s.step == 5


def test_unguarded_stage_trigger_fires_only_from_an_update(url):
    fired_at = []

    def switch(session, value):
        fired_at.append(session.step)
        session.trigger("switch")

    s = session(
        url,
        stages=[{"name": "a", "data": "train", "max_epochs": 3}, {"name": "b", "data": "train", "max_steps": 1}],
        transitions=[{"trigger": "switch", "source": "a", "dest": "b"}],
        updates=[Monitor("loss", Threshold(below=10.0), switch, every=4, once=True)],
    ).run()
    assert fired_at == [4]
    assert s.step == 5 and s.stage == "b"


def test_unless_guard(url):
    s = session(
        url,
        stages=[{"name": "a", "data": "train", "max_steps": 4}, {"name": "b", "data": "train", "max_steps": 1}],
        transitions=[{"trigger": "go", "source": "a", "dest": "b", "conditions": [lambda s: True],
                      "unless": [lambda s: s.step < 2]}],
    ).run()
    assert [h["step"] for h in s.record["stage_history"]] == [0, 2]


def test_stage_trigger_outside_running_is_refused(url):
    s = session(url, stages=["a", "b"], transitions=[{"trigger": "go", "source": "a", "dest": "b"}])
    with pytest.raises(TransitionError, match="'go'"):
        s.trigger("go")


def test_transition_declaration_errors_name_the_field(url):
    with pytest.raises(Exception, match=r"transitions\[0\]"):
        session(url, stages=["a"], transitions=[{"trigger": "go", "source": "a", "dest": "nowhere"}])
    with pytest.raises(Exception, match=r"transitions\[0\].trigger"):
        session(url, stages=["a", "b"], transitions=[{"trigger": "pause", "source": "a", "dest": "b"}])
    with pytest.raises(Exception, match=r"transitions\[0\].when"):
        session(url, stages=["a", "b"], transitions=[{"trigger": "go", "source": "a", "dest": "b", "when": 1}])


def test_pause_from_an_update_then_resume_in_process_matches_uninterrupted(url, tmp_path):
    reference = session((tmp_path / "ref").as_uri()).run()
    s = session(url, updates=[Monitor(None, then="pause", every=7, once=True)])
    s.run()
    assert s.state == "paused" and s.step == 7
    assert s.record["state"] == "paused" and s.record["pause_reason"] == "requested"
    assert [c["reason"] for c in s.checkpoints.records()][0] == "pause"
    s.run()
    assert s.state == "complete"
    assert same_weights(weights(s), weights(reference))


def test_pause_requested_through_the_record(url):
    db = open_db(url)

    def ask_for_pause(session, value):
        # A request to a record that does not say running yet is void at the start, and
        # run() records its start while the first steps run: reading the record waits for it.
        assert session.record["state"] == "running"
        request_pause(db, session.id, reason="operator")

    def real_step_time(session):
        # Steps of a few ms, like real training: the heartbeat thread (an fsync per
        # write) gets a window however loaded the machine, without a wall-clock bound.
        time.sleep(0.003)
        return session

    s = session(url, status_interval=0.0, updates=[Monitor(None, then=ask_for_pause, every=3, once=True), real_step_time],
                stages=[{"name": "train", "data": "train", "max_epochs": 400}])
    s.run()
    assert s.state == "paused"
    assert 3 <= s.step < s.stage_total(s.stages["train"])  # seen at the next heartbeat read, long before the end
    assert s.record["pause_reason"] == "operator" and s.record["control"]["pause"] is False


def test_exception_in_update_fails_session_with_traceback(url):
    def broken(session):
        if session.step == 4:
            raise ZeroDivisionError("metric went wrong")
        return session

    s = session(url, updates=[broken])
    with pytest.raises(ZeroDivisionError):
        s.run()
    assert s.state == "failed"
    error = s.record["error"]
    assert error["type"] == "ZeroDivisionError" and error["message"] == "metric went wrong"
    assert "broken" in error["traceback"] and s.record["outcome"] == "failure"


def test_update_must_return_the_session(url):
    s = session(url, updates=[lambda session: 42])
    with pytest.raises(SessionError, match="must return the session"):
        s.run()
    assert s.state == "failed"


def test_update_swaps_optimizer_and_lr(url):
    def swap(session, value):
        session.model.set_optimizer({"cls": "torch.optim.Adam", "lr": 0.01})

    s = session(url, updates=[Monitor(None, then=swap, every=5, once=True)]).run()
    assert isinstance(s.model.optimizer, torch.optim.Adam) and s.state == "complete"


def test_update_requests_new_dataloader(url):
    requests = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def get_dataloader(self, request):
            requests.append(request)
            return self.inner.get_dataloader(request)

    from .support.sessionkit import provider

    def switch_data(session, value):
        session.request_data({"dataset": "val", "batch_size": 4})

    s = session(url, data=Spy(provider()), updates=[Monitor(None, then=switch_data, every=2, once=True)],
                stages=[{"name": "train", "data": "train", "max_steps": 6}]).run()
    assert requests == ["train", {"dataset": "val", "batch_size": 4}]
    assert s.step == 6


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


def test_events_the_database_cannot_take_stay_buffered_and_the_run_goes_on(url, monkeypatch):
    s = session(url)

    def unavailable(docs):
        raise BackendUnavailableError("events collection unreachable")

    monkeypatch.setattr(s._status.events, "save_many", unavailable)
    s.run()  # every flush fails: before checkpoints, with status writes, at the end of the stage
    assert s.state == "complete" and s.record["state"] == "complete"
    monkeypatch.undo()
    assert [e["stage_epoch"] for e in s.events("epoch")] == [1, 2, 3]


def test_events_are_stored_before_the_checkpoint_a_resume_would_start_from(url):
    stored = []

    def look(sess):
        if sess.event == "step" and sess.step == 2:
            sess.drain()  # the one heartbeat (queued at step 1) is written before any event is logged
        if sess.event == "epoch" and sess.stage_epoch == 2:  # before epoch 2's event and checkpoint
            sess.drain()  # epoch 1's checkpoint is written: a crash now would resume after epoch 1
            events = StatusWriter(open_db(url), sess.id).load_events("epoch")
            stored.extend(e["stage_epoch"] for e in events)
        return sess

    s = session(url, updates=[look], status_interval=3600, checkpoint_every_epochs=1)
    s.start()  # recorded now, so the one heartbeat comes at step 1
    s.run()
    assert stored == [1]


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


def test_children_are_linked_in_both_records(url):
    parent = session(url, name="tuner")
    child = session(url, name="trial", parent=parent)
    assert parent.children == [child] and child.parent is parent
    assert parent.record["children"] == [child.id]
    assert child.record["parent_id"] == parent.id


def test_attach_to_existing_record_by_id(url):
    s = session(url, updates=[every_n_steps(4, "pause")])
    s.run()
    again = session(url, session_id=s.id)
    assert again.state == "paused" and again.step == 4 and again.stage == "train"


def test_attach_refuses_a_session_running_elsewhere(url):
    s = session(url)
    s.start()
    with pytest.raises(SessionError, match="is running in process"):
        session(url, session_id=s.id)


def test_graph_is_mermaid_with_stages(url):
    s = session(url, stages=["train", "test"], transitions=[{"trigger": "evaluate", "source": "train", "dest": "test"}])
    text = s.graph()
    assert "stateDiagram-v2" in text
    assert "running_train --> running_test: evaluate" in text
    assert "pending --> running: start" in text


def test_model_must_be_a_ptutils_model(url):
    with pytest.raises(SessionError, match="ptutils.model.Model"):
        Session(torch.nn.Linear(2, 2), db=url)


def test_events_record_stage_changes(url):
    s = session(url, stages=[{"name": "a", "data": "train", "max_epochs": 1}, {"name": "b", "data": "train", "max_epochs": 1}],
                transitions=[{"trigger": "stage_done", "source": "a", "dest": "b"}]).run()
    kinds = [e["kind"] for e in s.events()]
    assert kinds.count("stage") == 1
    assert s.events("stage")[0]["stage"] == "b"


def test_the_record_shows_the_newest_checkpoint_and_a_restart_clears_it(url):
    s = session(url, updates=[every_n_steps(6, "pause")])  # epochs of 5 steps, a checkpoint at each epoch end
    s.updates[0].once = True
    s.run()
    newest = s.checkpoints.records()[0]
    assert newest["reason"] == "pause" and newest["step"] == 6
    assert s.record["last_checkpoint"] == {"id": newest["_id"], "step": 6, "reason": "pause", "time": newest["created"]}
    assert "checkpoint" not in {e["kind"] for e in s.events()}  # the checkpoints collection is their log
    s.run()
    assert s.record["last_checkpoint"]["id"] == s.checkpoints.records()[0]["_id"]
    s.restart()
    assert s.record["last_checkpoint"] is None
    s.start()
    initial = s.checkpoints.records()[0]
    assert initial["reason"] == "initial" and s.record["last_checkpoint"]["id"] == initial["_id"]


def test_grad_norm_monitor_turns_on_tracking(url):
    seen = []
    s = session(url, updates=[Monitor("grad_norm", Threshold(above=0.0), lambda s, v: seen.append(v), every=5)])
    assert s.model.track_grad_norm
    s.run()
    assert len(seen) == 3 and all(v > 0 for v in seen)


def test_a_model_loaded_from_a_checkpoint_owns_its_optimizer_state():
    trained = model(seed=1)
    trained.train_step((torch.randn(4, 8), torch.tensor([0, 1, 0, 1])))  # momentum buffers now exist
    state = deserialize(serialize(trained.state_dict()))  # its tensors share the checkpoint's one buffer
    first, second = model(seed=2), model(seed=3)
    first.load_state_dict(state)
    second.load_state_dict(state)
    loaded = [list(m.optimizer.state.values())[0]["momentum_buffer"] for m in (first, second)]
    saved = list(state["optimizer"]["state"].values())[0]["momentum_buffer"]
    assert all(torch.equal(b, saved) for b in loaded)
    loaded[0].add_(1.0)  # the first optimizer's next step
    assert torch.equal(loaded[1], saved) and not torch.equal(loaded[0], saved)


def test_model_state_dict_round_trip():
    a, b = model(seed=1), model(seed=2)
    b.load_state_dict(a.state_dict())
    assert same_weights({k: v for k, v in a.module.state_dict().items()}, b.module.state_dict())


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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_session_on_cuda_checkpoints_and_resumes_exactly(url, tmp_path):
    from .support.sessionkit import model as make_model

    def cuda_model():
        m = make_model()
        return type(m)(m.module, m.criterion, {"cls": "torch.optim.SGD", "lr": 0.1}, device="cuda")

    reference = session((tmp_path / "ref").as_uri(), model=cuda_model()).run()
    first = session(url, model=cuda_model(), updates=[every_n_steps(7, "pause")])
    first.run()
    resumed = session(url, session_id=first.id, model=cuda_model(), updates=[every_n_steps(7, "pause")])
    while resumed.state != "complete":
        resumed.run()
    assert next(resumed.model.module.parameters()).is_cuda
    assert same_weights(weights(resumed), weights(reference))


@contextlib.contextmanager
def cuda_sync_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Every device synchronisation inside the block, as torch's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode(0)


def syncs_in(caught: list[warnings.WarningMessage]) -> int:
    return sum("synchroniz" in str(w.message) for w in caught)  # not the "Synchronization debug mode" notice


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_session_does_not_synchronise_every_step(tmp_path):
    """The loop never reads the loss back per step: a run's device syncs do not grow with its steps."""
    from .support.sessionkit import model as make_model
    from .support.sessionkit import provider

    def syncs(epochs: int) -> int:
        m = make_model()
        cuda = type(m)(m.module, m.criterion, {"cls": "torch.optim.SGD", "lr": 0.1}, device="cuda")
        s = session((tmp_path / str(epochs)).as_uri(), model=cuda, data=provider(batch_size=1),
                    stages=[{"name": "train", "data": "train", "max_epochs": epochs}], status_interval=1.0,
                    checkpoint_every_epochs=None)  # checkpoints copy the state to the host, by design
        with cuda_sync_warnings() as caught:
            s.run()
        assert s.state == "complete"
        return syncs_in(caught)

    with cuda_sync_warnings() as probe:
        float(torch.ones(1, device="cuda"))
    assert syncs_in(probe) >= 1, "sync debug mode reports nothing here"
    one, four = syncs(1), syncs(4)
    extra_steps = 3 * 72  # 72 single-sample batches per epoch
    assert four - one < extra_steps // 4, (one, four)


def test_scheduler_steps_every_epoch_by_default(url):
    m = model()
    m.set_scheduler({"cls": "torch.optim.lr_scheduler.StepLR", "step_size": 1, "gamma": 0.5})
    s = session(url, model=m).run()
    assert s.model.lr == pytest.approx(0.1 * 0.5**3)


def test_scheduler_can_step_every_step_or_on_a_metric(url, tmp_path):
    from ptutils.model import Model

    base = model()
    per_step = Model(base.module, base.criterion, {"cls": "torch.optim.SGD", "lr": 0.1},
                     {"cls": "torch.optim.lr_scheduler.StepLR", "step_size": 1, "gamma": 0.9},
                     device="cpu", scheduler_interval="step")
    s = session(url, model=per_step, stages=[{"name": "train", "data": "train", "max_steps": 4}]).run()
    assert s.model.lr == pytest.approx(0.1 * 0.9**4)
    on_metric = Model(model().module, base.criterion, {"cls": "torch.optim.SGD", "lr": 0.1},
                      {"cls": "torch.optim.lr_scheduler.ReduceLROnPlateau", "patience": 0, "factor": 0.5},
                      device="cpu", scheduler_metric="val_loss")
    from ptutils.update import Evaluate

    s = session((tmp_path / "b").as_uri(), model=on_metric, updates=[Evaluate("val")]).run()
    assert s.model.lr <= 0.1  # stepped with val_loss once it existed, never without it


def test_updates_after_one_that_changes_course_wait_for_the_next_step(url):
    seen = []

    def pauser(session):
        if session.step == 3:
            session.trigger("pause")
        return session

    def observer(session):
        seen.append(session.step)
        return session

    s = session(url, updates=[pauser, observer]).run()
    assert s.state == "paused" and seen == [1, 2]


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


def test_epoch_event_is_logged_even_when_an_epoch_end_update_changes_stage(url):
    s = session(
        url,
        stages=[{"name": "a", "data": "train", "max_epochs": 5}, {"name": "b", "data": "train", "max_steps": 1}],
        transitions=[{"trigger": "go", "source": "a", "dest": "b"}],
        updates=[Monitor(None, then="go", on="epoch", every=2, stages=["a"])],
    ).run()
    epochs = [(e["stage"], e["stage_epoch"]) for e in s.events("epoch")]
    assert epochs[:2] == [("a", 1), ("a", 2)]


def test_completed_record_has_no_eta(url):
    s = session(url, status_interval=0.0).run()
    assert s.record["eta_seconds"] is None


def widen_head(session):
    """A stage setup: a 3-class head and a fresh optimizer (a structural change)."""
    torch.manual_seed(11)
    session.model.module[3] = torch.nn.Linear(16, 3)
    session.model.set_optimizer({"cls": "torch.optim.SGD", "lr": 0.05})


def test_stage_setup_runs_on_entry_and_is_replayed_before_a_resume(url, tmp_path):
    def build(u, **kw):
        return session(u, stages=[{"name": "a", "data": "train", "max_epochs": 1},
                                  {"name": "b", "data": "train", "max_epochs": 2, "setup": widen_head}],
                       transitions=[{"trigger": "stage_done", "source": "a", "dest": "b"}], **kw)

    reference = build((tmp_path / "ref").as_uri()).run()
    assert reference.model.module[3].out_features == 3
    first = build(url, updates=[Monitor(None, then="pause", every=8, once=True)])
    first.run()
    assert first.state == "paused" and first.stage == "b"
    resumed = build(url, session_id=first.id, updates=[Monitor(None, then="pause", every=8, once=True)])
    assert resumed.model.module[3].out_features == 2  # a fresh process has the original structure...
    resumed.run()  # ...and gets stage b's head back before the checkpoint is loaded
    assert resumed.state == "complete" and same_weights(weights(resumed), weights(reference))
    with pytest.raises(SessionError, match="cannot restart session"):
        resumed.restart()
    assert resumed.state == "complete"
    fresh = build(url, session_id=first.id)
    fresh.restart()
    assert fresh.state == "pending" and fresh.attempt == 2 and fresh.record["stage_history"] == []


def test_stage_setup_by_import_path(url):
    s = session(url, stages=[{"name": "a", "data": "train", "max_steps": 2, "setup": "tests.test_session.widen_head"}])
    s.run()
    assert s.model.module[3].out_features == 3
