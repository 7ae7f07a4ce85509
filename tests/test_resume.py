"""Exact resume: an interrupted session, resumed from its checkpoint, ends bitwise-identical."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from ptutils import open_db
from ptutils.update import Monitor

from .support.sessionkit import model, same_weights, session, weights

STAGES = [{"name": "train", "data": "train", "max_epochs": 3}]


def build(url, **kwargs):
    kwargs.setdefault("stages", STAGES)
    kwargs.setdefault("checkpoint_every_steps", 3)
    return session(url, dropout=0.3, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return weights(build(tmp_path_factory.mktemp("ref").as_uri()).run())


# 5 batches per epoch: 1 = first step, 2 = mid-epoch, 5 = last batch of an epoch,
# 6 = just after a periodic checkpoint, 10 = epoch boundary after the epoch checkpoint.
@pytest.mark.parametrize("pause_at", [1, 2, 5, 6, 10, 13])
def test_pause_and_resume_in_a_fresh_session_object_is_exact(tmp_path, reference, pause_at):
    url = tmp_path.as_uri()
    first = build(url, updates=[Monitor(None, then="pause", every=pause_at, once=True)])
    first.run()
    assert first.state == "paused" and first.step == pause_at
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    resumed = build(url, session_id=first.id, model=model(seed=99, dropout=0.3),
                    updates=[Monitor(None, then="pause", every=pause_at, once=True)])
    assert resumed.state == "paused"
    resumed.run()
    assert resumed.state == "complete" and resumed.step == 15
    assert same_weights(weights(resumed), reference)
    assert resumed.events("resume")[0]["restored_step"] == pause_at


def _crash_at(url: str, session_id: str, step: int) -> None:
    def crash(session):
        if session.step == step:
            os._exit(17)  # no cleanup, no final status write: like SIGKILL
        return session

    build(url, session_id=session_id, updates=[crash]).run()


@pytest.mark.parametrize("crash_at", [4, 11])
def test_crash_in_another_process_then_resume_is_exact(tmp_path, reference, crash_at):
    url = tmp_path.as_uri()
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_crash_at, args=(url, "crashy", crash_at))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 17
    record = open_db(url).collection("sessions").load_from_id("crashy")
    assert record["state"] == "running"  # the dead process could not say otherwise
    resumed = build(url, session_id="crashy", model=model(seed=5, dropout=0.3))
    assert resumed.state == "paused" and resumed.record["interrupted"] is True
    resumed.run()
    assert resumed.state == "complete" and same_weights(weights(resumed), reference)
    restored = resumed.events("resume")[0]["restored_step"]
    # A checkpoint still being written in the background when the process died is lost;
    # an earlier periodic (every 3 steps), epoch-end (every 5) or the initial one is used.
    assert restored <= crash_at and (restored % 3 == 0 or restored % 5 == 0)


def test_resume_falls_back_when_latest_checkpoint_is_corrupt(tmp_path, reference):
    url = tmp_path.as_uri()
    first = build(url, updates=[Monitor(None, then="pause", every=8, once=True)])
    first.run()
    latest = first.checkpoints.records()[0]
    data = bytearray(first.checkpoints.db.get_blob(latest["blob"]))
    data[len(data) // 2] ^= 0xFF
    first.checkpoints.db.put_blob(bytes(data), latest["blob"])
    resumed = build(url, session_id=first.id, updates=[Monitor(None, then="pause", every=8, once=True)])
    resumed.run()
    # Resumed from the checkpoint before the pause, the monitor replays its decision.
    assert resumed.state == "paused" and resumed.step == 8
    resumed.run()
    assert resumed.state == "complete" and same_weights(weights(resumed), reference)
    warnings = resumed.events("warning")
    assert warnings and "checksum mismatch" in warnings[0]["message"]
    assert resumed.events("resume")[0]["restored_step"] < 8


def test_pause_requested_in_the_middle_of_a_step_waits_for_its_end(tmp_path, reference):
    """What a Ctrl-C handler does: ask, during the step; the pause happens at the boundary."""
    url = tmp_path.as_uri()
    first = build(url)
    criterion = first.model.criterion
    calls = {"n": 0}

    def interrupted_loss(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 8:
            first.request_pause(reason="Ctrl-C")  # arrives between forward and backward
        return criterion(outputs, targets)

    first.model.criterion = interrupted_loss
    first.run()
    assert first.state == "paused" and first.step == 8 and first.record["pause_reason"] == "Ctrl-C"
    resumed = build(url, session_id=first.id, model=model(seed=3, dropout=0.3))
    resumed.run()
    assert resumed.state == "complete" and same_weights(weights(resumed), reference)
