"""The ``ptutils`` command, driven as a user drives it: the real console script (or ``python -m ptutils``) in a
subprocess, against real databases (filesystem, SQLite, PostgreSQL)."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ptutils import open_db, session_record, sessions
from ptutils.checkpoint import CheckpointStore
from ptutils.errors import SessionNotFound
from ptutils.session import Session

from .support import services
from .support.clikit import write_config

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("ptutils")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "ptutils"]
"""The installed console script when there is one, else the module (the same ``main()``)."""
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
ENV.pop("PTUTILS_DB", None)


def cli(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run ``ptutils ARGS`` to the end; stdout/stderr captured as text."""
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=kwargs.pop(
        "cwd", ROOT), stdin=subprocess.DEVNULL, **kwargs)


def start(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=cwd, stdin=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def state_of(url: str, session_id: str) -> str | None:
    try:
        return session_record(url, session_id).state
    except SessionNotFound:
        return None


@pytest.fixture(params=["fs", "sqlite", "postgres"])
def cli_db(request, tmp_path_factory) -> str:
    """A fresh, empty database of each backend the command is tested on."""
    with services.provision(request.param, tmp_path_factory) as url:
        yield url


def test_a_session_is_listed_paused_resumed_stopped_and_deleted_from_the_command_line(cli_db, tmp_path):
    brake = tmp_path / "brake"
    brake.touch()
    config = write_config(tmp_path / "slow.toml", name="slow", epochs=80, sleep=0.25, brake=brake)
    runner = start("--db", cli_db, "run", str(config), "--id", "live")
    try:
        wait_for(lambda: state_of(cli_db, "live") == "running" and session_record(cli_db, "live").step >= 1,
                 what="the session to run")
        with ThreadPoolExecutor(3) as pool:  # while it runs in the other process
            listed = pool.submit(cli, "--db", cli_db, "ls", "--json", "--state", "running")
            refused = pool.submit(cli, "--db", cli_db, "delete", "live", "--yes")
        doc = json.loads(ok(listed.result()))
        assert [s["id"] for s in doc["sessions"]] == ["live"] and doc["counts"] == {"running": 1}
        assert doc["sessions"][0]["state"] == "running" and doc["sessions"][0]["stage"] == "train"
        bad = refused.result()
        assert bad.returncode == 1 and "is running in process" in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1

        out = ok(cli("--db", cli_db, "pause", "live", "--reason", "lunch", "--wait", "30"))
        assert out.startswith("live paused")
        finished = runner.communicate(timeout=30)[0]
        assert runner.returncode == 0 and "live paused" in finished
    finally:
        if runner.poll() is None:
            runner.kill()
    shown = ok(cli("--db", cli_db, "show", "live"))
    for section in ("Session live (slow)", "Attempts", "Metrics", "Checkpoints", "Config", "Metadata", "Run"):
        assert section in shown
    assert "paused" in shown and "lunch" in shown and "pause" in shown  # the state, its reason, the pause checkpoint

    resumer = start("--db", cli_db, "resume", "live")  # still slow: stopped while it runs again
    try:
        wait_for(lambda: state_of(cli_db, "live") == "running", what="the resumed session to run")
        out = ok(cli("--db", cli_db, "stop", "live", "--wait", "30"))
        assert out.strip() == "live complete outcome=stopped"
        assert "live paused" in resumer.communicate(timeout=30)[0] and resumer.returncode == 0
    finally:
        if resumer.poll() is None:
            resumer.kill()
    view = session_record(cli_db, "live")
    assert (view.state, view.outcome) == ("complete", "stopped")

    with open_db(cli_db) as db:
        checkpoints = CheckpointStore(db, "live").records()
        assert checkpoints
        out = ok(cli("--db", cli_db, "delete", "live", "--yes"))
        assert out.startswith(f"deleted live: {len(checkpoints)} checkpoints")
        assert not db.collection("sessions").load({"_id": "live"})
        assert not db.collection("events").load({"session_id": "live"})
        assert CheckpointStore(db, "live").records() == []
        blobs = db.collection("checkpoints")
        for record in checkpoints:
            if not record.get("cloned_from"):
                with pytest.raises(Exception):
                    blobs.get_blob(record["blob"])


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> str:
    """An SQLite database holding a finished session, a tuning-like parent with two children and a failed one."""
    root = tmp_path_factory.mktemp("stored")
    url = f"sqlite:///{root / 'runs.db'}"
    config = write_config(root / "fast.toml", name="fast", epochs=2)
    from ptutils import Config

    cfg = Config.from_toml(config)
    Session.from_config(cfg, db=url, session_id="done").run().close()
    parent = Session(None, stages=("tune",), db=url, name="sweep", session_id="sweep")
    for i, lr in enumerate((0.1, 0.3)):
        child = Session.from_config(cfg.with_overrides({"model.optimizer.lr": lr, "name": f"lr{lr}"}), db=url,
                                    session_id=f"sweep-c{i}", parent=parent)
        child.run().close()
    parent.close()
    broken = Session.from_config(cfg.with_overrides({"name": "broken"}), db=url, session_id="broken")
    broken.start()
    try:
        raise RuntimeError("exploded at step 0")
    except RuntimeError as exc:
        broken.fail(exc)
    broken.close()
    return url


def test_ls_filters_trees_limits_and_json(stored):
    with ThreadPoolExecutor(6) as pool:
        runs = {k: pool.submit(cli, "--db", stored, *args) for k, args in {
            "all": ("ls", "--metric", "train_loss"),
            "json": ("ls", "--json", "--metric", "train_loss"),
            "name": ("ls", "--json", "--name", "lr*"),
            "failed": ("ls", "--json", "--state", "failed", "--since", "1h"),
            "limit": ("ls", "--limit", "2"),
            "future": ("ls", "--json", "--since", "2999-01-01"),
        }.items()}
    table = ok(runs["all"].result())
    lines = table.splitlines()
    assert lines[0].startswith("Sessions: ") and "1 failed" in lines[0] and "3 complete" in lines[0]
    assert "BEST train_loss" in lines[1] and "LAST train_loss" in lines[1] and "PARENT" in lines[1]
    sweep = next(i for i, line in enumerate(lines) if line.startswith("sweep "))
    assert all(lines[sweep + k].startswith("└ sweep-c") for k in (1, 2))  # children indented under their parent
    doc = json.loads(ok(runs["json"].result()))
    assert doc["total"] == 5 and doc["more"] == 0
    by_id = {s["id"]: s for s in doc["sessions"]}
    assert by_id["sweep-c0"]["depth"] == 1 and by_id["sweep-c0"]["parent_id"] == "sweep"
    assert by_id["done"]["metric"]["best"] is not None and by_id["done"]["stage_total"] == 8
    assert {s["id"] for s in json.loads(ok(runs["name"].result()))["sessions"]} == {"sweep-c0", "sweep-c1"}
    assert [s["id"] for s in json.loads(ok(runs["failed"].result()))["sessions"]] == ["broken"]
    limited = ok(runs["limit"].result())
    assert "… and 3 more" in limited
    assert json.loads(ok(runs["future"].result()))["total"] == 0


def test_show_metrics_and_graph(stored, tmp_path):
    with ThreadPoolExecutor(6) as pool:
        runs = {k: pool.submit(cli, "--db", stored, *args) for k, args in {
            "show": ("show", "done"),
            "json": ("show", "done", "--json"),
            "failed": ("show", "broken"),
            "csv": ("metrics", "done", "--export", "csv"),
            "graph": ("graph", "done"),
        }.items()}
    shown = ok(runs["show"].result())
    for section in ("Session done (fast)", "Attempts", "Metrics", "Checkpoints", "Config", "Metadata", "Run"):
        assert section in shown
    assert "train_loss" in shown and "model.optimizer.lr" in shown and "initial" in shown
    import torch

    assert f"/ {torch.__version__} /" in shown and "(pid " in shown  # the run metadata: what produced it
    doc = json.loads(ok(runs["json"].result()))
    assert doc["record"]["_id"] == "done" and doc["session"]["state"] == "complete"
    assert doc["checkpoints"] and doc["metric_history"]["train_loss"]
    failed = ok(runs["failed"].result())
    assert "Error" in failed and "RuntimeError: exploded at step 0" in failed and "Traceback" in failed
    rows = list(csv.DictReader(io.StringIO(ok(runs["csv"].result()))))
    assert rows and set(rows[0]) == {"metric", "step", "value", "stage", "epoch"}
    assert [float(r["value"]) for r in rows if r["metric"] == "train_loss"] == [
        p["value"] for p in doc["metric_history"]["train_loss"]]
    assert ok(runs["graph"].result()).startswith("---") or "stateDiagram-v2" in runs["graph"].result().stdout


def test_run_with_overrides_and_graph_of_a_config(tmp_path):
    url = (tmp_path / "db").as_uri()
    config = write_config(tmp_path / "exp.toml", name="exp", epochs=1)
    with ThreadPoolExecutor(2) as pool:
        ran = pool.submit(cli, "--db", url, "run", str(config), "--id", "r1", "--set", "model.optimizer.lr=0.05",
                          "--set", "name=tuned")
        drawn = pool.submit(cli, "graph", str(config))
    assert ok(ran.result()).strip() == "r1 complete step=4 outcome=success"
    view = session_record(url, "r1")
    assert view.name == "tuned" and view.record["config"]["model"]["optimizer"]["lr"] == 0.05
    assert "stateDiagram-v2" in ok(drawn.result())


def test_every_bad_input_gives_one_line_and_its_exit_code(stored, tmp_path):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("name = \n")
    good = write_config(tmp_path / "good.toml")
    cases = {
        "unknown id": ((("--db", stored, "show", "nosuch")), 2, "no session with id 'nosuch'"),
        "close id": ((("--db", stored, "pause", "dnoe")), 2, "did you mean 'done'"),
        "bad url": ((("--db", "nonsense", "ls")), 3, "not a database URL"),
        "unknown scheme": ((("--db", "foo://x", "ls")), 3, "no backend for URL scheme 'foo'"),
        "unreachable": ((("--db", "postgresql://127.0.0.1:1/test", "ls")), 3, "Connection refused"),
        "missing driver": ((("--db", "postgresql+pg8000://127.0.0.1/test", "ls")), 3, "driver for this URL is not installed"),
        "bad toml": ((("--db", stored, "run", str(bad_toml))), 1, "invalid TOML"),
        "bad override": ((("--db", stored, "run", str(good), "--set", "model.nosuch.x=1")), 1, "model.nosuch"),
        "bad state": ((("--db", stored, "ls", "--state", "bogus")), 1, "unknown session state 'bogus'"),
        "bad since": ((("--db", stored, "ls", "--since", "yesterday")), 1, "--since 'yesterday'"),
        "bad option": ((("--db", stored, "ls", "--bogus")), 1, "No such option"),
        "not paused": ((("--db", stored, "pause", "done")), 1, "not running"),
        "unconfirmed delete": ((("--db", stored, "delete", "done")), 1, "--yes"),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        results = {k: pool.submit(cli, *args) for k, (args, _, _) in cases.items()}
    for what, (_args, code, text) in cases.items():
        r = results[what].result()
        assert r.returncode == code, f"{what}: rc={r.returncode} stderr={r.stderr}"
        assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, what
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ptutils: error: ") and text in lines[0], (what, r.stderr)
    assert session_record(stored, "done").state == "complete"  # the refused delete deleted nothing
    debug = cli("--db", stored, "--debug", "show", "nosuch")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_ls_renders_a_rich_table_in_a_terminal(stored):
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command in a terminal 150 columns wide
        os.environ.update(ENV, COLUMNS="150", LINES="40", TERM="xterm-256color")
        os.environ.pop("NO_COLOR", None)
        os.execvp(COMMAND[0], [*COMMAND, "--db", stored, "ls"])
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    _, status = os.waitpid(pid, 0)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, screen
    assert "╭" in screen and "│" in screen and "╰" in screen  # rich's rounded box
    assert "\x1b[" in screen  # styled (coloured by state)
    assert "sweep-c0" in screen and "Sessions:" in screen
