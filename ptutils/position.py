"""Where a session is in its run, and everything exact resume needs to come back to it.

:class:`LoopPosition` owns the counters the loop advances (attempt, stage, step,
stage step and epoch, batch within the epoch), the data request an update
switched to, and the partial sums of an evaluation or a training epoch in progress.  A checkpoint is
:func:`capture`: the model, every RNG, that position, the metrics and every
update's state.  Exact resume is the way back, in this order:

1. :func:`resume_from` picks the checkpoint (this attempt's newest good one);
2. :func:`stages_to_replay` names the stage setups to run again, so the
   checkpoint finds the model structure it was saved from;
3. :func:`restore` loads the state and keeps the RNG for later;
4. :meth:`LoopPosition.iterate` positions the stage's DataLoader at the batch
   the checkpoint was taken after (its ``ResumableSampler``) and only then
   restores the RNG, so the batches, their order and every random draw after
   them are the ones an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch.utils.data import DataLoader

from .checkpoint import CheckpointStore, rng_state, set_rng_state
from .sampling import set_loader_position
from .errors import CheckpointError
from .means import EpochMeans
from .model import Model

log = logging.getLogger("ptutils")


@attrs.define
class LoopPosition:
    """The loop's counters and what a checkpoint must hold to continue from them."""

    stage: str
    attempt: int = 1
    step: int = 0
    stage_step: int = 0
    stage_epoch: int = 0
    batch_in_epoch: int = 0
    data_override: Any = None
    """A request an update switched the stage's data to (``session.request_data``), or None."""
    eval_sums: dict[str, torch.Tensor] = attrs.field(factory=dict)
    eval_count: int = 0
    train_means: EpochMeans = attrs.field(factory=EpochMeans)
    """The training loss and metrics of the epoch in progress (``{stage}_loss`` ... at its end)."""
    pending_rng: Mapping[str, Any] | None = None
    """RNG state of a restored checkpoint, applied once the loader's iterator exists."""

    def mark(self) -> tuple:
        """What identifies this point of the run (two checkpoints at one mark hold the same state)."""
        return (self.attempt, self.stage, self.stage_step, self.step)

    def enter_stage(self, stage: str) -> None:
        """Begin ``stage`` at its first step, with the stage's own data."""
        self.stage = stage
        self.stage_step = self.stage_epoch = self.batch_in_epoch = 0
        self.data_override = None
        self.train_means.reset()

    def next_attempt(self, first_stage: str) -> None:
        """Go back to the start of the run as the next attempt."""
        self.attempt += 1
        self.enter_stage(first_stage)
        self.step = 0

    def snapshot(self) -> dict[str, Any]:
        """The checkpoint's ``loop`` part."""
        override = self.data_override
        return {
            "attempt": self.attempt,
            "stage": self.stage,
            "step": self.step,
            "stage_step": self.stage_step,
            "stage_epoch": self.stage_epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "data_override": override if isinstance(override, (str, dict)) else None,
            "eval_sums": dict(self.eval_sums),
            "eval_count": self.eval_count,
            "train_means": self.train_means.state_dict(),
        }

    def load(self, loop: Mapping[str, Any], rng: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        """Take a checkpoint's ``loop`` part (its sums onto ``device``); its ``rng`` is applied by the next :meth:`iterate`."""
        self.attempt = loop["attempt"]
        self.stage = loop["stage"]
        self.step, self.stage_step = loop["step"], loop["stage_step"]
        self.stage_epoch, self.batch_in_epoch = loop["stage_epoch"], loop["batch_in_epoch"]
        self.data_override = loop.get("data_override")
        self.eval_sums, self.eval_count = dict(loop.get("eval_sums") or {}), loop.get("eval_count", 0)
        self.train_means.load_state_dict(loop.get("train_means") or {}, device)
        self.pending_rng = rng

    def iterate(self, loader: Any, owner: str) -> Iterator:
        """An iterator over ``loader`` positioned at ``batch_in_epoch``; draws no global randomness mid-epoch."""
        exact = isinstance(loader, DataLoader) and set_loader_position(loader, self.stage_epoch, self.batch_in_epoch)
        if self.batch_in_epoch and self.pending_rng is None:
            saved = torch.get_rng_state()
            it = iter(loader)
            torch.set_rng_state(saved)
        else:
            it = iter(loader)
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng)
            self.pending_rng = None
        if not exact and self.batch_in_epoch:
            log.warning("session %s: loader has no resumable sampler; skipping %d batches", owner, self.batch_in_epoch)
            for _ in range(self.batch_in_epoch):
                next(it)
        return it


def capture(model: Model, position: LoopPosition, metrics: Mapping[str, Any], updates: Sequence[Any]) -> dict[str, Any]:
    """Everything needed to continue exactly: model, RNG, loop position, metrics, update states."""
    return {
        "model": model.state_dict(),
        "grad_clip": model.grad_clip,
        "rng": rng_state(),
        "loop": position.snapshot(),
        "metrics": dict(metrics),
        "updates": [u.state_dict() if hasattr(u, "state_dict") else None for u in updates],
    }


def restore(state: Mapping[str, Any], model: Model, position: LoopPosition, updates: Sequence[Any], *,
            with_updates: bool) -> dict[str, Any]:
    """Load a :func:`capture` into the model, the position (and the updates); returns its metrics."""
    model.load_state_dict(state["model"])
    model.grad_clip = state.get("grad_clip")
    model.grad_norm = None  # an observation of the abandoned steps must not reach later updates
    position.load(state["loop"], state["rng"], model.device)
    if with_updates:
        for update, saved in zip(updates, state.get("updates") or []):
            if saved is not None and hasattr(update, "load_state_dict"):
                update.load_state_dict(saved)
    return dict(state.get("metrics") or {})


def resume_from(checkpoints: CheckpointStore, attempt: int, session_id: str) -> tuple[dict[str, Any], dict]:
    """The checkpoint a paused session resumes from: its attempt's newest good one (else any newest good one)."""
    found = checkpoints.load_latest(attempt=attempt) or checkpoints.load_latest()
    if found is None:
        raise CheckpointError(f"session {session_id!r} is paused but has no usable checkpoint to resume from")
    return found


def stages_to_replay(history: Sequence[str], until: str) -> list[str]:
    """The stages whose setups rebuild the structure a checkpoint taken in ``until`` was saved from."""
    path = list(history)
    if until in path:
        path = path[: len(path) - path[::-1].index(until)]
    return path or [until]
