"""Reliability: SIGKILL at random points, database outages and disk trouble, with nothing lost.

Each test injects a fault into a real training session (in a child process
where the fault kills it), then checks what a user relies on: the status
record tells the truth, every checkpoint record points to a readable
checkpoint, resuming ends with weights bitwise-identical to an uninterrupted
run, and no epoch's metrics are missing.  Results feed the reliability table
printed at the end of the run (tests/support/faults.py).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ptutils import open_db
from ptutils.checkpoint import CheckpointStore
from ptutils.errors import CorruptionError
from ptutils.status import StatusWriter, describe

from .support import crashkit, services
from .support.services import free_port, unavailable
from .support.sessionkit import model, same_weights, weights

ROOT = Path(__file__).resolve().parent.parent
TOTAL_STEPS = crashkit.STEPS_PER_EPOCH * crashkit.EPOCHS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights of the uninterrupted run."""
    s = crashkit.build(tmp_path_factory.mktemp("reference").as_uri()).run()
    assert s.state == "complete" and s.step == TOTAL_STEPS
    return weights(s)


def run_child(url: str, session_id: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.support.crashkit", url, session_id, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def unreadable_checkpoints(url: str, session_id: str) -> int:
    """Checkpoint records whose blob is missing, torn or corrupt."""
    store = CheckpointStore(open_db(url), session_id)
    bad = 0
    for record in store.records():
        try:
            store.read(record)
        except CorruptionError:
            bad += 1
    return bad


def missing_epochs(session) -> int:
    """Epochs of the run with no 'epoch' event (metric history lost)."""
    done = {e["stage_epoch"] for e in session.events("epoch")}
    return len(set(range(1, crashkit.EPOCHS + 1)) - done)


def repeated_epochs(session) -> int:
    """'epoch' events beyond one per epoch (the abandoned steps' history, logged again after a resume)."""
    epochs = [e["stage_epoch"] for e in session.events("epoch")]
    return len(epochs) - len(set(epochs))


def resume_and_check(url: str, session_id: str, reference) -> tuple[bool, int]:
    """Take the crashed session over in this process and finish it; (exact?, epochs lost)."""
    record = open_db(url).collection("sessions").load_from_id(session_id)
    torch.manual_seed(4321)
    resumed = crashkit.build(url, session_id=session_id)
    if record["state"] == "pending":  # killed before its start was recorded: nothing ran yet
        assert resumed.state == "pending" and record["step"] == 0
    else:
        assert record["state"] == "running" and describe(record) == "interrupted"
        resumed.model.load_state_dict(model(seed=77, dropout=0.3).state_dict())  # the checkpoint must win
        assert resumed.state == "paused" and resumed.record["interrupted"] is True
    resumed.run()
    assert resumed.state == "complete" and resumed.step == TOTAL_STEPS
    assert repeated_epochs(resumed) == 0, [(e["stage_epoch"], e["_id"]) for e in resumed.events("epoch")]
    return same_weights(weights(resumed), reference), missing_epochs(resumed)


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_at_a_random_step_then_resume_is_exact(tmp_path, reference, faults, seed):
    kill_at = random.Random(seed).randint(1, TOTAL_STEPS - 1)
    url = tmp_path.as_uri()
    proc = run_child(url, "victim", "--kill-at-step", str(kill_at))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    bad = unreadable_checkpoints(url, "victim")
    exact, lost = resume_and_check(url, "victim", reference)
    faults.record("crash: SIGKILL at a random step", injected=1, survived=int(exact and bad == 0), lost=lost)
    assert bad == 0 and exact and lost == 0


def test_sigkill_after_an_epoch_was_logged_but_before_its_checkpoint_repeats_no_epoch(tmp_path, reference, faults):
    url = tmp_path.as_uri()
    # Checkpoints at steps 9 and 12 only, epoch 2 ends at step 10; its event is stored (as a
    # heartbeat would) before the kill at step 11.
    proc = run_child(url, "victim", "--kill-at-step", "11", "--store-events-first", "--no-epoch-checkpoints")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stored = StatusWriter(open_db(url), "victim").load_events("epoch")
    assert [e["stage_epoch"] for e in stored] == [1, 2]  # epoch 2 is past the checkpoint the resume starts from
    exact, lost = resume_and_check(url, "victim", reference)  # which checks each epoch is logged once
    faults.record("crash: SIGKILL between epoch and checkpoint", injected=1, survived=int(exact), lost=lost)
    assert exact and lost == 0


@pytest.mark.parametrize("nth", [2, 4])
def test_sigkill_in_the_middle_of_a_checkpoint_write(tmp_path, reference, faults, nth):
    url = tmp_path.as_uri()
    proc = run_child(url, "victim", "--kill-in-checkpoint-write", str(nth))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    bad = unreadable_checkpoints(url, "victim")
    exact, lost = resume_and_check(url, "victim", reference)
    faults.record("crash: SIGKILL during a checkpoint write", injected=1, survived=int(exact and bad == 0), lost=lost)
    assert bad == 0 and exact and lost == 0


def test_sigkill_while_writing_the_initial_checkpoint_leaves_an_honest_pending(tmp_path, reference, faults):
    url = tmp_path.as_uri()
    proc = run_child(url, "victim", "--kill-in-checkpoint-write", "1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    record = open_db(url).collection("sessions").load_from_id("victim")
    again = crashkit.build(url, session_id="victim")
    assert record["state"] == "pending" and again.state == "pending"
    again.run()
    exact = again.state == "complete" and same_weights(weights(again), reference)
    faults.record("crash: SIGKILL during the initial checkpoint", injected=1, survived=int(exact), lost=missing_epochs(again))
    assert exact and missing_epochs(again) == 0


@pytest.mark.parametrize("nth", [2, 9])
def test_sigkill_in_the_middle_of_a_status_write(tmp_path, reference, faults, nth):
    url = tmp_path.as_uri()
    # A step takes 20 ms so that heartbeats (and so status writes) happen at every step.
    proc = run_child(url, "victim", "--kill-in-status-write", str(nth), "--step-sleep", "0.02")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    record = open_db(url).collection("sessions").load_from_id("victim")  # the previous version, whole
    bad = unreadable_checkpoints(url, "victim")
    exact, lost = resume_and_check(url, "victim", reference)
    faults.record("crash: SIGKILL during a status write", injected=1, survived=int(exact and bad == 0), lost=lost)
    assert record["_id"] == "victim" and bad == 0 and exact and lost == 0


# --------------------------------------------------------------------------- outages
def _terminate_backends(admin_url: str, database: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        killed = conn.execute(
            sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"),
            {"db": database},
        ).scalar()
    engine.dispose()
    return int(killed or 0)


@pytest.fixture
def postgres_url(tmp_path_factory):
    with services.provision("postgres", tmp_path_factory) as url:
        yield url


def test_postgres_connections_terminated_mid_run(postgres_url, reference, faults):
    import sqlalchemy as sa

    db_url = postgres_url
    url = sa.engine.make_url(db_url)
    admin = url.set(database="postgres").render_as_string(hide_password=False)
    killed = []

    def terminate(session):
        if session.event == "step" and session.step in (4, 9, 15):
            session.drain()
            killed.append(_terminate_backends(admin, url.database))
        return session

    s = crashkit.build(db_url, session_id=f"pg-{os.getpid()}-{time.monotonic_ns()}", updates=[terminate]).run()
    assert sum(killed) >= 3  # the session's pooled connections really were cut
    lost = missing_epochs(s)
    exact = same_weights(weights(s), reference)
    faults.record("outage: pg_terminate_backend mid-run", injected=len(killed), survived=len(killed) * int(exact), lost=lost)
    assert s.state == "complete" and exact and lost == 0
    assert s.record["step"] == TOTAL_STEPS


class MongoWire:
    """A secantus MongoDB-wire server this test can kill and restart on the same port and data."""

    def __init__(self, storage: Path):
        self.port = free_port()
        self.storage = storage
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/reliability/docs?serverSelectionTimeoutMS=1000"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "secantus", "--port", str(self.port), "--storage-path", str(self.storage)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        unavailable("mongo", "the secantus server did not start listening")

    def kill(self) -> None:
        """Stop the server abruptly for its clients (SIGTERM: it may persist what it acknowledged).

        A SIGKILL would also test the server's own durability: secantus can lose
        writes it has acknowledged, which is not what this suite is about.
        """
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


@pytest.fixture
def mongo_server(tmp_path):
    import importlib.util

    if importlib.util.find_spec("secantus") is None:
        unavailable("mongo", "the secantusdb package is not installed")
    server = MongoWire(tmp_path / "mongo-data")
    server.start()
    yield server
    server.kill()


def test_mongo_server_killed_and_restarted_mid_run(mongo_server, reference, faults):
    outages = []

    def outage(session):
        if session.event == "step" and session.step in (6, 13):
            session.drain()
            mongo_server.kill()
            time.sleep(0.5)
            mongo_server.start()
            outages.append(session.step)
        return session

    s = crashkit.build(mongo_server.url, session_id="mongo-victim", updates=[outage]).run()
    lost = missing_epochs(s)
    exact = same_weights(weights(s), reference)
    faults.record("outage: MongoDB-wire server killed + restarted", injected=len(outages),
                  survived=len(outages) * int(exact and s.state == "complete"), lost=lost)
    assert s.state == "complete" and exact and lost == 0


class _RestartWhenPausing(logging.Handler):
    """Bring the database back only once the session has decided to pause (it says so in its log)."""

    def __init__(self, server: MongoWire):
        super().__init__()
        self.server = server
        self.restarter: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if "pausing: storage outage" in record.getMessage() and self.restarter is None:
            self.restarter = threading.Thread(target=self._restart)
            self.restarter.start()

    def _restart(self) -> None:
        time.sleep(1.0)  # the pause write has to wait for the database for a while
        self.server.start()


def test_long_outage_pauses_with_the_error_recorded(mongo_server, faults):
    watcher = _RestartWhenPausing(mongo_server)
    logging.getLogger("ptutils").addHandler(watcher)
    killed = []

    def outage(session):
        if session.event == "step" and session.step == 5 and not killed:
            session.drain()
            mongo_server.kill()
            killed.append(time.monotonic())
        if killed and watcher.restarter is None:
            time.sleep(0.2)  # training goes on (slowly) while the database is away
        return session

    s = crashkit.build(mongo_server.url, session_id="long-outage", updates=[outage],
                       stages=[{"name": "train", "data": "train", "max_epochs": 100}],
                       outage_pause_after=1.0, outage_wait=60.0)
    try:
        s.run()
    finally:
        logging.getLogger("ptutils").removeHandler(watcher)
        if watcher.restarter is not None:
            watcher.restarter.join()
        else:
            mongo_server.start()
    record = s.record
    paused = s.state == "paused" and record["state"] == "paused"
    faults.record("outage: long outage -> paused", injected=1, survived=int(paused), lost=0)
    assert paused, (s.state, record["state"])
    assert record["pause_reason"].startswith("storage outage") and record["error"]["type"] == "BackendUnavailableError"
    assert s.step < 500
    s.run()  # and it carries on once the database is back
    assert s.state == "complete" and s.record["error"] is None
    done = {e["stage_epoch"] for e in s.events("epoch")}
    assert done == set(range(1, 101))


# --------------------------------------------------------------------------- disk trouble
@pytest.fixture
def tiny_fs(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the no-space test: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_nearly_full_fails_clearly_and_keeps_the_previous_checkpoint(tiny_fs, faults):
    url = tiny_fs.as_uri()
    # 32 KiB stay free: enough for the small status and event records, not for a checkpoint
    # (padded to 64 KiB, so that the margin does not hang on the checkpoint format's size).
    free = 32768
    proc = run_child(url, "full", "--disk-full-at-step", "7", str(tiny_fs), "--leave-free", str(free),
                     "--checkpoint-padding", "65536")
    assert all(blob.stat().st_size > 2 * free for blob in (tiny_fs / "checkpoints" / "blobs").glob("*.blob"))
    record = open_db(url).collection("sessions").load_from_id("full")
    bad = unreadable_checkpoints(url, "full")
    latest = CheckpointStore(open_db(url), "full").load_latest()
    ok = (proc.returncode != 0 and record["state"] == "failed" and "ENOSPC" in record["error"]["message"]
          and bad == 0 and latest is not None and latest[1]["step"] <= 7)
    faults.record("disk: no space left (nearly full)", injected=1, survived=int(ok), lost=0)
    assert proc.returncode != 0 and "No space left" in proc.stderr
    assert record["state"] == "failed" and "ENOSPC" in record["error"]["message"], record["error"]
    assert "checkpoints/blobs" in record["error"]["message"]  # the error names the file
    assert bad == 0 and latest is not None and latest[1]["step"] <= 7


def test_disk_completely_full_is_resumable_once_space_is_freed(tiny_fs, reference, faults):
    url = tiny_fs.as_uri()
    proc = run_child(url, "full", "--disk-full-at-step", "7", str(tiny_fs))
    assert proc.returncode != 0 and "No space left" in proc.stderr
    (tiny_fs / "filler").unlink()  # the user frees space
    bad = unreadable_checkpoints(url, "full")
    # Not even the failure could be written: the record still says running, and shows interrupted.
    exact, lost = resume_and_check(url, "full", reference)
    faults.record("disk: no space left (completely full)", injected=1, survived=int(exact and bad == 0), lost=lost)
    assert bad == 0 and exact and lost == 0


def test_permission_denied_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path, faults):
    url = tmp_path.as_uri()
    os.chmod(tmp_path, 0o755)
    proc = run_child(url, "denied", "--drop-root-at-step", "5")
    record = open_db(url).collection("sessions").load_from_id("denied")
    bad = unreadable_checkpoints(url, "denied")
    latest = CheckpointStore(open_db(url), "denied").load_latest()
    # Nothing could be written after losing the rights: the record still says running, from the dead
    # process's point of view; what matters is a clear error and an intact previous checkpoint.
    ok = proc.returncode != 0 and "EACCES" in proc.stderr and bad == 0 and latest is not None
    faults.record("disk: permission denied", injected=1, survived=int(ok), lost=0)
    assert proc.returncode != 0 and "EACCES" in proc.stderr, proc.stderr[-2000:]
    assert record["state"] in ("running", "failed") and bad == 0 and latest is not None
    assert latest[1]["step"] <= 5
    shutil.rmtree(tmp_path, ignore_errors=True)
