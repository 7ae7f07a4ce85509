"""Every example runs, as a user would run it, on small generated data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = proc.stdout.index("{")
    return json.loads(proc.stdout[start : proc.stdout.rindex("}") + 1])


def test_demo_trains_then_tests_and_persists_to_the_filesystem(tmp_path):
    summary = summary_of(run_example("demo.py", "--out", str(tmp_path), "--epochs", "3", "--quiet"))
    assert summary["state"] == "complete" and summary["outcome"] == "success"
    assert [s.split(" ")[0] for s in summary["stages"]] == ["train", "test"]
    assert summary["metrics"]["test_accuracy"] > 0.5
    assert (tmp_path / "db" / "sessions").is_dir()


def test_demo_pauses_on_ctrl_c_and_resumes_to_the_same_result(tmp_path):
    from ptutils import open_db

    reference = summary_of(run_example("demo.py", "--out", str(tmp_path / "ref"), "--epochs", "6", "--quiet"))
    out = tmp_path / "run"
    # A handler here gives the child SIGINT's default, as from a terminal (a background job starts with it ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(out), "--epochs", "6", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    sessions = out / "db" / "sessions"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        records = [r for r in open_db(out.joinpath("db").resolve().as_uri()).collection("sessions").load()] if sessions.is_dir() else []
        if records and records[0]["state"] == "running" and records[0]["step"] >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    paused = json.loads(stdout[stdout.index("{") : stdout.rindex("}") + 1])
    assert paused["state"] == "paused" and 0 < paused["steps"] < reference["steps"]
    assert f"session {paused['session']!r} paused by SIGINT" in stderr
    assert "--resume " + paused["session"] in stdout
    resumed = summary_of(run_example("demo.py", "--out", str(out), "--epochs", "6", "--quiet", "--resume", paused["session"]))
    assert resumed["state"] == "complete"
    assert resumed["steps"] == reference["steps"] and resumed["metrics"] == reference["metrics"]


@pytest.mark.slow  # two tunings of 4 children x 40 epochs on the pool: ~20 s idle, ~50 s on a loaded machine
def test_pbt_tuning_beats_random_search_with_the_same_start_and_compute(tmp_path):
    summary = summary_of(run_example("pbt_tuning.py", "--out", str(tmp_path), "--quiet"))
    pbt, random = summary["pbt"], summary["random"]
    assert summary["pbt_best_test_accuracy"] > summary["random_median_test_accuracy"]
    for arm in (pbt, random):
        assert len(arm["children"]) == 4
        assert all(c["state"] == "complete" and c["steps"] == 40 * 16 for c in arm["children"])
    assert pbt["exploits"] >= 1 and random["exploits"] == 0
    assert [c["initial"] for c in pbt["children"]] == [c["initial"] for c in random["children"]] == summary["initial"]
