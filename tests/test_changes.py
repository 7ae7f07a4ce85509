"""Resuming under a changed config: differences refused with their fields, or applied and recorded when asked."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from ptutils.config import Config
from ptutils.errors import ConfigChangeError
from ptutils.session import Session
from ptutils.update import every_n_steps

from .support.sessionkit import same_weights, weights
from .test_config import BASE


def paused_at_step_4(url: str) -> Session:
    """BASE run until it pauses at step 4 (mid-epoch: an epoch is 5 steps), then closed as a process would be."""
    s = Session.from_config(BASE, db=url, updates=[every_n_steps(4, "pause")]).run()
    assert s.state == "paused" and s.step == 4
    s.close()
    return s


def set_lr_after_step(step: int, lr: float):
    def update(session: Session) -> Session:
        if session.event == "step" and session.step == step:
            session.model.set_lr(lr)
        return session

    return update


def test_a_changed_lr_or_budget_is_refused_naming_each_field(url):
    first = paused_at_step_4(url)
    edited = Config.from_dict(BASE).with_overrides({"model.optimizer.lr": 0.05, "stages.train.max_epochs": 3})
    with pytest.raises(ConfigChangeError) as err:
        Session.from_config(edited.to_dict(), db=url, session_id=first.id)
    assert set(err.value.fields) == {"model.optimizer.lr", "stages[0].max_epochs"}
    assert err.value.fields["model.optimizer.lr"] == (0.1, 0.05)
    message = str(err.value)
    assert "overrides={'model.optimizer.lr': 0.05}" in message and "stages[0].max_epochs: 2 -> 3" in message
    again = Session.resume(url, first.id)  # nothing was changed: the stored config resumes as before
    assert again.state == "paused" and again.record["config"]["model"]["optimizer"]["lr"] == 0.1
    assert "config_changes" not in again.record


def test_a_change_to_what_the_run_computes_is_refused_even_when_asked(url):
    first = paused_at_step_4(url)
    with pytest.raises(ConfigChangeError, match="changes what the run computes") as err:
        Session.resume(url, first.id, overrides={"model.module.out_features": 3, "seed": 4})
    assert set(err.value.fields) == {"model.module.out_features", "seed"}


def test_a_new_lr_asked_for_is_applied_after_the_restore_and_recorded(url, tmp_path):
    reference = Session.from_config(BASE, db=(tmp_path / "ref").as_uri(), updates=[set_lr_after_step(4, 0.05)]).run()
    unchanged = Session.resume(url, paused_at_step_4(url).id).run()
    assert not same_weights(weights(unchanged), weights(reference))  # the lr does change the run

    first = paused_at_step_4((tmp_path / "b").as_uri())
    resumed = Session.resume((tmp_path / "b").as_uri(), first.id, overrides={"model.optimizer.lr": 0.05})
    assert "config_changes" not in resumed.record  # recorded once in effect: after run() restores the checkpoint
    resumed.run()
    assert resumed.state == "complete" and resumed.model.lr == 0.05
    assert same_weights(weights(resumed), weights(reference))
    record = resumed.record
    assert record["config"]["model"]["optimizer"]["lr"] == 0.05
    [change] = record["config_changes"]
    assert change["step"] == 4 and change["attempt"] == 1 and change["stage"] == "train"
    assert change["fields"] == [{"field": "model.optimizer.lr", "from": 0.1, "to": 0.05}]
    assert [e["fields"] for e in resumed.events("config_change")] == [change["fields"]]


def _crash_after_step_7(url: str) -> None:
    def crash(session: Session) -> Session:
        if session.step == 7:
            os._exit(17)  # no cleanup, no final status write: like SIGKILL
        return session

    Session.from_config(BASE, db=url, session_id="crashy", updates=[crash]).run()


def test_an_interrupted_run_takes_the_new_lr_at_the_step_it_goes_back_to(url):
    proc = mp.get_context("spawn").Process(target=_crash_after_step_7, args=(url,))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 17
    resumed = Session.resume(url, "crashy", overrides={"model.optimizer.lr": 0.05})
    assert resumed.state == "paused" and resumed.record["interrupted"] is True
    resumed.run()
    restored = resumed.events("resume")[0]["restored_step"]
    [change] = resumed.record["config_changes"]
    assert change["step"] == restored and restored <= 7 and resumed.model.lr == 0.05


def test_more_epochs_asked_for_extend_the_stage(url):
    first = paused_at_step_4(url)
    resumed = Session.resume(url, first.id, overrides={"stages.train.max_epochs": 3}).run()
    assert resumed.state == "complete" and resumed.step == 15 and resumed.stage_epoch == 3
    [change] = resumed.record["config_changes"]
    assert change["fields"] == [{"field": "stages[0].max_epochs", "from": 2, "to": 3}]


def test_a_pending_session_takes_any_change(url):
    first = Session.from_config(BASE, db=url)
    first.close()
    again = Session.from_config(BASE, db=url, session_id=first.id, overrides={"model.module.out_features": 3})
    assert again.state == "pending"
    assert again.record["config"]["model"]["module"]["out_features"] == 3
