"""Run metadata: which code, packages, machine and command produced an attempt.

:func:`run_metadata` returns a plain JSON dict: the versions of Python, torch,
ptutils, numpy and the key packages installed (:data:`KEY_PACKAGES`); the host,
pid, user, platform and CPUs; the CUDA devices (name and total memory) when
``torch.cuda.is_available()``; the command line, executable and working
directory; the seed; and the git state of the *user's code* (:func:`git_state`).
The session records it at every attempt start, and again when a resume runs in
another process (see :mod:`ptutils.lifecycle`): the record's ``run`` and ``runs``.

It runs once per attempt start, so it is cheap: what cannot change within a
process (versions, host, devices) is computed once, and git is asked with a few
short-lived ``git`` commands (no GitPython), each with a timeout.  Nothing here
raises: a missing ``git``, a directory outside any repository, a timeout or a
repository git refuses all give ``git: None``.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import sysconfig
import uuid
from typing import Any

import torch

KEY_PACKAGES = ("numpy", "transitions", "attrs", "sqlalchemy", "pymongo", "psycopg", "pymysql", "h5py", "zarr",
                "pillow", "ray")
"""Distributions whose versions are recorded when installed (torch and ptutils always are)."""

ENV_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID",
            "PBS_JOBID", "LSB_JOBID", "RANK", "LOCAL_RANK", "WORLD_SIZE")
"""Environment variables recorded when set: which devices and which job (never the whole environment)."""

GIT_TIMEOUT = 2.0
"""Seconds each ``git`` command may take before the git state is given up on (``None``)."""

MAX_DIFF_BYTES = 64 * 1024 * 1024
"""At most this much of ``git diff HEAD`` is hashed; a longer diff is marked ``diff_truncated``."""

_GIT_ENV_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX", "GIT_OBJECT_DIRECTORY")
"""Set inside git hooks; they would make git read another repository than the one asked about."""


def run_metadata(seed: int | None = None, cwd: str | None = None) -> dict[str, Any]:
    """What produced this run: versions, host, devices, command line, seed and git state (plain JSON).

    ``cwd`` is the directory of the user's code whose git state is recorded; by
    default the directory of the script (``sys.argv[0]``), or the working
    directory when there is no script or it is an installed entry point
    (``pytest``, a Jupyter kernel, the ``ptutils`` command).
    """
    static = _static()
    return {
        "host": static["host"],
        "pid": os.getpid(),
        "process": process_token(),
        "user": static["user"],
        "platform": static["platform"],
        "cpus": static["cpus"],
        "cpus_usable": _usable_cpus(),
        "python": static["python"],
        "executable": sys.executable,
        "versions": dict(static["versions"]),
        "cuda": dict(static["cuda"]) if static["cuda"] is not None else None,
        "devices": [dict(d) for d in devices()],
        "argv": list(sys.argv),
        "cwd": _getcwd(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "seed": seed,
        "git": git_state(code_dir(cwd)),
    }


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """The short form of a run's metadata kept for every process in the record's ``runs``: where, which code."""
    keys = ("attempt", "trigger", "time", "host", "pid", "process")
    return {**{k: run.get(k) for k in keys},
            "devices": [d.get("name") for d in run.get("devices") or []],
            "git": dict(run["git"]) if run.get("git") else None}


# ---------------------------------------------------------------------- the process
_token: tuple[int, str] | None = None


def process_token() -> str:
    """A random id of this process (a forked child gets its own): tells apart processes that reuse a pid."""
    global _token
    pid = os.getpid()
    if _token is None or _token[0] != pid:
        _token = (pid, uuid.uuid4().hex[:12])
    return _token[1]


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    """What cannot change within a process: versions, host, platform, CUDA build."""
    try:
        user: str | None = getpass.getuser()
    except Exception:  # no passwd entry (containers) and no LOGNAME/USER
        user = None
    uname = os.uname() if hasattr(os, "uname") else None
    return {
        "host": socket.gethostname(),
        "user": user,
        # not platform.platform(): on Linux it scans the interpreter binary for its libc version (tens of ms)
        "platform": f"{uname.sysname}-{uname.release}-{uname.machine}" if uname else sys.platform,
        "cpus": os.cpu_count(),
        "python": {"version": platform.python_version(), "implementation": sys.implementation.name},
        "versions": package_versions(),
        "cuda": _cuda_build(),
    }


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _getcwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the working directory was deleted
        return None


def package_versions() -> dict[str, str]:
    """Versions of python, torch, ptutils and each installed :data:`KEY_PACKAGES` distribution."""
    from . import __version__

    versions = {"python": platform.python_version(), "torch": torch.__version__, "ptutils": __version__}
    for name in KEY_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
        except Exception:  # a broken distribution's metadata is no reason to fail a start
            pass
    return versions


def _cuda_build() -> dict[str, Any] | None:
    """The CUDA and cuDNN versions torch was built with; None for a CPU build."""
    if not torch.version.cuda:
        return None
    cudnn = None
    try:
        if torch.cuda.is_available() and torch.backends.cudnn.is_available():  # loading cuDNN on a CPU machine: ~10 ms
            cudnn = torch.backends.cudnn.version()
    except Exception:
        pass
    return {"version": torch.version.cuda, "cudnn": cudnn}


@functools.lru_cache(maxsize=1)
def devices() -> tuple[dict[str, Any], ...]:
    """The CUDA devices this process sees: index, name, total memory (bytes), compute capability.

    Empty, without initialising CUDA, when ``torch.cuda.is_available()`` is
    false; also empty in a process forked after CUDA was initialised, which
    cannot use it.
    """
    try:
        if not torch.cuda.is_available() or torch.cuda._is_in_bad_fork():
            return ()
        found = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            found.append({"index": index, "name": props.name, "memory_total": int(props.total_memory),
                          "capability": f"{props.major}.{props.minor}"})
        return tuple(found)
    except Exception:  # a driver that lists devices but will not describe them: record none rather than fail
        return ()


# ---------------------------------------------------------------------- the user's code
def code_dir(cwd: str | None = None) -> str | None:
    """The directory of the user's code: ``cwd``, else the script's directory, else the working directory.

    A script that is an installed entry point (in site-packages or the scripts
    directory: ``pytest``, ``ipykernel_launcher``, the ``ptutils`` command) is not
    the user's code, so the working directory is taken then.
    """
    if cwd is not None:
        return os.fspath(cwd)
    script = sys.argv[0] if sys.argv else ""
    if script and script not in ("-c", "-m") and os.path.isfile(script):
        folder = os.path.dirname(os.path.abspath(script))
        if not any(_inside(folder, root) for root in _installed_dirs()):
            return folder
    return _getcwd()


@functools.lru_cache(maxsize=1)
def _installed_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("purelib", "platlib", "scripts", "stdlib", "platstdlib")}
    try:
        import site

        dirs.add(site.getusersitepackages())
        dirs.update(site.getsitepackages())
    except Exception:
        pass
    return tuple(os.path.realpath(d) for d in dirs if d)


def _inside(path: str, root: str) -> bool:
    path = os.path.realpath(path)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_ENV_DROP}
    env.update(GIT_OPTIONAL_LOCKS="0", LC_ALL="C", GIT_TERMINAL_PROMPT="0")  # never take index.lock, never ask
    return env


def _git(folder: str, *args: str) -> str | None:
    """``git -C folder args`` stdout, or None when git is missing, fails or is slow."""
    try:
        done = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=GIT_TIMEOUT,
                              env=_git_env(), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


DIFF_ARGS = ("diff", "HEAD", "--binary", "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames",
             "--src-prefix=a/", "--dst-prefix=b/")
"""``git diff HEAD`` made independent of the user's diff settings, so equal changes hash equal."""


