"""Small tuning sessions for the tuning tests, and a runner that kills itself at a chosen point.

    python -m tests.support.tuningkit URL ID [--executor pool] [--kill-at POINT --nth N] [--kill-group]

POINT is where the parent dies with SIGKILL, the Nth time it gets there:
``rows`` (a round's decision rows are stored, the round is not yet marked
decided), ``clone`` (a recipient's checkpoint clone is written, its config not
yet changed), ``checkpoint`` (half-way through writing a child's checkpoint
blob, in-process), ``round`` (a round's children are submitted and running, on
the pool: its workers outlive the parent unless ``--kill-group`` kills the
whole process group).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BASE: dict[str, Any] = {
    "name": "tune",
    "seed": 0,
    "model": {
        "module": {"cls": "tests.support.tuningkit.mlp"},
        "criterion": {"cls": "torch.nn.CrossEntropyLoss"},
        "optimizer": {"cls": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
        "metrics": {"accuracy": "ptutils.model.accuracy"},
        "device": "cpu",
    },
    "data": {"cls": "tests.support.sessionkit.provider"},
    "stages": [{"name": "train", "data": "train", "max_epochs": 4}],  # 5 steps an epoch
    "updates": [{"cls": "ptutils.update.Evaluate", "data": "val"}, {"cls": "tests.support.tuningkit.Slow"}],
    "checkpoint": {"every_epochs": 1, "keep": 1},
    "status_interval": 0.2,
}
STEPS = 20


class Slow:
    """Sleeps ``PTUTILS_TEST_STEP_SLEEP`` seconds a step (0 unless a test sets it): a round long enough to kill."""

    def __init__(self) -> None:
        self.seconds = float(os.environ.get("PTUTILS_TEST_STEP_SLEEP", "0"))

    def __call__(self, session):
        if self.seconds:
            time.sleep(self.seconds)
        return session


def mlp() -> torch.nn.Module:
    """A small classifier with dropout (so every step draws from the RNG an exact resume must restore)."""
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))


def pbt(**kwargs: Any):
    from ptutils.searchers import PBT
    from ptutils.spaces import LogUniform

    kwargs.setdefault("hyperparam_mutations", {"model.optimizer.lr": LogUniform(1e-3, 1.0)})
    kwargs.setdefault("population_size", 4)
    kwargs.setdefault("seed", 7)
    kwargs.setdefault("resample_probability", 0.25)
    return PBT(metric="val_loss", mode="min", perturbation_interval=5, **kwargs)


def tuning(url: str, session_id: str = "pbt", executor: Any = "inprocess", **kwargs: Any):
    from ptutils.nest import Tuning

    searcher = kwargs.pop("searcher", None) or pbt()
    return Tuning(BASE, searcher, executor=executor, db=url, session_id=session_id, **kwargs)


def final_state(url: str, child: str) -> tuple[dict, dict]:
    """A child's newest checkpoint: ``(state, record)``."""
    from ptutils import open_db
    from ptutils.checkpoint import CheckpointStore

    found = CheckpointStore(open_db(url), child).load_latest()
    assert found is not None, f"{child} has no checkpoint"
    return found


def final_weights(url: str, child: str) -> dict[str, torch.Tensor]:
    """The weights of a child's newest checkpoint."""
    from ptutils import load_weights

    return load_weights(url, child)


def result(url: str, session_id: str = "pbt") -> tuple[list[tuple], dict[str, dict]]:
    """What must not depend on how the run went: every decision row (times left out) and every child's weights."""
    from ptutils.nest import Tuning

    with Tuning.resume(url, session_id) as t:
        rows = [(r["round"], r["child"], r["t"], r["score"], r["rank"], r["quantile"], r["action"], r["donor"],
                 repr(r["old_values"]), repr(r["new_values"]), repr(r["ops"]), r["applied"]) for r in t.rows()]
        weights = {c: final_weights(url, c) for c in t.children}
    return rows, weights


ROOT = Path(__file__).resolve().parent.parent.parent


