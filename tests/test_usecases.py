"""The use-case examples (multistage, exploding gradients, pause/resume) run as a user runs them.

Each example is a subprocess on small generated data; the tests assert outcomes
read from the JSON summary it prints (taken from the session's record and
events), never timings.  The exploding-gradients example runs once on every
selected backend (``--backends``), by changing only ``--db``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptutils import open_db
from ptutils.errors import NotFoundError

ROOT = Path(__file__).resolve().parent.parent


def example(name: str, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``examples/<name>`` with ``args`` and wait for it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *map(str, args)],
        check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def json_in(stdout: str) -> dict:
    """The JSON object a script printed (its summary), ignoring lines around it."""
    return json.loads(stdout[stdout.index("{") : stdout.rindex("}") + 1])


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json_in(proc.stdout)


# ---------------------------------------------------------------------- multistage
def test_multistage_trains_until_overfitting_tests_then_finetunes_on_the_jpeg_folder(tmp_path):
    summary = summary_of(example("multistage.py", "--out", tmp_path))

    assert summary["state"] == "complete" and summary["outcome"] == "success"
    stages = [(s["from"], s["stage"], s["trigger"]) for s in summary["stages"]]
    assert stages == [(None, "train", "start"), ("train", "test", "overfit"), ("test", "finetune", "stage_done")]
    # The overfitting monitor fired exactly when training left the train stage.
    (fired,) = summary["monitor"]
    assert fired["gap"] > 0.25 and fired["step"] == summary["stages"][1]["step"]
    metrics = summary["metrics"]
    assert metrics["val_error"] - metrics["train_error"] > 0.25
    assert metrics["test_error"] < 0.6
    # The finetune stage trained a new 4-class head on the JPEGs (chance error: 0.75).
    assert metrics["task_val_error"] < 0.5
    assert summary["steps"] > summary["stages"][2]["step"]
    assert sorted(p.name for p in (tmp_path / "task" / "train").iterdir()) == [f"class_{k}" for k in range(4)]
    assert any((tmp_path / "task" / "train" / "class_0").glob("*.jpg"))

    record = open_db((tmp_path / "db").as_uri()).collection("sessions").load_from_id(summary["session"])
    assert [h["stage"] for h in record["stage_history"]] == ["train", "test", "finetune"]
    assert record["stage"] == "finetune" and record["progress"] == 1.0


def test_multistage_completes_after_test_when_the_test_error_is_unsatisfactory(tmp_path):
    summary = summary_of(example("multistage.py", "--out", tmp_path, "--epochs", "2", "--test-threshold", "0"))

    assert summary["state"] == "complete" and summary["outcome"] == "success"
    stages = [(s["from"], s["stage"], s["trigger"]) for s in summary["stages"]]
    # Two epochs are too few to overfit: the budget ends training, and no test error is below 0.
    assert stages == [(None, "train", "start"), ("train", "test", "stage_done")]
    assert summary["monitor"] == []
    assert "test_error" in summary["metrics"] and not any(k.startswith("task_") for k in summary["metrics"])


# ---------------------------------------------------------------------- exploding gradients
def test_exploding_gradients_restore_the_last_checkpoint_and_lower_the_lr(db_url, tmp_path):
    summary = summary_of(example("exploding_gradients.py", "--db", db_url, "--out", tmp_path))

    assert summary["state"] == "complete" and summary["outcome"] == "success"
    (exploded,) = summary["exploded"]
    assert exploded["grad_norm"] >= 30
    (restore,) = summary["restores"]
    # The most recent checkpoint before the explosion (one every 5 steps).
    assert restore["to_step"] == exploded["step"] // 5 * 5 and restore["to_step"] > 0
    assert summary["remedies"] == ["lower_lr(x0.1) -> lr=0.0075"]
    assert summary["final_lr"] == pytest.approx(0.0075) and summary["grad_clip"] is None
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] < summary["first_loss"] / 100


def test_exploding_gradients_apply_the_remedies_in_the_order_given(tmp_path):
    summary = summary_of(example("exploding_gradients.py", "--out", tmp_path, "--remedies", "clip:1.0,lower_lr:0.1"))

    assert summary["state"] == "complete"
    assert len(summary["restores"]) == 1
    assert summary["remedies"] == ["clip_gradients(1.0)"]
    assert summary["grad_clip"] == 1.0 and summary["final_lr"] == pytest.approx(0.075)
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] < summary["first_loss"]


def test_exploding_gradients_fail_the_session_when_the_remedies_run_out(tmp_path):
    proc = example("exploding_gradients.py", "--out", tmp_path, "--remedies", "lower_lr:0.95")

    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "failed: still diverging" in proc.stdout
    summary = json_in(proc.stdout)
    assert summary["state"] == "failed" and summary["outcome"] == "failure"
    assert len(summary["exploded"]) == 2 and len(summary["restores"]) == 1
    assert summary["remedies"] == ["lower_lr(x0.95) -> lr=0.07125"]
    record = open_db((tmp_path / "db").as_uri()).collection("sessions").load_from_id(summary["session"])
    assert record["error"]["type"] == "FloatingPointError"


# ---------------------------------------------------------------------- pause and resume
def _wait_until_running(db_dir: Path, session_id: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if db_dir.is_dir():
            try:
                record = open_db(db_dir.as_uri()).collection("sessions").load_from_id(session_id)
            except NotFoundError:
                record = None
            if record is not None and record["state"] == "running" and record["step"] >= 1:
                return record
        time.sleep(0.05)
    raise AssertionError(f"session {session_id} did not start running within {timeout}s")


def _start(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "pause_resume.py"), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def test_pause_from_another_process_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    out = tmp_path / "run"
    # The uninterrupted reference runs alongside (at full speed); the other run sleeps 0.2 s a step.
    reference_proc = _start("run", "--id", "reference", "--out", tmp_path / "ref", "--step-delay", "0")
    proc = _start("run", "--id", "exp", "--out", out, "--step-delay", "0.2")
    try:
        running = _wait_until_running(out / "db", "exp", proc)
        assert 0 < running["progress"] < 1
        pause = example("pause_resume.py", "pause", "--id", "exp", "--out", out)
        assert pause.returncode == 0, pause.stderr[-3000:]
        stdout = _finish(proc)
    finally:
        reference = json_in(_finish(reference_proc))
    assert reference["state"] == "complete" and not reference["resumed"]
    paused = json_in(stdout)
    assert paused["state"] == "paused" and paused["pause_reason"] == "requested from the command line"
    assert running["step"] <= paused["step"] < reference["step"]
    assert f"run --id exp --db {(out / 'db').resolve().as_uri()}" in stdout

    status = summary_of(example("pause_resume.py", "status", "--id", "exp", "--out", out))
    assert status["state"] == "paused" and status["step"] == paused["step"] and status["eta_seconds"] is None
    assert status["last_checkpoint_step"] == paused["step"]  # the pause checkpoint, where the resume starts
    again = example("pause_resume.py", "pause", "--id", "exp", "--out", out)
    assert again.returncode == 1 and "is paused, not running" in again.stderr

    resumed = summary_of(example("pause_resume.py", "run", "--id", "exp", "--out", out, "--step-delay", "0"))
    assert resumed["state"] == "complete" and resumed["resumed"]
    assert resumed["step"] == reference["step"]
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["metrics"] == reference["metrics"]
