"""Run metadata: what it holds, the git state of the user's code, and its place in the session's record."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from ptutils import metadata
from ptutils.metadata import code_dir, devices, git_state, process_token, run_metadata
from ptutils.update import every_n_steps

from .support.sessionkit import session

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")

GIT_KEYS = {"root", "commit", "branch", "dirty", "diff_sha256", "diff_bytes", "diff_truncated"}


@pytest.fixture(autouse=True)
def _no_repository_above(tmp_path, monkeypatch):
    """Git never looks above the test's directory, whichever repository the temporary directory sits in."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


def git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com",
                           "-c", "commit.gpgsign=false", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git repository with one commit of ``train.py``, on branch ``main``."""
    root = tmp_path / "code"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "checkout", "-q", "-b", "main")
    (root / "train.py").write_text("print('hello')\n")
    git(root, "add", "train.py")
    git(root, "commit", "-q", "-m", "first")
    return root


# ---------------------------------------------------------------------- the dict
def test_run_metadata_is_plain_json_with_versions_host_command_line_and_seed(tmp_path):
    meta = run_metadata(seed=7, cwd=str(tmp_path))
    assert json.loads(json.dumps(meta)) == meta  # plain JSON: storable on every backend as is
    assert set(meta) == {"host", "pid", "process", "user", "platform", "cpus", "cpus_usable", "python",
                         "executable", "versions", "cuda", "devices", "argv", "cwd", "env", "seed", "git"}
    assert meta["host"] == socket.gethostname() and meta["pid"] == os.getpid()
    assert meta["process"] == process_token() and isinstance(meta["process"], str)
    assert meta["seed"] == 7 and run_metadata(cwd=str(tmp_path))["seed"] is None
    assert meta["argv"] == sys.argv and meta["executable"] == sys.executable and meta["cwd"] == os.getcwd()
    assert isinstance(meta["cpus"], int) and meta["cpus"] >= meta["cpus_usable"] >= 1
    assert isinstance(meta["platform"], str) and meta["python"]["implementation"] == sys.implementation.name
    versions = meta["versions"]
    import numpy
    import transitions

    import ptutils

    assert versions["torch"] == torch.__version__ and versions["ptutils"] == ptutils.__version__
    assert versions["numpy"] == numpy.__version__ and versions["transitions"] == transitions.__version__
    assert versions["python"] == meta["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert all(isinstance(v, str) for v in versions.values())
    assert "no-such-package" not in versions  # only what is installed
    assert meta["cuda"] is None if not torch.version.cuda else meta["cuda"]["version"] == torch.version.cuda
    assert isinstance(meta["devices"], list) and isinstance(meta["env"], dict)
    assert meta["git"] is None  # tmp_path is no repository


def test_environment_variables_recorded_are_the_listed_ones_only(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    env = run_metadata(cwd=str(tmp_path))["env"]
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3" and env["SLURM_JOB_ID"] == "4242"
    assert "AWS_SECRET_ACCESS_KEY" not in env


def test_what_cannot_change_is_computed_once_but_git_is_read_each_time(repo, monkeypatch):
    run_metadata(cwd=str(repo))
    calls = []
    monkeypatch.setattr(metadata, "package_versions", lambda: calls.append(1) or {})
    assert run_metadata(cwd=str(repo))["versions"]["torch"] == torch.__version__ and calls == []
    (repo / "train.py").write_text("print('changed')\n")
    assert run_metadata(cwd=str(repo))["git"]["dirty"] is True


def test_a_forked_child_has_a_process_token_of_its_own():
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    mine = process_token()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its token, then leave without running pytest's exit handlers
        os.write(write, process_token().encode())
        os._exit(0)
    os.close(write)
    theirs = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert theirs and theirs != mine and process_token() == mine


# ---------------------------------------------------------------------- git
@needs_git
def test_git_state_of_a_clean_repository(repo):
    state = git_state(str(repo))
    assert set(state) == GIT_KEYS
    assert state["root"] == os.path.realpath(repo)
    assert state["commit"] == git(repo, "rev-parse", "HEAD") and len(state["commit"]) == 40
    assert state["branch"] == "main" and state["dirty"] is False
    assert state["diff_sha256"] is None and state["diff_bytes"] is None and state["diff_truncated"] is False
    (repo / "sub").mkdir()
    assert git_state(str(repo / "sub")) == state  # any folder of the repository


@needs_git
def test_a_dirty_repository_has_the_diff_hash_which_follows_the_changes(repo):
    (repo / "train.py").write_text("print('changed')\n")
    first = git_state(str(repo))
    assert first["dirty"] is True and len(first["diff_sha256"]) == 64 and first["diff_bytes"] > 0
    assert git_state(str(repo)) == first  # the same changes hash the same
    (repo / "train.py").write_text("print('changed again')\n")
    second = git_state(str(repo))
    assert second["dirty"] is True and second["diff_sha256"] != first["diff_sha256"]
    git(repo, "add", "train.py")
    assert git_state(str(repo))["diff_sha256"] == second["diff_sha256"]  # staged or not: the diff against HEAD
    git(repo, "commit", "-q", "-m", "second")
    clean = git_state(str(repo))
    assert clean["dirty"] is False and clean["diff_sha256"] is None
    assert clean["commit"] == git(repo, "rev-parse", "HEAD") != first["commit"]


@needs_git
def test_untracked_files_do_not_make_a_repository_dirty(repo):
    (repo / "outputs.log").write_text("loss 0.1\n")
    assert git_state(str(repo))["dirty"] is False


@needs_git
def test_the_diff_hash_ignores_the_users_diff_settings(repo):
    (repo / "train.py").write_text("print('changed')\n")
    plain = git_state(str(repo))["diff_sha256"]
    git(repo, "config", "diff.noprefix", "true")
    git(repo, "config", "color.diff", "always")
    assert git_state(str(repo))["diff_sha256"] == plain


@needs_git
def test_a_long_diff_is_hashed_up_to_the_limit(repo, monkeypatch):
    (repo / "train.py").write_text("x = 1\n" * 1000)
    monkeypatch.setattr(metadata, "MAX_DIFF_BYTES", 100)
    state = git_state(str(repo))
    assert state["dirty"] and state["diff_truncated"] is True and state["diff_bytes"] == 100


@needs_git
def test_detached_head_and_a_repository_without_commits(repo, tmp_path):
    git(repo, "checkout", "-q", "--detach")
    detached = git_state(str(repo))
    assert detached["branch"] is None and detached["commit"] == git(repo, "rev-parse", "HEAD")
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    git(empty, "checkout", "-q", "-b", "trunk")
    state = git_state(str(empty))
    assert state["commit"] is None and state["branch"] == "trunk" and state["dirty"] is False
    (empty / "a.py").write_text("1\n")
    git(empty, "add", "a.py")
    assert git_state(str(empty))["dirty"] is True and git_state(str(empty))["diff_sha256"] is None


def test_outside_a_repository_without_git_or_too_slow_the_git_state_is_none(tmp_path, repo, monkeypatch):
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_state(str(outside)) is None
    assert git_state(str(tmp_path / "missing")) is None and git_state(None) is None
    assert run_metadata(cwd=str(outside))["git"] is None
    monkeypatch.setattr(metadata, "GIT_TIMEOUT", 1e-6)
    assert git_state(str(repo)) is None
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(outside))  # no git command at all
    assert git_state(str(repo)) is None


@needs_git
def test_git_inside_a_hook_asks_about_the_folder_not_the_hooks_repository(repo, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    assert git_state(str(repo))["commit"] == git(repo, "--git-dir", str(repo / ".git"), "rev-parse", "HEAD")


def test_the_users_code_is_the_scripts_folder_unless_it_is_an_installed_entry_point(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert code_dir(str(repo)) == str(repo)
    monkeypatch.setattr(sys, "argv", [str(repo / "train.py"), "--lr", "0.1"])
    assert code_dir() == str(repo)
    monkeypatch.setattr(sys, "argv", ["-c"])
    assert code_dir() == str(tmp_path)
    entry_point = os.path.join(os.path.dirname(torch.__file__), "__init__.py")  # in site-packages
    monkeypatch.setattr(sys, "argv", [entry_point])
    assert code_dir() == str(tmp_path)


# ---------------------------------------------------------------------- devices
def test_without_cuda_no_devices_and_cuda_is_not_initialised(monkeypatch):
    def forbidden(*_a, **_k):
        raise AssertionError("CUDA was asked about a device although it is not available")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", forbidden)
    monkeypatch.setattr(torch.cuda, "device_count", forbidden)
    devices.cache_clear()
    initialised = torch.cuda.is_initialized()
    try:
        assert devices() == () and run_metadata()["devices"] == []
        assert torch.cuda.is_initialized() == initialised
    finally:
        devices.cache_clear()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_cuda_device_is_listed_with_its_name_and_memory(tmp_path):
    listed = run_metadata(cwd=str(tmp_path))["devices"]
    assert [d["index"] for d in listed] == list(range(torch.cuda.device_count()))
    for d in listed:
        props = torch.cuda.get_device_properties(d["index"])
        assert d["name"] == props.name and d["memory_total"] == props.total_memory > 0
        assert d["capability"] == f"{props.major}.{props.minor}"
    assert run_metadata(cwd=str(tmp_path))["cuda"]["cudnn"] == torch.backends.cudnn.version()


# ---------------------------------------------------------------------- the session's record
RUN_ENTRY_KEYS = {"attempt", "trigger", "time", "host", "pid", "process", "devices", "git"}


@needs_git
def test_a_sessions_record_has_the_run_metadata_of_its_start(url, repo, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(repo / "train.py"), "--epochs", "3"])  # as if run as the user's script
    s = session(url, seed=11).run()
    record = s.record
    run = record["run"]
    assert run["attempt"] == 1 and run["trigger"] == "start" and record["started"] == run["time"]
    assert run["pid"] == os.getpid() and run["host"] == record["host"] == socket.gethostname()
    assert run["seed"] == 11 and run["argv"] == [str(repo / "train.py"), "--epochs", "3"]
    assert run["git"]["root"] == os.path.realpath(repo) and run["git"]["commit"] == git(repo, "rev-parse", "HEAD")
    assert run["versions"]["torch"] == torch.__version__
    (entry,) = record["runs"]
    assert set(entry) == RUN_ENTRY_KEYS and entry["git"] == run["git"]
    assert {k: entry[k] for k in ("attempt", "trigger", "time", "host", "pid", "process")} == \
        {k: run[k] for k in ("attempt", "trigger", "time", "host", "pid", "process")}


def test_a_pending_record_has_no_run_yet(url):
    record = session(url).record
    assert record["run"] is None and record["runs"] == []


def test_a_resume_in_the_same_process_adds_no_run(url):
    s = session(url, updates=[every_n_steps(4, "pause")])
    s.run()
    first = s.record["run"]
    s.run()
    assert s.state == "paused" and s.step == 8 and s.record["run"] == first
    s.close()
    again = session(url, session_id=s.id).run()  # a new Session object in the same process, as a PBT round
    record = again.record
    assert again.state == "complete" and record["run"] == first and len(record["runs"]) == 1


def test_a_restarts_archived_attempt_keeps_its_own_run(url):
    s = session(url).run()
    first = s.record["run"]
    s.restart()
    record = s.record
    assert record["run"] is None and record["attempt"] == 2
    archived = s.db.collection("sessions").load_from_id(record["previous_attempt"])
    assert archived["run"] == first and archived["runs"] == record["runs"]
    assert record["history"][0]["runs"] == record["runs"] and record["history"][0]["runs"][0]["attempt"] == 1
    s.run()
    record = s.record
    assert record["run"]["attempt"] == 2 and record["run"]["trigger"] == "start"
    assert record["run"]["time"] > first["time"]
    assert [r["attempt"] for r in record["runs"]] == [1, 2]
    assert s.db.collection("sessions").load_from_id(record["previous_attempt"])["run"] == first


def _resume_elsewhere(url: str, session_id: str) -> None:
    session(url, session_id=session_id).run()


def test_a_resume_in_another_process_records_its_own_run(url):
    s = session(url, updates=[every_n_steps(4, "pause")])
    s.run()
    assert s.state == "paused"
    s.close()
    s.db.collection("sessions").update(s.id, {"$set": {"host": "elsewhere"}})  # as if started on another machine
    proc = mp.get_context("spawn").Process(target=_resume_elsewhere, args=(url, s.id))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    record = s.db.collection("sessions").load_from_id(s.id)
    assert record["state"] == "complete"
    start, resume = record["runs"]
    assert start["pid"] == os.getpid() and start["trigger"] == "start"
    assert resume["pid"] == proc.pid != os.getpid() and resume["trigger"] == "resume" and resume["attempt"] == 1
    assert resume["process"] != start["process"] and resume["time"] > start["time"]
    assert record["run"]["pid"] == proc.pid and record["run"]["trigger"] == "resume"
    assert record["host"] == socket.gethostname()  # the host follows the process that runs it


def test_a_takeover_after_a_dead_process_records_the_resuming_process(url):
    code = (
        "import os\n"
        "from ptutils.session import Session\n"
        f"s = Session(None, db={url!r}, name='tuner', session_id='tuner-1', status_interval=0.05)\n"
        "s.start()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    from ptutils.session import Session

    parent = Session(None, db=url, session_id="tuner-1")
    dead = parent.record["run"]["pid"]
    assert dead != os.getpid() and parent.record["run"]["argv"] == ["-c"]
    assert parent.resume() and parent.complete()
    record = parent.record
    assert [(r["trigger"], r["pid"]) for r in record["runs"]] == [("start", dead), ("resume", os.getpid())]
    assert record["run"]["pid"] == os.getpid()