def _diff_hash(folder: str) -> tuple[str, int, bool] | None:
    """SHA-256 of ``git diff HEAD`` (at most :data:`MAX_DIFF_BYTES` of it), its bytes hashed, whether cut."""
    digest = hashlib.sha256()
    size = 0
    try:
        proc = subprocess.Popen(["git", "-C", folder, *DIFF_ARGS], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=_git_env())
    except (OSError, ValueError):
        return None
    truncated = False
    try:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            take = chunk[: MAX_DIFF_BYTES - size]
            digest.update(take)
            size += len(take)
            if size >= MAX_DIFF_BYTES:
                truncated = True
                break
    finally:
        if truncated:
            proc.kill()
        try:
            code = proc.wait(timeout=GIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
        proc.stdout.close()
    if code != 0 and not truncated:
        return None
    return digest.hexdigest(), size, truncated


def git_state(folder: str | None) -> dict[str, Any] | None:
    """The git state of the repository holding ``folder``, or None (no git, not a repository, git failed).

    ``{"root", "commit", "branch", "dirty", "diff_sha256", "diff_bytes", "diff_truncated"}``: ``branch``
    is None on a detached HEAD, ``commit`` None before the first commit.  ``dirty`` means tracked files
    differ from HEAD (staged or not), as ``git describe --dirty`` has it: untracked files (data, outputs)
    do not count.  When dirty, ``diff_sha256`` is the SHA-256 of ``git diff HEAD`` (None when clean).
    """
    if folder is None or not os.path.isdir(folder):
        return None
    out = _git(folder, "rev-parse", "--show-toplevel", "HEAD", "--abbrev-ref", "HEAD")
    if out is not None and len(out.splitlines()) == 3:
        root, commit, branch = out.splitlines()
    else:  # not a repository, or one without commits yet (HEAD does not resolve)
        top = _git(folder, "rev-parse", "--show-toplevel")
        if top is None or not top.strip():
            return None
        root, commit = top.strip(), None
        head = _git(folder, "symbolic-ref", "--short", "-q", "HEAD")
        branch = head.strip() if head else "HEAD"
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    if status is None:
        return None
    dirty = bool(status.strip())
    diff = _diff_hash(folder) if dirty and commit is not None else None
    return {
        "root": root,
        "commit": commit,
        "branch": None if branch == "HEAD" else branch,
        "dirty": dirty,
        "diff_sha256": diff[0] if diff else None,
        "diff_bytes": diff[1] if diff else None,
        "diff_truncated": diff[2] if diff else False,
    }
