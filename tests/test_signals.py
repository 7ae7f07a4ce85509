"""Ctrl-C and SIGTERM during run(): a pause at the next step boundary, a second Ctrl-C aborts, handlers restored.

The signals are real: sent with ``os.kill`` to a training child process (or,
for what only this process can see, to this process from inside a step).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ptutils import open_db
from ptutils.data import DatasetProvider
from ptutils.errors import Interrupted, NotFoundError

from .support import crashkit
from .support.sessionkit import provider, same_weights, weights

ROOT = Path(__file__).resolve().parent.parent
TOTAL_STEPS = crashkit.STEPS_PER_EPOCH * crashkit.EPOCHS


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights of the uninterrupted run."""
    return weights(crashkit.build(tmp_path_factory.mktemp("reference").as_uri()).run())


@pytest.fixture(autouse=True)
def terminal_signals():
    """SIGINT and SIGTERM as in a program started from a terminal (a background job starts with SIGINT ignored)."""
    previous = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                     (signal.SIGTERM, signal.SIG_DFL))}
    yield
    for s, h in previous.items():
        signal.signal(s, h)


def child(url: str, session_id: str, *args: str) -> subprocess.Popen:
    """A training process; it starts with SIGINT's default, as this process has a handler (``terminal_signals``)."""
    return subprocess.Popen([sys.executable, "-m", "tests.support.crashkit", url, session_id, *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def record_of(url: str, session_id: str) -> dict | None:
    try:
        return open_db(url).collection("sessions").load_from_id(session_id)
    except NotFoundError:
        return None


def wait_until_running(url: str, session_id: str, proc: subprocess.Popen, min_step: int) -> dict:
    """Poll the child's record until it says running at ``min_step`` or later."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        record = record_of(url, session_id)
        if record is not None and record["state"] == "running" and record["step"] >= min_step:
            return record
        time.sleep(0.01)
    raise AssertionError(f"the child never ran to step {min_step}: {proc.communicate()}")


def epochs_logged(session) -> list[int]:
    return sorted(e["stage_epoch"] for e in session.events("epoch"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_pauses_at_the_next_step_and_a_new_process_resumes_exactly(tmp_path, reference, sig):
    url = tmp_path.as_uri()
    proc = child(url, "preempted", "--step-sleep", "0.1")
    wait_until_running(url, "preempted", proc, min_step=2)
    os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"interrupted signal={sig.name} aborted=False" in stdout
    record = record_of(url, "preempted")
    assert record["state"] == "paused" and record["pause_reason"] == sig.name and not record["interrupted"]
    assert 2 <= record["step"] < TOTAL_STEPS
    assert record["last_checkpoint"]["step"] == record["step"]  # checkpointed, then recorded paused
    resumed = crashkit.build(url, "preempted")
    resumed.run()
    assert resumed.state == "complete" and resumed.step == TOTAL_STEPS
    assert resumed.events("resume")[0]["restored_step"] == record["step"]
    assert same_weights(weights(resumed), reference)


def test_a_second_ctrl_c_aborts_in_the_step_and_a_new_process_resumes_from_the_newest_checkpoint(tmp_path, reference):
    url = tmp_path.as_uri()
    proc = child(url, "aborted", "--no-epoch-checkpoints", "--signal-self-at-step", "11", "2")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "interrupted signal=SIGINT aborted=True" in stdout and "state=paused step=11" in stdout
    record = record_of(url, "aborted")
    assert record["state"] == "paused" and record["interrupted"] is True
    assert record["pause_reason"] == "aborted by a second SIGINT at step 11"
    assert record["last_checkpoint"]["step"] == 9  # no checkpoint of the aborted step: every 3 steps only
    resumed = crashkit.build(url, "aborted", checkpoint_every_epochs=None)
    assert resumed.state == "paused"
    resumed.run()
    assert resumed.state == "complete" and same_weights(weights(resumed), reference)
    assert resumed.events("resume")[0]["restored_step"] == 9
    assert epochs_logged(resumed) == [1, 2, 3, 4]


def signal_self(at_step: int, times: int, sig: signal.Signals = signal.SIGINT):
    """An update that sends this process ``times`` real signals during step ``at_step``, once."""
    sent = []

    def update(session):
        if session.event == "step" and session.step == at_step and not sent:
            sent.append(at_step)
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return session

    return update


def test_a_second_ctrl_c_then_run_again_in_the_same_process_resumes_exactly(tmp_path, reference):
    before = signal.getsignal(signal.SIGINT)
    session = crashkit.build(tmp_path.as_uri(), checkpoint_every_epochs=None, updates=[signal_self(11, 2)])
    with pytest.raises(Interrupted) as caught:
        session.run()
    assert caught.value.aborted and caught.value.signal == "SIGINT" and caught.value.session_id == session.id
    assert signal.getsignal(signal.SIGINT) is before
    assert session.state == "paused" and session.record["interrupted"] is True
    session.run()
    assert session.state == "complete" and same_weights(weights(session), reference)
    assert session.events("resume")[0]["restored_step"] == 9
    assert epochs_logged(session) == [1, 2, 3, 4]  # the aborted run's epoch 2 (step 10) is not logged twice


def test_ctrl_c_pauses_then_run_continues_and_a_users_own_handler_still_runs(tmp_path, reference):
    calls = []

    def users_handler(signum, frame):
        calls.append(signum)

    signal.signal(signal.SIGINT, users_handler)
    session = crashkit.build(tmp_path.as_uri(), updates=[signal_self(7, 1)])
    with pytest.raises(Interrupted, match=rf"session {session.id!r} paused by SIGINT at step 7") as caught:
        session.run()
    assert not caught.value.aborted
    assert calls == [signal.SIGINT]
    assert session.state == "paused" and session.record["pause_reason"] == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is users_handler
    session.run()
    assert session.state == "complete" and same_weights(weights(session), reference)


def test_a_users_handler_that_exits_stops_the_run_at_once_with_a_resumable_record(tmp_path, reference):
    def exit_on_sigterm(signum, frame):
        sys.exit(143)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    session = crashkit.build(tmp_path.as_uri(), updates=[signal_self(8, 1, signal.SIGTERM)])
    with pytest.raises(SystemExit):
        session.run()
    record = session.record
    assert record["state"] == "paused" and record["interrupted"] is True
    assert record["pause_reason"] == "aborted by SystemExit at step 8"
    session.run()
    assert session.state == "complete" and same_weights(weights(session), reference)


def test_ctrl_c_while_a_loader_is_being_made_pauses_after_the_next_step_not_at_the_epoch_end(tmp_path):
    class SignalWhileMaking(DatasetProvider):
        def get_dataloader(self, request):
            os.kill(os.getpid(), signal.SIGINT)  # e.g. while the loader's workers start
            return super().get_dataloader(request)

    inner = provider()
    data = SignalWhileMaking(inner.datasets, default={"batch_size": 16, "shuffle": True, "seed": 0})
    session = crashkit.build(tmp_path.as_uri(), data=data)
    with pytest.raises(Interrupted):
        session.run()
    assert session.state == "paused" and session.step == 1


def test_handlers_are_installed_only_while_run_runs_and_restored_after_a_failure(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    during = {}

    def look_then_fail(session):
        during.update({s: signal.getsignal(s) for s in before})
        raise ValueError("a bug in an update")

    session = crashkit.build(tmp_path.as_uri(), updates=[look_then_fail])
    with pytest.raises(ValueError):
        session.run()
    assert all(during[s] is not before[s] for s in before)
    assert {s: signal.getsignal(s) for s in before} == before
    assert session.state == "failed"


def test_run_in_another_thread_installs_no_handler(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    during, done = [], []

    def look(session):
        during.append({s: signal.getsignal(s) for s in before})
        return session

    session = crashkit.build(tmp_path.as_uri(), updates=[look])
    thread = threading.Thread(target=lambda: done.append(session.run().state))
    thread.start()
    thread.join(120)
    assert done == ["complete"] and all(seen == before for seen in during)


def test_an_ignored_signal_stays_ignored(tmp_path):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    session = crashkit.build(tmp_path.as_uri(), updates=[signal_self(7, 2)])
    session.run()
    assert session.state == "complete"
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_keyboard_interrupt_from_a_step_leaves_a_resumable_record_not_failed(tmp_path, reference):
    raised = []

    def interrupt(session):
        if session.event == "step" and session.step == 8 and not raised:
            raised.append(8)
            raise KeyboardInterrupt
        return session

    session = crashkit.build(tmp_path.as_uri(), updates=[interrupt])
    with pytest.raises(KeyboardInterrupt):
        session.run()
    record = session.record
    assert record["state"] == "paused" and record["interrupted"] and record["error"] is None
    assert record["pause_reason"] == "aborted by KeyboardInterrupt at step 8"
    session.run()
    assert session.state == "complete" and same_weights(weights(session), reference)
