"""Updates: conditions, Monitor scheduling, composition and the restore-and-remedy action."""

from __future__ import annotations

import math

import pytest
import torch

from ptutils.update import (
    Always, Monitor, NonFinite, Plateau, Remedies, Threshold, clip_gradients, compose, every_n_steps, gap,
    lower_lr, run_updates,
)

from .support.sessionkit import session


def test_threshold():
    assert Threshold(above=1.0)(2.0) and not Threshold(above=1.0)(1.0)
    assert Threshold(below=0.1)(0.0) and not Threshold(below=0.1)(None)
    with pytest.raises(ValueError):
        Threshold()


def test_non_finite():
    assert NonFinite()(float("nan")) and NonFinite()(torch.tensor(float("inf")))
    assert not NonFinite()(1e30) and not NonFinite()(None)


def test_plateau_counts_observations_without_improvement_and_resumes_from_its_state():
    p = Plateau(patience=2, min_delta=0.1)
    assert [p(v) for v in (1.0, 0.8, 0.75, 0.74)] == [False, False, False, True]
    q = Plateau(patience=2, min_delta=0.1)
    q.load_state_dict(Plateau(patience=2).state_dict() | {"best": 0.8, "bad": 1})
    assert q(0.79) is True
    assert Plateau(mode="max", patience=1)(1.0) is False
    with pytest.raises(ValueError):
        Plateau(mode="median")


class FakeSession:
    """Just what a Monitor reads: the event, the stage and values."""

    def __init__(self):
        self.event, self.stage, self.metrics, self.fired, self.logged = "step", "train", {}, [], []

    def value(self, quantity):
        return quantity(self) if callable(quantity) else self.metrics.get(quantity)

    def trigger(self, name):
        self.fired.append(name)

    def log_event(self, kind, **data):
        self.logged.append((kind, data))


def test_monitor_every_once_stages_and_missing_values():
    s = FakeSession()
    m = Monitor("loss", Threshold(above=1.0), "pause", every=2)
    for loss in (5.0, 5.0, 0.5, 5.0):
        s.metrics["loss"] = loss
        m(s)
    assert s.fired == ["pause", "pause"]
    once = Monitor("loss", Always(), "stop", once=True)
    once(s), once(s)
    assert s.fired[-1:] == ["stop"] and once.fired == 1
    scoped = Monitor("loss", Always(), "go", stages=["test"])
    scoped(s)
    assert "go" not in s.fired
    absent = Monitor("val_loss", Always(), "go")
    absent(s)
    assert "go" not in s.fired  # no value yet: nothing to judge
    s.event = "epoch"
    Monitor("loss", Always(), "epoch-action", on="epoch")(s)
    assert s.fired[-1] == "epoch-action"


def test_monitor_state_round_trip():
    m = Monitor("loss", Plateau(patience=3), "pause", every=2)
    m.count, m.fired, m.when.best, m.when.bad = 7, 1, 0.5, 2
    n = Monitor("loss", Plateau(patience=3), "pause", every=2)
    n.load_state_dict(m.state_dict())
    assert (n.count, n.fired, n.when.best, n.when.bad) == (7, 1, 0.5, 2)


def test_gap_and_callables_as_quantities():
    s = FakeSession()
    s.metrics.update(train_error=0.1, val_error=0.4)
    seen = []
    Monitor(gap("train_error", "val_error"), Threshold(above=0.25), lambda sess, v: seen.append(v))(s)
    assert seen == [pytest.approx(0.3)]


def test_compose_and_run_updates_require_the_session_back():
    s = FakeSession()
    calls = []
    composed = compose(lambda x: calls.append(1), lambda x: (calls.append(2), x)[1])
    assert composed(s) is s and calls == [1, 2]
    with pytest.raises(TypeError, match="returned int"):
        run_updates([lambda x: 3], s)


def test_every_n_steps(tmp_path):
    seen = []
    session(tmp_path.as_uri(), updates=[every_n_steps(4, lambda s, v: seen.append(s.step))]).run()
    assert seen == [4, 8, 12]


def exploding_session(url, remedies, **kwargs):
    """A session whose loss explodes from step 6 on until a remedy brings the LR down."""

    def explode(s):
        if s.event == "step" and s.step >= 6 and s.model.lr > 0.02:
            s.loss = torch.tensor(float("nan"))
        return s

    return session(url, checkpoint_every_steps=2, checkpoint_every_epochs=None,
                   updates=[explode, Monitor("loss", NonFinite(), then=Remedies(remedies))], **kwargs)


def test_remedies_restore_then_apply_the_next_remedy(tmp_path):
    s = exploding_session(tmp_path.as_uri(), [lower_lr(0.5), lower_lr(0.1)]).run()
    assert s.state == "complete" and math.isfinite(float(s.loss))
    assert [e["remedy"] for e in s.events("remedy")] == ["lower_lr(x0.5) -> lr=0.05", "lower_lr(x0.1) -> lr=0.005"]
    assert [e["restored_step"] for e in s.events("restore")] == [4, 4]
    # Each remedy applied exactly once: the second restore went to a checkpoint written
    # before the first remedy, so the first was re-applied: 0.1 * 0.5 * 0.1.
    assert s.model.lr == pytest.approx(0.005)


def test_remedy_already_in_the_restored_checkpoint_is_not_applied_twice(tmp_path):
    state = {"n": 0}

    def explode_twice(s):
        if s.event == "step" and (s.step, state["n"]) in ((6, 0), (10, 1)):
            state["n"] += 1
            s.loss = torch.tensor(float("nan"))
        return s

    s = session(tmp_path.as_uri(), checkpoint_every_steps=2, checkpoint_every_epochs=None,
                updates=[explode_twice, Monitor("loss", NonFinite(), then=Remedies([lower_lr(0.5), lower_lr(0.5)]))])
    s.run()
    restores = [e["restored_step"] for e in s.events("restore")]
    assert restores == [4, 8]  # the second restore lands on a checkpoint written after the first remedy
    assert s.model.lr == pytest.approx(0.1 * 0.5 * 0.5)


def test_remedies_exhausted_fail_the_session(tmp_path):
    s = exploding_session(tmp_path.as_uri(), [lower_lr(0.9)])
    with pytest.raises(FloatingPointError, match="still diverging"):
        s.run()
    assert s.state == "failed" and s.record["error"]["type"] == "FloatingPointError"


def test_clip_gradients_remedy_survives_a_resume(tmp_path):
    s = exploding_session(tmp_path.as_uri(), [clip_gradients(0.5), lower_lr(0.1)]).run()
    assert s.model.grad_clip == 0.5 and s.state == "complete"
