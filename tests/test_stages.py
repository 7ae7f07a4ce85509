"""Stages and their transitions: budgets, polled and fired triggers, guards, declaration errors, setups."""

from __future__ import annotations

import pytest
import torch

from ptutils.errors import (
    SessionError,
)
from ptutils.update import Monitor, Threshold

from .support.sessionkit import same_weights, session, weights


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


def test_transition_declaration_errors_name_the_field(url):
    with pytest.raises(Exception, match=r"transitions\[0\]"):
        session(url, stages=["a"], transitions=[{"trigger": "go", "source": "a", "dest": "nowhere"}])
    with pytest.raises(Exception, match=r"transitions\[0\].trigger"):
        session(url, stages=["a", "b"], transitions=[{"trigger": "pause", "source": "a", "dest": "b"}])
    with pytest.raises(Exception, match=r"transitions\[0\].when"):
        session(url, stages=["a", "b"], transitions=[{"trigger": "go", "source": "a", "dest": "b", "when": 1}])


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
    s = session(url, stages=[{"name": "a", "data": "train", "max_steps": 2, "setup": "tests.test_stages.widen_head"}])
    s.run()
    assert s.model.module[3].out_features == 3


def widen_head(session):
    """A stage setup: a 3-class head and a fresh optimizer (a structural change)."""
    torch.manual_seed(11)
    session.model.module[3] = torch.nn.Linear(16, 3)
    session.model.set_optimizer({"cls": "torch.optim.SGD", "lr": 0.05})
