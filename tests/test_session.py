"""The session state machine: lifecycle, guards, stages, updates, failures and records."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator

import pytest
import torch

from ptutils import open_db
from ptutils import session as session_module
from ptutils.errors import (
    BackendUnavailableError,
    ConfigError,
    SessionError,
)
from ptutils.session import Session
from ptutils.status import SESSIONS, StatusWriter, request_pause
from ptutils.update import Evaluate, Monitor, Threshold, every_n_steps

from .support.sessionkit import same_weights, session, weights


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


def test_children_are_linked_in_both_records(url):
    parent = session(url, name="tuner")
    child = session(url, name="trial", parent=parent)
    assert parent.children == [child] and child.parent is parent
    assert parent.record["children"] == [child.id]
    assert child.record["parent_id"] == parent.id


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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_session_on_cuda_checkpoints_and_resumes_exactly(url, tmp_path):
    from .support.sessionkit import model as make_model

    def cuda_model():
        m = make_model()
        return type(m)(m.module, m.criterion, {"cls": "torch.optim.SGD", "lr": 0.1}, device="cuda", metrics=m.metrics)

    reference = session((tmp_path / "ref").as_uri(), model=cuda_model()).run()
    first = session(url, model=cuda_model(), updates=[every_n_steps(7, "pause")])
    first.run()
    resumed = session(url, session_id=first.id, model=cuda_model(), updates=[every_n_steps(7, "pause")])
    while resumed.state != "complete":
        resumed.run()
    assert next(resumed.model.module.parameters()).is_cuda
    assert same_weights(weights(resumed), weights(reference))
    assert resumed.metrics == reference.metrics and "train_accuracy" in resumed.metrics  # epochs paused half-way


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
    """The loop never reads the loss or the training metrics back per step: a run's device syncs do not grow
    with its steps (the epoch means are read once an epoch)."""
    from .support.sessionkit import model as make_model
    from .support.sessionkit import provider

    def syncs(epochs: int) -> int:
        m = make_model()
        cuda = type(m)(m.module, m.criterion, {"cls": "torch.optim.SGD", "lr": 0.1}, device="cuda", metrics=m.metrics)
        s = session((tmp_path / str(epochs)).as_uri(), model=cuda, data=provider(batch_size=1),
                    stages=[{"name": "train", "data": "train", "max_epochs": epochs}], status_interval=1.0,
                    checkpoint_every_epochs=None)  # checkpoints copy the state to the host, by design
        with cuda_sync_warnings() as caught:
            s.run()
        assert s.state == "complete" and "train_accuracy" in s.metrics
        return syncs_in(caught)

    with cuda_sync_warnings() as probe:
        float(torch.ones(1, device="cuda"))
    assert syncs_in(probe) >= 1, "sync debug mode reports nothing here"
    one, four = syncs(1), syncs(4)
    extra_steps = 3 * 72  # 72 single-sample batches per epoch
    assert four - one < extra_steps // 4, (one, four)


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


def test_epoch_event_is_logged_even_when_an_epoch_end_update_changes_stage(url):
    s = session(
        url,
        stages=[{"name": "a", "data": "train", "max_epochs": 5}, {"name": "b", "data": "train", "max_steps": 1}],
        transitions=[{"trigger": "go", "source": "a", "dest": "b"}],
        updates=[Monitor(None, then="go", on="epoch", every=2, stages=["a"])],
    ).run()
    epochs = [(e["stage"], e["stage_epoch"]) for e in s.events("epoch")]
    assert epochs[:2] == [("a", 1), ("a", 2)]




def test_each_epoch_records_the_training_loss_and_metrics_and_their_history(url):
    s = session(url, updates=[Evaluate("val")]).run()
    epochs = s.events("epoch")
    assert all({"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= e["metrics"].keys() for e in epochs)
    history = s.metric_history("train_loss")
    assert [(p.step, p.stage, p.epoch) for p in history] == [(5, "train", 1), (10, "train", 2), (15, "train", 3)]
    assert [p.value for p in history] == [e["metrics"]["train_loss"] for e in epochs]
    assert history[-1].value < history[0].value and s.metrics["train_loss"] == history[-1].value
    assert [p.step for p in s.metric_history("val_accuracy")] == [5, 10, 15]
    assert s.metric_history("nope") == []


def test_the_training_loss_is_the_mean_of_the_epochs_steps(url):
    seen = []
    s = session(url, updates=[lambda sess: seen.append(float(sess.loss)) if sess.event == "step" else None],
                stages=[{"name": "train", "data": "train", "max_epochs": 1}]).run()
    assert s.metrics["train_loss"] == pytest.approx(sum(seen) / len(seen), rel=1e-6) and len(seen) == 5


def test_the_metric_history_of_a_session_reopened_elsewhere(url):
    first = session(url).run()
    reopened = session(url, session_id=first.id)
    assert reopened.metric_history("train_accuracy") == first.metric_history("train_accuracy")
    assert len(reopened.metric_history("train_accuracy")) == 3


def test_a_run_paused_mid_epoch_resumes_with_bitwise_the_same_weights_and_training_metrics(url, tmp_path, monkeypatch):
    monkeypatch.setattr(session_module, "FOLD", 2)  # fold every 2 steps, so pauses fall between and after folds
    reference = session((tmp_path / "ref").as_uri(), updates=[Evaluate("val")]).run()
    s = session(url, updates=[Evaluate("val"), every_n_steps(3, "pause")])
    s.run()
    assert s.state == "paused" and s.batch_in_epoch == 3
    while s.state != "complete":  # each time in a new Session, as a new process would
        s.close()
        s = session(url, session_id=s.id, updates=[Evaluate("val"), every_n_steps(3, "pause")])
        s.run()
    assert same_weights(weights(s), weights(reference))
    assert s.metrics == reference.metrics
    for name in ("train_loss", "train_accuracy", "val_loss"):
        assert s.metric_history(name) == reference.metric_history(name), name


def test_a_misspelled_data_name_fails_when_the_session_is_built(url):
    with pytest.raises(ConfigError, match=r"'updates\[0\]': no dataset 'vall'; known: train, val$"):
        session(url, updates=[Evaluate("vall")])
    with pytest.raises(ConfigError, match=r"'stages.train.data': no dataset 'trian'; known: train, val$"):
        session(url, stages=[{"name": "train", "data": "trian"}])
    with pytest.raises(ConfigError, match=r"'stages.train.data.batch_size': expected an int >= 1"):
        session(url, stages=[{"name": "train", "data": {"dataset": "train", "batch_size": 0}}])
    assert open_db(url).collection(SESSIONS).load({}) == []  # refused before anything was recorded


def test_an_epoch_a_step_budget_ends_part_way_still_records_its_means(url):
    s = session(url, stages=[{"name": "train", "data": "train", "max_steps": 7}]).run()
    assert [(p.step, p.epoch) for p in s.metric_history("train_loss")] == [(5, 1), (7, 2)]
    assert s.metrics["train_loss"] == s.metric_history("train_loss")[-1].value


def test_run_until_a_step_pauses_there_and_goes_on_exactly(tmp_path):
    """``run(until_step=N)`` pauses at step N (after the epoch N ends), as tuning runs children round by round."""
    reference = session((tmp_path / "ref").as_uri(), name="ref").run()
    s = session((tmp_path / "db").as_uri(), name="rounds")  # 5 steps an epoch, 3 epochs
    s.run(until_step=3)
    assert (s.state, s.step, s.record["pause_reason"]) == ("paused", 3, "until step 3")
    s.run(until_step=5)  # the epoch's last step: its metrics are in before the pause
    assert s.step == 5 and s.metric_history("train_loss")[-1].step == 5
    assert s.run(until_step=5).step == 5  # already there: nothing runs
    s.run(until_step=15)  # the end of the budget: it completes instead of pausing
    assert (s.state, s.step) == ("complete", 15)
    assert same_weights(weights(reference), weights(s))


def test_run_until_refuses_a_step_that_is_not_an_int(tmp_path):
    s = session((tmp_path / "db").as_uri())
    with pytest.raises(SessionError, match="until_step"):
        s.run(until_step=2.5)