def same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Whether two runs left every child with bitwise the same weights."""
    return a.keys() == b.keys() and all(
        a[c].keys() == b[c].keys() and all(torch.equal(a[c][k], b[c][k]) for k in a[c]) for c in a
    )


def run_killed(url: str, point: str, nth: int, executor: str = "inprocess", *, group: bool = False,
                step_sleep: float = 0.0) -> int:
    """Run the tuning in a child process that SIGKILLs itself at ``point`` (or, with ``group``, its whole group).

    Returns its pid, which is also its session id: what it started (pool workers, Ray) shares it.
    """
    env = {**os.environ, "PTUTILS_TEST_STEP_SLEEP": str(step_sleep), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.support.tuningkit", url, "pbt", "--kill-at", point, "--nth", str(nth),
           "--executor", executor]
    if group:
        cmd.append("--kill-group")
    with tempfile.TemporaryFile("w+") as err:  # not a pipe: processes it leaves behind would hold a pipe open
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                start_new_session=True)
        proc.wait(timeout=300)
        err.seek(0)
        assert proc.returncode == -signal.SIGKILL, err.read()[-2000:]
    return proc.pid


def claims_alternate(url: str, children: list[str]) -> None:
    """No child was held by two processes at once: claims and releases alternate, one owner at a time.

    A claim may follow an unreleased one only when that owner was killed: its process is gone and never
    claims again.
    """
    from ptutils import open_db
    from ptutils.status import SESSIONS, pid_alive

    sessions = open_db(url).collection(SESSIONS)
    for child in children:
        claims = sessions.load_from_id(child).get("claims") or []
        owner = None
        for i, entry in enumerate(claims):
            if entry["event"] == "claim":
                if owner is not None:
                    later = {e["pid"] for e in claims[i:]}
                    assert not pid_alive(owner) and owner not in later, \
                        f"{child}: claimed by {entry['pid']} while {owner} held it"
                owner = entry["pid"]
            else:
                assert entry["pid"] == owner
                owner = None


def kill_session(sid: int) -> None:
    """SIGKILL every process left in session ``sid`` (Ray's agents outlive a killed driver)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


GROUP = {"kill": False}


def _kill() -> None:
    if GROUP["kill"]:
        os.killpg(0, signal.SIGKILL)  # the parent and every pool worker
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(point: str, nth: int) -> None:
    from ptutils import nest
    from ptutils.checkpoint import CheckpointStore

    seen = {"count": 0}

    def due() -> bool:
        seen["count"] += 1
        return seen["count"] == nth

    if point == "rows":
        original_state = nest.Tuning._write_state

        def write_state(self, **fields):
            if "decided" in fields and due():
                _kill()  # the rows are stored; the round is not marked decided
            return original_state(self, **fields)

        nest.Tuning._write_state = write_state
    elif point == "clone":
        original_clone = CheckpointStore.clone

        def clone(self, *args, **kwargs):
            record = original_clone(self, *args, **kwargs)
            if due():
                _kill()
            return record

        CheckpointStore.clone = clone
    elif point == "checkpoint":
        from tests.support.crashkit import _kill_inside_fs_write

        _kill_inside_fs_write(nth, lambda data: len(data) > 4096
                              and b'"format":"ptutils-checkpoint/1"' in bytes(data[:4096]))
    elif point == "round":
        original_run_round = nest.Tuning._run_round

        def run_round(self, children, until):
            if due():
                for child in children:
                    self._executor.submit(self._task(child, until))
                time.sleep(1.0)  # the workers are in the middle of the round
                _kill()
            return original_run_round(self, children, until)

        nest.Tuning._run_round = run_round
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("session_id")
    parser.add_argument("--executor", default="inprocess")
    parser.add_argument("--kill-at")
    parser.add_argument("--nth", type=int, default=1)
    parser.add_argument("--kill-group", action="store_true", help="kill the whole process group, workers too")
    args = parser.parse_args(argv)
    GROUP["kill"] = args.kill_group
    if args.kill_at:
        _kill_at(args.kill_at, args.nth)
    executor = {"pool": {"kind": "pool", "workers": 2}, "ray": {"kind": "ray", "num_cpus": 2}}.get(args.executor,
                                                                                           args.executor)
    from ptutils.errors import Interrupted

    with tuning(args.url, args.session_id, executor=executor) as t:
        try:
            t.run()
        except Interrupted as exc:
            print(f"interrupted: {exc}", flush=True)
        print(f"state={t.session.state}", flush=True)


if __name__ == "__main__":
    main()
