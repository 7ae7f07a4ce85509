"""What the command-line tests run: a small TOML config (synthetic data) whose steps can be slowed down."""

from __future__ import annotations

import time
from pathlib import Path


class Sleep:
    """An update that sleeps ``seconds`` after every step: a session slow enough to be watched and paused."""

    def __init__(self, seconds: float = 0.0, while_exists: str | None = None):
        self.seconds = seconds
        self.while_exists = while_exists
        """Sleep only while this file exists (a test removes it to let a resumed run finish fast)."""

    def __call__(self, session):
        if session.event == "step" and self.seconds and (self.while_exists is None or Path(self.while_exists).exists()):
            time.sleep(self.seconds)
        return session


def write_config(path: Path, *, name: str = "cli", epochs: int = 2, sleep: float = 0.0, n: int = 128,
                 status_interval: float = 0.2, brake: Path | None = None, extra: str = "") -> Path:
    """A config file training a linear classifier on ``ptutils.synthetic.classification`` (n/2 train rows, batch 16)."""
    path.write_text(
        f'name = "{name}"\nseed = 1\nstatus_interval = {status_interval}\n{extra}\n'
        '[model]\ndevice = "cpu"\n'
        '[model.module]\ncls = "torch.nn.Linear"\nin_features = 8\nout_features = 2\n'
        '[model.criterion]\ncls = "torch.nn.CrossEntropyLoss"\n'
        '[model.optimizer]\ncls = "torch.optim.SGD"\nlr = 0.1\n'
        f'[data]\ncls = "ptutils.synthetic.classification"\nn = {n}\nbatch_size = 16\n'
        '[checkpoint]\nevery_steps = 2\nkeep = 2\n'
        f'[[updates]]\ncls = "tests.support.clikit.Sleep"\nseconds = {sleep}\n'
        + (f'while_exists = "{brake}"\n' if brake is not None else "") +
        f'[[stages]]\nname = "train"\ndata = "train"\nmax_epochs = {epochs}\n'
    )
    return path
