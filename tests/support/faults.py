"""The reliability summary: each fault test records what it injected, what survived, what was lost.

Tests take the ``faults`` fixture and call ``faults.record(category, injected=…,
survived=…, lost=…)``.  Records are written as one JSON file per test under
``.pytest-faults/`` (so pytest-xdist workers can report too; each run has its own directory) and the
controller prints one table at the end of the run: faults injected, survived,
records lost (lost must be 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections import defaultdict
from pathlib import Path

import pytest


ENV = "PTUTILS_FAULTS_DIR"


def faults_dir(config: pytest.Config) -> Path:
    """This run's directory (set by the controller, inherited by xdist workers)."""
    return Path(os.environ[ENV])


class FaultLog:
    """What one test injected and how the system came through it."""

    def __init__(self, directory: Path, test: str):
        self.directory = directory
        self.test = test

    def record(self, category: str, *, injected: int, survived: int, lost: int = 0, detail: str = "") -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        row = {"category": category, "injected": injected, "survived": survived, "lost": lost,
               "detail": detail, "test": self.test}
        (self.directory / f"{uuid.uuid4().hex}.json").write_text(json.dumps(row))


def configure(config: pytest.Config) -> None:
    """In the controller, before workers start: a fresh directory of this run's own."""
    if not hasattr(config, "workerinput"):
        os.environ[ENV] = str(Path(config.rootpath) / ".pytest-faults" / uuid.uuid4().hex)


def summary(terminalreporter, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    directory = faults_dir(config)
    rows = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []
    if not rows:
        return
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for row in rows:
        t = totals[row["category"]]
        t[0] += 1
        t[1] += row["injected"]
        t[2] += row["survived"]
        t[3] += row["lost"]
    tr = terminalreporter
    tr.section("reliability: faults injected, survived, records lost")
    tr.write_line(f"{'fault':<48} {'tests':>5} {'injected':>9} {'survived':>9} {'lost':>5}")
    for category in sorted(totals):
        tests, injected, survived, lost = totals[category]
        tr.write_line(f"{category:<48} {tests:>5} {injected:>9} {survived:>9} {lost:>5}")
    all_t = [sum(v[i] for v in totals.values()) for i in range(4)]
    tr.write_line(f"{'total':<48} {all_t[0]:>5} {all_t[1]:>9} {all_t[2]:>9} {all_t[3]:>5}")
    if os.environ.get("PTUTILS_KEEP_FAULTS") != "1":
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            directory.parent.rmdir()
