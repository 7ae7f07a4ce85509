"""Session: an experiment as an explicit finite state machine, and the thin loop that drives it.

The machine (built on ``transitions``) has the lifecycle states ``pending``,
``running`` (with the user's stages as sub-states), ``paused``, ``complete``
and ``failed``; see :mod:`ptutils.stages`.  :meth:`Session.run` repeats: take a
batch from the current stage's DataLoader, step the :class:`~ptutils.model.Model`,
call the updates (``update(session) -> session``).  Updates and polled guards
change the course by firing triggers; every state change is written to the
status record before it takes effect.  The per-step path touches no FSM and no
database: status writes are throttled by time and checkpoints are periodic.

This module is the façade and the hot loop.  Its cold paths live with the state
they own: :mod:`ptutils.lifecycle` (the machine, write-ahead steps, admission,
takeover), :mod:`ptutils.position` (the loop's counters and exact resume),
:mod:`ptutils.writer` (the one background writer), :mod:`ptutils.outage` (the
outage clock), :mod:`ptutils.status` (what the record says).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointStore, deserialize, seed_everything, serialize, serialize_parts
from .changes import ConfigChanges, apply_values, plan
from .config import Config, build, canonical_path, object_paths, paths_named
from .data import DataProvider, check_requests
from .database import BlobData, DBInterface, backend_for, check_id, open_db
from .errors import BackendUnavailableError, CheckpointError, ConfigError, SessionError, StorageError, TransitionError
from .lifecycle import Admission, Lifecycle, StateChange, mark_interrupted, take_over
from .means import FOLD
from .model import Model
from .outage import OutageClock, retry_through_outage
from .position import LoopPosition, capture, restore, resume_from, stages_to_replay
from .records import load_model, session_record
from .signals import PauseOnSignals, abort_reason
from .stages import LIFECYCLE, SEP, STAGE_DONE, Stage, StageTransition, parse_transitions
from .status import (
    MetricPoint,
    StatusWriter,
    archive_attempt,
    finite_metrics,
    initial_record,
    metric_history,
    pause_request,
    progress_fields,
    session_not_found,
    steps_allowed,
)
from .update import Update
from .writer import BackgroundWriter

log = logging.getLogger("ptutils")

DEFAULT_DIR = "ptutils-runs"
"""Where sessions keep their records when no database is given: ./ptutils-runs (filesystem backend)."""


def default_db_url() -> str:
    """``file://`` URL of :data:`DEFAULT_DIR` under the current directory."""
    return Path(DEFAULT_DIR).resolve().as_uri()


def _checkpoint_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a session's record shows of its newest checkpoint."""
    return {"id": record["_id"], "step": record["step"], "reason": record["reason"], "time": record["created"]}


class _ClassOrInstance:
    """One name, two verbs: ``Session.resume(db, id)`` rebuilds a stored session; ``session.resume()`` is a trigger."""

    def __init__(self, on_class: classmethod, on_instance: Callable):
        self._on_class = on_class
        self._on_instance = on_instance

    def __get__(self, instance: Any, owner: type) -> Callable:
        if instance is None:
            return self._on_class.__get__(None, owner)
        return self._on_instance.__get__(instance, owner)


def _check_keywords(cls: type, config: Config, kwargs: Mapping[str, Any]) -> None:
    """Refuse a keyword of ``from_config`` that is no Session argument, naming it and the override to use."""
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "data"}
    for name in kwargs:
        if name not in known:
            paths = paths_named(config, name)
            example = f"{{{paths[0]!r}: ...}}" if paths else "{'model.optimizer.lr': ...} (dotted config paths)"
            raise SessionError(
                f"Session.from_config() got an unexpected keyword {name!r}: it takes Session arguments only; "
                f"vary a config field with overrides={example}"
            )


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40].strip("-_.")
    return keep or "session"


class Session:
    """One experiment: a Model, a DataProvider and a DBInterface, driven as a state machine.

    Give ``session_id`` to attach to an existing record (resume in a new
    process); otherwise a new id is made from ``name``.  With ``must_exist``
    a missing record raises SessionNotFound (naming the id and the database)
    instead of starting a new session.  ``checkpoint_db`` keeps checkpoints
    apart from the records (e.g. records on a server, checkpoints in a local
    directory).  ``keep_best="val_loss"`` (``best_mode`` ``"min"`` or
    ``"max"``) keeps the best checkpoint by that metric beside the last
    ``keep_checkpoints``.

    With ``config``, attaching compares it with the config the record ran with
    (see :mod:`ptutils.changes`): a difference is refused with a
    ConfigChangeError listing the fields, unless it is in ``overrides``
    (dotted paths, as in :meth:`from_config`) and can be applied to the run in
    progress (lr, grad_clip, stage budgets); applied changes are recorded in
    the record's ``config_changes``.

    A session that trains nothing itself (a parent that only holds children)
    takes ``model=None``: it has the same lifecycle and record, no checkpoints
    and no loop; drive it with :meth:`start`, :meth:`heartbeat`, :meth:`pause`,
    :meth:`resume` and :meth:`complete`.
    """

    def __init__(
        self,
        model: Model | None,
        data: DataProvider | None = None,
        *,
        stages: Sequence[Stage | Mapping[str, Any] | str] = ("train",),
        transitions: Iterable[Mapping[str, Any]] = (),
        updates: Iterable[Update] = (),
        db: DBInterface | str | None = None,
        checkpoint_db: DBInterface | str | None = None,
        name: str = "session",
        session_id: str | None = None,
        seed: int = 0,
        checkpoint_every_steps: int | None = None,
        checkpoint_every_epochs: int | None = 1,
        keep_checkpoints: int = 3,
        keep_best: str | None = None,
        best_mode: str = "min",
        status_interval: float = 2.0,
        start_conditions: Sequence[Callable[[Session], bool]] = (),
        queue: str | None = None,
        outage_pause_after: float = 60.0,
        outage_wait: float = 300.0,
        parent: Session | None = None,
        config: Config | None = None,
        metadata: Mapping[str, Any] | None = None,
        must_exist: bool = False,
        overrides: Mapping[str, Any] | None = None,
    ):
        if model is not None and not isinstance(model, Model):
            raise SessionError(f"model must be a ptutils.model.Model (or None for a session that trains nothing), "
                               f"got {type(model).__name__}")
        self.model = model
        self.data = data
        self.name = name
        self.seed = seed
        if must_exist and session_id is None:
            raise SessionError("must_exist=True needs the session_id of the record to attach to")
        if overrides and config is None:
            raise SessionError("overrides= changes fields of a config: give config= too")
        self.config = config.with_overrides(overrides) if overrides and config is not None else config
        self._asked = [canonical_path(self.config, key) for key in overrides or ()]
        self._changes: ConfigChanges | None = None
        """Config changes taken when attaching, recorded once they are in effect (after a resume's restore)."""
        self.metadata = dict(metadata or {})
        self.stages: dict[str, Stage] = {}
        for raw in stages:
            stage = Stage.coerce(raw)
            if stage.name in self.stages:
                raise SessionError(f"stage {stage.name!r} is declared twice")
            self.stages[stage.name] = stage
        if not self.stages:
            raise SessionError("a session needs at least one stage")
        self.stage_transitions: list[StageTransition] = parse_transitions(transitions, list(self.stages))
        self.updates: list[Update] = list(updates)
        if model is not None:
            model.track_grad_norm = any(getattr(u, "needs_grad_norm", False) for u in self.updates)
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_every_epochs = checkpoint_every_epochs
        self.outage_pause_after = outage_pause_after
        self.outage_wait = outage_wait

        check_requests(data, self._data_requests())
        self.id = check_id(session_id) if session_id else f"{_slug(name)}-{uuid.uuid4().hex[:10]}"
        """The session's id: its record's key in the database (give it as ``session_id`` to reopen the session)."""
        if len(self.id) > 80:
            raise SessionError(f"session id {self.id!r} is longer than 80 characters")
        self._owned: list[DBInterface] = []
        self.db = self._open(db or default_db_url())
        ckpt_db = self._open(checkpoint_db) if checkpoint_db is not None else self.db
        self._outage = OutageClock()
        self._status = StatusWriter(self.db, self.id, interval=status_interval, outage=self._outage)
        self._writer = BackgroundWriter(self.id, self._outage)
        self.checkpoints = CheckpointStore(
            ckpt_db, self.id, keep=keep_checkpoints, keep_best=keep_best, best_mode=best_mode,
            on_warning=lambda m: self.log_event("warning", message=m),
        )
        self._admission = Admission(self._status, self.id, queue, start_conditions)

        self.position = LoopPosition(next(iter(self.stages)))
        """The loop's counters (attempt, stage, step ...) and what exact resume restores."""
        self.loss: torch.Tensor | None = None
        self.metrics: dict[str, float] = {}
        """The newest value of each metric: ``{stage}_loss`` and ``{stage}_<metric>`` (the means of the latest
        epoch of a stage, e.g. ``train_loss``) and ``{prefix}_*`` of the latest evaluation (``val_loss``).
        Checkpointed and kept in the record; :meth:`metric_history` has every value."""
        self.event = "step"
        self.error: dict[str, Any] | None = None
        self.outcome: str | None = None
        self.parent = parent
        self.children: list[Session] = []

        self._course_changed = False
        """Set by anything that changes the course (a trigger, a pause, a restore, new data): ends this round of updates."""
        self._pause_reason = "requested"
        self._pause_requested: str | None = None
        self._checkpointed_at: tuple | None = None
        self._checkpointed: dict[str, Any] | None = None
        """The newest checkpoint written, as the record shows it (``last_checkpoint``)."""
        self._loader: Any = None
        self._loader_len: int | None = None
        self._needs_restore = False
        self._hb: Future | None = None
        self._start_error: BaseException | None = None

        record = self._status.load()
        if record is None and must_exist:
            missing = session_not_found(self.db, self.id)
            self.close()
            raise missing
        try:
            initial = "pending" if record is None else self._take_over(record)
        except BaseException:
            self.close()
            raise
        self._lifecycle = Lifecycle(self, list(self.stages.values()), self.stage_transitions, initial,
                                    start_guard=self._start_guard)
        self._polled: dict[str, list[StageTransition]] = {s: [] for s in self.stages}
        self._stage_done: dict[str, list[StageTransition]] = {s: [] for s in self.stages}
        for t in self.stage_transitions:
            for src in t.sources:
                if t.polled:
                    self._polled[src].append(t)
                if t.trigger == STAGE_DONE:
                    self._stage_done[src].append(t)
        if record is None:
            self._status.create(initial_record(
                name=self.name, parent_id=parent.id if parent is not None else None, attempt=self.attempt,
                stages=list(self.stages), queue=queue, seed=self.seed,
                config=self.config.to_dict() if self.config is not None else None, metadata=self.metadata,
            ))
            if parent is not None:
                parent.add_child(self)
        elif parent is not None and self not in parent.children:
            parent.children.append(self)
        if not self._needs_restore:
            self._take_config_changes()

    # ------------------------------------------------------------------ construction
    def _data_requests(self) -> list[tuple[str, Any]]:
        """Every request the stages and updates will make of the provider, with the field that makes it."""
        found = [(f"stages.{stage.name}.data", stage.data) for stage in self.stages.values()]
        for i, update in enumerate(self.updates):
            asks = getattr(update, "data_requests", None)
            found += [(f"updates[{i}]", request) for request in (asks() if callable(asks) else ())]
        return found

    def _open(self, db: DBInterface | str) -> DBInterface:
        if isinstance(db, DBInterface):
            return db
        opened = open_db(db)
        self._owned.append(opened)
        return opened

    @classmethod
    def from_config(cls, config: Config | Mapping[str, Any], *, session_id: str | None = None,
                    overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> Session:
        """Build a session (model, data, updates, stages) from a Config or its dict.

        ``overrides`` varies config fields by dotted path (``{"model.optimizer.lr": 0.3}``,
        validated as the config is, see :meth:`Config.with_overrides`); on a resume
        it also names the changes to apply.  ``kwargs`` are Session arguments
        (``db``, ``queue``, ``must_exist`` ...), which take precedence over the config's.
        """
        cfg = config if isinstance(config, Config) else Config.from_dict(config)
        if overrides:
            cfg = cfg.with_overrides(overrides)
        _check_keywords(cls, cfg, kwargs)
        for field, url in (("db", cfg.db), ("checkpoint.db", cfg.checkpoint.db)):
            if url is not None:
                try:
                    backend_for(url)
                except StorageError as exc:
                    raise ConfigError(field, str(exc)) from exc
        seed_everything(cfg.seed)
        model = Model.from_config(cfg.model)
        data = build(cfg.data, "data") if cfg.data is not None else None
        updates = [build(u, f"updates[{i}]") for i, u in enumerate(cfg.updates)]
        try:
            stages = [Stage.coerce(s) for s in cfg.stages] or ["train"]
            parse_transitions(cfg.transitions, [s.name for s in stages if isinstance(s, Stage)] or ["train"])
        except ConfigError as exc:
            raise ConfigError(exc.field.replace("stages[]", "stages"), str(exc).split(": ", 1)[1]) from None
        built: dict[str, Any] = dict(
            stages=stages,
            transitions=cfg.transitions,
            updates=updates,
            db=cfg.db,
            checkpoint_db=cfg.checkpoint.db,
            name=cfg.name,
            seed=cfg.seed,
            checkpoint_every_steps=cfg.checkpoint.every_steps,
            checkpoint_every_epochs=cfg.checkpoint.every_epochs,
            keep_checkpoints=cfg.checkpoint.keep,
            keep_best=cfg.checkpoint.keep_best,
            best_mode=cfg.checkpoint.best_mode,
            status_interval=cfg.status_interval,
            config=cfg,
            metadata=cfg.metadata,
            overrides=overrides,
        )
        return cls(model, data, session_id=session_id, **{**built, **kwargs})

    @classmethod
    def _resume_stored(cls, db: DBInterface | str, session_id: str, *, overrides: Mapping[str, Any] | None = None,
                       **kwargs: Any) -> Session:
        """The stored session ``session_id`` of ``db``, rebuilt from the config its record holds; ``run()`` goes on.

        Raises SessionNotFound naming the id and the database when there is no
        such record.  ``overrides`` (dotted paths) applies what a run in progress
        can take (``{"stages.train.max_epochs": 8, "model.optimizer.lr": 0.01}``),
        recorded in the record's ``config_changes``; ``kwargs`` are Session
        arguments a config does not hold (``queue``, ``start_conditions`` ...).
        A session built from Python objects has no rebuildable config: build it
        again as before with ``Session(..., session_id=ID, must_exist=True)``.
        On a session object, ``session.resume()`` is the trigger paused -> running.
        """
        stored = session_record(db, session_id).record.get("config")
        built_in_code = object_paths(stored) if stored is not None else ["model"]
        if built_in_code:
            raise SessionError(
                f"session {session_id!r} was built in code ({built_in_code[0]} is a Python object), so its record "
                f"cannot rebuild it: build it again as before with Session(..., session_id={session_id!r}, "
                f"must_exist=True)"
            )
        return cls.from_config(stored, session_id=session_id, overrides=overrides, db=db, must_exist=True, **kwargs)

    @classmethod
    def load(cls, db: DBInterface | str, session_id: str, *, model: Model | torch.nn.Module | None = None,
             checkpoint: str | int = "last", checkpoint_db: DBInterface | str | None = None) -> Model | torch.nn.Module:
        """The model of a stored session with its ``"last"``, ``"best"`` or a step's checkpoint weights; no training.

        Built from the config in the record, or pass ``model=`` (see :func:`ptutils.records.load_model`).
        """
        return load_model(db, session_id, model=model, checkpoint=checkpoint, checkpoint_db=checkpoint_db)

    def _take_over(self, record: dict[str, Any]) -> str:
        """Continue an existing record: its name, counters and outcome, and the state to go on from."""
        state = record.get("state")
        self._changes = plan(self.id, record.get("config"), self.config, self._asked,
                             "paused" if state == "running" else str(state))
        self.name = record.get("name", self.name)
        pos = self.position
        pos.attempt = int(record.get("attempt", 1))
        pos.stage = record.get("stage") or pos.stage
        if pos.stage not in self.stages:
            raise SessionError(f"session {self.id!r} is in stage {pos.stage!r}, which this session does not declare")
        pos.step = int(record.get("step", 0))
        self.metrics = dict(record.get("metrics") or {})
        self.outcome = record.get("outcome")
        self.error = record.get("error")
        state = take_over(record, self._status, self.log_event)
        self._needs_restore = state == "paused" and self.model is not None  # without a model there is nothing to restore
        return state

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> str:
        """Lifecycle state: pending, running, paused, complete or failed."""
        return self._lifecycle.state.split(SEP, 1)[0]

    @property
    def machine_state(self) -> str:
        """The state machine's full state: ``running/<stage>`` while running, else the lifecycle state."""
        return self._lifecycle.state

    @property
    def is_running(self) -> bool:
        return self._lifecycle.state.startswith("running")

    @property
    def current_stage(self) -> Stage:
        return self.stages[self.position.stage]

    @property
    def attempt(self) -> int:
        """Which attempt this is (1, then one more at every restart)."""
        return self.position.attempt

    @property
    def stage(self) -> str:
        """The current (or, when not running, the latest) stage's name."""
        return self.position.stage

    @property
    def step(self) -> int:
        """Training steps of this attempt so far, over all stages."""
        return self.position.step

    @property
    def stage_step(self) -> int:
        """Steps (batches) of the current stage so far."""
        return self.position.stage_step

    @property
    def stage_epoch(self) -> int:
        """Epochs of the current stage finished so far."""
        return self.position.stage_epoch

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current epoch taken so far."""
        return self.position.batch_in_epoch

    @property
    def queue(self) -> str | None:
        return self._admission.queue

    @property
    def start_conditions(self) -> list[Callable[[Session], bool]]:
        return self._admission.conditions

    @property
    def record(self) -> dict:
        """The status record as stored now (once this process's pending start has been recorded)."""
        self._writer.await_ahead()
        found = self._status.load()
        if found is None:
            raise SessionError(f"session {self.id!r} has no status record")
        return found

    def _fire(self, trigger: str) -> bool:
        return self._lifecycle.fire(trigger, self)

    def trigger(self, name: str) -> bool:
        """Fire a lifecycle or stage trigger; False when a guard refused it.

        Raises TransitionError (naming state and trigger) when the trigger is
        not allowed in the current state.
        """
        if name in ("pause", "resume", "stop", "complete", "restart", "start"):
            return getattr(self, name)()
        if name == "fail":
            raise TransitionError("fail", self.state, "use session.fail(exception)")
        known = {t.trigger for t in self.stage_transitions}
        if name not in known:
            raise TransitionError(name, self.machine_state,
                                  f"no such trigger (known: {', '.join(sorted(set(LIFECYCLE) | known))})")
        if not self.is_running:
            raise TransitionError(name, self.machine_state, "stage triggers need a running session")
        return self._fire(name)

    def start(self) -> bool:
        """pending -> running (first stage); False, with the blocking reason recorded, if a guard refuses.

        Returns once the record says running (:meth:`run` instead overlaps that
        write with the first steps).
        """
        started = self._fire("start")
        self._writer.await_ahead()
        return started

    def pause(self, reason: str = "requested") -> bool:
        """running -> paused; the loop checkpoints and returns at the next step boundary."""
        self._pause_reason = reason
        return self._fire("pause")

    def request_pause(self, reason: str = "requested") -> None:
        """Ask for a pause at the next step boundary; safe from signal handlers and other threads.

        ``pause()`` itself checkpoints at once, so calling it from a Ctrl-C
        handler could catch the model half-way through a step.
        """
        self._pause_requested = reason
        self._course_changed = True

    def resume(self) -> bool:
        """paused -> running in the stage it was paused in."""
        return self._fire("resume")

    resume = _ClassOrInstance(_resume_stored, resume)

    def stop(self) -> bool:
        """End the session early: -> complete with outcome 'stopped'."""
        return self._end("stop", "stopped", self.error)

    def complete(self) -> bool:
        """running -> complete with outcome 'success'."""
        return self._end("complete", "success", self.error)

    def fail(self, exc: BaseException) -> bool:
        """-> failed, recording the exception type, message and traceback."""
        error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        }
        return self._end("fail", "failure", error)

    def _end(self, trigger: str, outcome: str, error: dict[str, Any] | None) -> bool:
        """Fire an ending trigger with the outcome (and error) its record will show; kept only if it happens."""
        before = self.outcome, self.error
        self.outcome, self.error = outcome, error
        try:
            ended = self._fire(trigger)
        except BaseException:
            self.outcome, self.error = before
            raise
        if not ended:
            self.outcome, self.error = before
        return ended

    def restart(self) -> bool:
        """complete|failed -> pending as a new attempt (history kept, weights reset to the start)."""
        return self._fire("restart")

    # ------------------------------------------------------------------ admission
    def queue_position(self) -> int | None:
        """1 + the number of pending sessions created earlier in the same queue (None without a queue)."""
        if self.queue is None:
            return None
        return self._admission.queue_position(self.record["created"])

    def _start_guard(self, *_: Any) -> bool:
        created = self.record["created"] if self.queue is not None else 0.0
        return self._admission.admits(self, created)

    def wait_to_start(self, *, poll: float = 1.0, timeout: float | None = None) -> bool:
        """Try to start every ``poll`` seconds until the guards (and the queue) let it; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.start():
            if deadline is not None and time.monotonic() + poll > deadline:
                return False
            time.sleep(poll)
        return True

    # ------------------------------------------------------------------ what the lifecycle calls back
    def _record_change(self, change: StateChange) -> None:
        """Write a state change's record (the start's ahead of the loop, any other now, through an outage)."""
        self._hb = None
        change.fields.update(self._progress_fields())
        if change.state != "running":
            change.fields["eta_seconds"] = None
        if change.initial is not None:
            self._record_start(change)
        else:
            self._write_with_retry(change.fields, change.push or None)
        self._course_changed = True

    def _write_with_retry(self, fields: dict[str, Any], push: dict[str, Any] | None) -> None:
        """A state-change write: the loop stalls rather than run ahead of its record (``outage_wait``)."""
        self._through_outage(lambda: self._status.write(fields, push=push), "record state change")

    def _through_outage(self, write: Callable[[], Any], what: str) -> Any:
        return retry_through_outage(write, what=what, wait=self.outage_wait, owner=self.id)

    def _enter_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise SessionError(f"unknown stage {stage!r}")
        self.log_event("stage", stage=stage, previous=self.stage)
        self.position.enter_stage(stage)
        self._loader = None
        self._setup_stage(stage)

    def _setup_stage(self, stage: str) -> None:
        setup = self.stages[stage].setup
        if setup is not None:
            setup(self)

    def _checkpoint_for(self, reason: str) -> None:
        """The checkpoint a state change records (``pause``, ``final``), written through an outage."""
        if self.model is None:
            return
        self._through_outage(lambda: self.save_checkpoint(reason=reason, pinned=reason == "final"),
                             f"write the {reason} checkpoint")

    def _at_checkpoint(self) -> bool:
        """Whether the newest checkpoint holds the state now."""
        return self._checkpointed_at == self.position.mark()

    def _begin_attempt(self) -> tuple[memoryview, dict[str, Any]] | None:
        """Seed, set the first stage up and snapshot the initial state (its checkpoint and info; None without a model)."""
        seed_everything(self.seed)
        self._setup_stage(self.stage)
        self.drain()
        if self.model is None:
            return None
        return serialize(self.state_dict()), self._checkpoint_info("initial", pinned=True)

    def _record_start(self, change: StateChange) -> None:
        """Record the start on the writer thread while the first steps run.

        The initial checkpoint is written *before* the record says running, so a
        record that says running (or paused) always has a checkpoint to resume
        from, and a crash before it leaves an honest ``pending``.  The loop runs
        ahead of that record only until its first background write, state change
        or read of the record, which all wait for it; if it cannot be written the
        start is undone (the session is pending again, with its initial state).
        """
        snapshot, info = change.initial
        mark = self._status.last_event()
        push = change.push or None

        def record_start() -> None:
            # No events before it: until the start is recorded, the steps being run may yet be undone.
            self._through_outage(lambda: self._write_checkpoint(snapshot, info, events_first=False),
                                 "write the initial checkpoint")
            self._write_with_retry({**change.fields, "last_checkpoint": self._checkpointed}, push)

        def undo(exc: BaseException) -> None:
            state = deserialize(snapshot, "the initial state of the start being undone")
            self._lifecycle.set_state("pending")
            self._load_state(state, with_updates=True)
            self._checkpointed_at = None
            self._status.discard_events_after(mark)  # the undone steps' epochs and such
            self._start_error = exc
            log.error("session %s: its start could not be recorded, so it is pending again: %s", self.id, exc)

        self._writer.ahead(record_start, undo)

    def _end_attempt(self, change: StateChange) -> None:
        """A restart: archive this attempt's record, reset the model to its initial checkpoint, count on."""
        summary = archive_attempt(self._status.sessions, self.id, self.attempt, self.record)
        found = self.checkpoints.load_latest(attempt=self.attempt, reason="initial")
        if found is not None:
            state, _ = found
            try:
                self.model.load_state_dict(state["model"])
            except RuntimeError as exc:
                raise SessionError(
                    f"cannot restart session {self.id!r} in place: a stage changed the model's structure "
                    f"({exc}); build a new Session with session_id={self.id!r} and call restart() on it"
                ) from exc
            self.model.grad_clip = state.get("grad_clip")
        self.position.next_attempt(next(iter(self.stages)))
        self.metrics, self.error, self.outcome, self.loss = {}, None, None, None
        self._loader = None
        change.fields.update(
            attempt=self.attempt, previous_attempt=summary["record"], outcome=None, error=None, started=None,
            finished=None, stage=None, step=0, epoch=0, stage_step=0, metrics={}, stage_history=[],
            last_checkpoint=None,
        )
        change.push["history"] = summary
        self._checkpointed = None

    # ------------------------------------------------------------------ tree
    def add_child(self, child: Session) -> None:
        """Attach ``child`` as a sub-session; the link is stored in both records."""
        if child not in self.children:
            self.children.append(child)
        child.parent = self
        child._status.write({"parent_id": self.id})
        self._status.sessions.update(self.id, {"$push": {"children": child.id}})

    # ------------------------------------------------------------------ observations
    def value(self, quantity: Any) -> Any:
        """Current value of a quantity: 'loss', 'grad_norm', a metric name, or a callable."""
        if callable(quantity):
            return quantity(self)
        if quantity == "loss":
            return None if self.loss is None else float(self.loss)
        if quantity == "grad_norm":
            return None if self.model.grad_norm is None else float(self.model.grad_norm)
        if quantity == "lr":
            return self.model.lr
        return self.metrics.get(quantity)

    def log_event(self, kind: str, **data: Any) -> None:
        """Record an event (written with the next status write)."""
        self._status.event(kind, **{"attempt": self.attempt, "step": self.step, "stage": self.stage, **data})

    def events(self, kind: str | None = None) -> list[dict]:
        """Stored events of this session (flushes pending ones first)."""
        self.drain()
        self._status.flush()
        return self._status.load_events(kind)

    def metric_history(self, name: str) -> list[MetricPoint]:
        """Every value metric ``name`` (``train_loss``, ``val_accuracy`` ...) had in this attempt, oldest first.

        Each is a :class:`~ptutils.status.MetricPoint` ``(step, value, stage, epoch)``: the training step it
        was computed after, its value, and the stage and stage epoch it belongs to.
        """
        return metric_history(self.events("metrics"), name, self.attempt)

    def request_data(self, request: Any) -> None:
        """Ask the DataProvider for a new DataLoader; the loop switches at the next step."""
        self.position.data_override = request
        self.position.batch_in_epoch = 0
        self._loader = None
        self._course_changed = True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, RNG, loop position, update states."""
        return capture(self.model, self.position, self.metrics, self.updates)

    def save_checkpoint(self, reason: str = "periodic", pinned: bool = False, *, background: bool = False) -> Any:
        """Checkpoint now: the state is captured at once, then written (blob first, then its record).

        With ``background`` the write happens on the session's writer thread from a
        snapshot and a Future is returned; otherwise the tensors' own memory is
        written (nothing trains meanwhile) and the record is returned once durable.
        """
        state = self.state_dict()
        info = self._checkpoint_info(reason, pinned)
        if background:
            return self._writer.submit(self._write_checkpoint, serialize(state), info)
        self.drain()
        return self._write_checkpoint(serialize_parts(state), info)

    def _checkpoint_info(self, reason: str, pinned: bool) -> dict[str, Any]:
        """A checkpoint record's fields for the state now (which it marks as checkpointed)."""
        pos = self.position
        self._checkpointed_at = pos.mark()
        return dict(pinned=pinned, attempt=pos.attempt, step=pos.step, stage=pos.stage,
                    stage_epoch=pos.stage_epoch, batch_in_epoch=pos.batch_in_epoch, reason=reason,
                    metrics=finite_metrics(self.metrics))

    def _write_checkpoint(self, data: BlobData, info: dict[str, Any], *, events_first: bool = True) -> dict:
        """Write a checkpoint; buffered events go first, as a resume starts after this checkpoint.

        It is not logged as an event (the checkpoints collection is that log):
        the record's ``last_checkpoint`` shows it from the next status write on.
        """
        if events_first:
            self._status.try_flush()
        record = self.checkpoints.write(data, **info)
        self._checkpointed = _checkpoint_summary(record)
        return record

    def drain(self, *, raise_errors: bool = True) -> None:
        """Wait for every queued background write; raise the first failure.

        A write lost to an unreachable database (BackendUnavailableError) is
        logged and counted as an outage, not raised: checkpoints are periodic
        and heartbeats carry no history, so the run can go on.
        """
        self._writer.drain(raise_errors=raise_errors)

    def _load_state(self, state: Mapping[str, Any], *, with_updates: bool) -> None:
        self.metrics = restore(state, self.model, self.position, self.updates, with_updates=with_updates)
        self._loader = None
        self.loss = None  # observations of the abandoned steps must not reach later updates
        self._course_changed = True

    def restore_checkpoint(self, *, with_updates: bool = False) -> dict:
        """Go back to the newest good checkpoint of this attempt (the last stable state).

        Update states are kept by default, so a monitor that restores does not
        forget that it did.
        """
        self.drain()
        found = self.checkpoints.load_latest(attempt=self.attempt)
        if found is None:
            raise CheckpointError(f"session {self.id!r} has no usable checkpoint to restore")
        state, record = found
        self._load_state(state, with_updates=with_updates)
        apply_values(self.model, record.get("apply"))
        self.log_event("restore", checkpoint=record["_id"], restored_step=record["step"])
        return record

    def _restore_for_resume(self) -> None:
        """Exact resume (see :mod:`ptutils.position`): the checkpoint, the stage setups, the state."""
        state, record = resume_from(self.checkpoints, self.attempt, self.id)
        history = [h["stage"] for h in self.record.get("stage_history") or []]
        for stage in stages_to_replay(history, record["stage"]):
            if stage in self.stages:
                self._setup_stage(stage)
        self._load_state(state, with_updates=True)
        apply_values(self.model, record.get("apply"))  # a clone's hyperparameters, over the donor's
        self._needs_restore = False
        dropped = self._status.drop_stored_after(record.get("attempt", self.attempt), record["step"])  # run again
        self.log_event("resume", checkpoint=record["_id"], restored_step=record["step"], dropped_events=dropped)
        self._take_config_changes()

    def _take_config_changes(self) -> None:
        """Put the config changes taken when attaching into effect (after any restore) and record them."""
        changes, self._changes = self._changes, None
        if changes is None:
            return
        if self.model is not None:
            changes.apply(self.model)
        entry = changes.entry(attempt=self.attempt, stage=self.stage, step=self.step) if changes.fields else None
        self._status.write({"config": changes.config}, push={"config_changes": entry} if entry else None)
        if entry is not None:
            self.log_event("config_change", fields=entry["fields"])

    # ------------------------------------------------------------------ the loop
    def run(self, *, until_step: int | None = None) -> Session:
        """Run (or resume) until the session is complete, failed or paused; returns self.

        With ``until_step`` it also pauses (reason ``"until step N"``, with a
        checkpoint) once ``step`` reaches N in a training stage, after the epoch
        that step ends (its metrics and updates) when it is an epoch's last; a
        session that would finish there completes instead.  Tuning runs its
        children this way, one perturbation interval at a time.

        An exception from a step or an update moves the session to ``failed``
        with its traceback recorded, then propagates.  Ctrl-C or SIGTERM (in the
        main thread, see :mod:`ptutils.signals`) pauses at the next step boundary,
        then raises :class:`~ptutils.errors.Interrupted`; a second one, or a
        KeyboardInterrupt or SystemExit from elsewhere, stops at once and leaves
        the session paused (interrupted), to resume from its newest checkpoint.
        """
        if self.model is None:
            raise SessionError(f"session {self.id!r} has no model, so it has no loop to run: "
                               "drive it with start(), heartbeat() and complete()")
        if until_step is not None and (not isinstance(until_step, int) or isinstance(until_step, bool)):
            raise SessionError(f"until_step must be a step number (int), got {until_step!r}")
        if until_step is not None and self.state == "paused" and self.step >= until_step:
            return self  # already there: resuming would only pause again
        if self.state == "pending":
            if not self._fire("start"):
                return self
        elif self.state == "paused":
            if self._needs_restore:
                self._restore_for_resume()
            self.resume()
        elif self.state != "running":
            raise TransitionError("run", self.state, "restart() it first")
        signals = PauseOnSignals(self)
        try:
            with signals:
                self._loop(-1 if until_step is None else until_step)
                self.drain()
        except BaseException as exc:
            if exc is self._start_error:
                pass  # the start was undone: the session is pending, as its record says
            elif not isinstance(exc, Exception):
                if self.is_running:
                    self._abort(exc)
            elif isinstance(exc, BackendUnavailableError):
                log.error("session %s stopped: the database stayed unreachable: %s", self.id, exc)
            elif self.state in ("running", "paused", "pending"):
                try:
                    self.fail(exc)
                except StorageError as store_exc:
                    log.error("session %s failed (%s) and the failure could not be recorded: %s", self.id, exc, store_exc)
            raise
        signals.raise_if_paused()
        return self

    def _abort(self, exc: BaseException) -> None:
        """Stop at once, between checkpoints: record paused (interrupted), as a crash is taken over.

        No checkpoint is written; writes already queued land first, so the
        record names the newest checkpoint, which the next ``run()`` resumes from.
        """
        try:
            self.drain(raise_errors=False)
        except Exception:
            return  # the start could not be recorded and was undone: pending, as its record says
        self._pause_requested = None
        self._hb = None
        self._lifecycle.set_state("paused")
        self._needs_restore = True
        reason = abort_reason(exc, self.step)
        try:
            mark_interrupted(self._status, self.log_event, reason, eta_seconds=None, last_checkpoint=self._checkpointed)
        except StorageError as store_exc:  # the record still says running: stale, it reads as interrupted
            log.error("session %s: %s, and the abort could not be recorded: %s", self.id, reason, store_exc)
        self._status.end_run()

    def _get_loader(self) -> Any:
        if self._loader is not None:
            return self._loader
        stage = self.current_stage
        override = self.position.data_override
        request = override if override is not None else stage.data
        if callable(request):
            request = request(self)
        if self.data is None:
            raise SessionError(f"stage {stage.name!r} needs data but the session has no DataProvider")
        self._loader = self.data.get_dataloader(request)
        try:
            self._loader_len = len(self._loader)
        except TypeError:
            self._loader_len = None
        return self._loader

    def _budget_left(self, stage: Stage) -> bool:
        pos = self.position
        if stage.max_steps is not None and pos.stage_step >= stage.max_steps:
            return False
        if stage.max_epochs is not None and pos.stage_epoch >= stage.max_epochs:
            return False
        return True

    def _finish_stage(self) -> None:
        if self.position.batch_in_epoch:  # the budget ended an epoch part-way: its steps' means still count
            self._store_epoch_metrics(self.current_stage, self.stage_epoch + 1)
        for t in self._stage_done[self.stage]:
            if t.guards_hold(self) and self._fire(STAGE_DONE):
                return
        self.complete()

    def _loop(self, until: int) -> None:
        updates = self.updates
        pos = self.position
        model = self.model
        while self.is_running:
            self._course_changed = False  # before the check: a request from a signal handler is never lost
            if self._pause_requested is not None:
                reason, self._pause_requested = self._pause_requested, None
                self.pause(reason=reason)
                break
            stage = self.current_stage
            if not self._budget_left(stage):
                self._finish_stage()
                continue
            if 0 <= until <= pos.step and stage.mode == "train":
                self.pause(reason=f"until step {until}")
                break
            loader = self._get_loader()
            train = stage.mode == "train"
            step_fn = model.train_step if train else self._eval_batch
            polled = self._polled[stage.name]
            max_steps = stage.max_steps
            every = self.checkpoint_every_steps
            status = self._status
            step_scheduler = train and model.steps_scheduler_every("step")
            finished_epoch = True
            if pos.batch_in_epoch == 0:
                if train:
                    pos.train_means.reset()
                else:
                    pos.eval_sums, pos.eval_count = {}, 0
            means = pos.train_means
            losses = means.values["loss"]
            step_metrics = train and bool(model.train_metrics and model.metrics)
            fold_at = FOLD
            for batch in pos.iterate(loader, self.id):
                self.loss = step_fn(batch)
                pos.batch_in_epoch += 1
                pos.stage_step += 1
                if train:
                    pos.step += 1
                    losses.append(self.loss)
                    if step_metrics:
                        means.add(model.step_metrics)
                    if len(losses) >= fold_at:
                        means.fold()
                    if pos.step == until and pos.batch_in_epoch != self._loader_len:
                        self._course_changed = True  # the epoch's last step instead ends its epoch first
                self.event = "step"
                if step_scheduler:
                    model.step_scheduler(self.metrics)
                if updates:
                    self._run_updates()
                for t in polled:
                    if self._course_changed:
                        break
                    if t.guards_hold(self):
                        self._fire(t.trigger)
                if every is not None and train and pos.step % every == 0 and not self._course_changed:
                    self._periodic_checkpoint()
                if status.due():
                    self._heartbeat()
                if self._course_changed or (max_steps is not None and pos.stage_step >= max_steps):
                    finished_epoch = False
                    break
            if finished_epoch and self.is_running and pos.stage == stage.name:
                self._end_epoch(stage)
        self._status.try_flush()  # an unreachable database keeps them buffered, as background writes do

    def _end_epoch(self, stage: Stage) -> None:
        pos = self.position
        pos.stage_epoch += 1
        pos.batch_in_epoch = 0
        epoch = pos.stage_epoch
        self._store_epoch_metrics(stage, epoch)
        if stage.mode == "train" and self.model.steps_scheduler_every("epoch"):
            self.model.step_scheduler(self.metrics)
        self.event = "epoch"
        self._course_changed = False
        self._run_updates()
        self.event = "step"
        # Logged even when an update just changed the stage: the epoch's metrics belong to its stage.
        self.log_event("epoch", stage=stage.name, stage_epoch=epoch, metrics=dict(self.metrics))
        if not self.is_running or self._course_changed:
            return
        if self.checkpoint_every_epochs and pos.stage_epoch % self.checkpoint_every_epochs == 0:
            self._periodic_checkpoint()
        if self._status.due():
            self._heartbeat()

    def _store_epoch_metrics(self, stage: Stage, epoch: int) -> None:
        """Store and log the means of the stage's epoch ``epoch``: ``{stage}_loss``, ``{stage}_<metric>``."""
        if stage.mode == "eval":
            values = self._store_eval_metrics(stage.name)
        else:
            values = self.position.train_means.take(stage.name)
            self.metrics.update(values)
        if values:
            self.log_event("metrics", metrics=values, stage_epoch=epoch)

    def _run_updates(self) -> None:
        """Call the updates in order; one that changes course ends this round."""
        for update in self.updates:
            if update(self) not in (self, None):
                raise SessionError(f"update {update!r} must return the session (or None)")
            if self._course_changed:
                break

    def _periodic_checkpoint(self) -> None:
        if self.loss is not None and not math.isfinite(float(self.loss)):
            log.warning("session %s: not checkpointing a non-finite state at step %d", self.id, self.step)
            return
        self.save_checkpoint(background=True)

    # ------------------------------------------------------------------ evaluation
    def _eval_batch(self, batch: Any) -> torch.Tensor:
        loss, values = self.model.eval_step(batch)
        self._accumulate("loss", loss)
        for name, value in values.items():
            self._accumulate(name, value)
        self.position.eval_count += 1
        return loss

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        sums = self.position.eval_sums
        prev = sums.get(name)
        sums[name] = value if prev is None else prev + value

    def _store_eval_metrics(self, prefix: str) -> dict[str, float]:
        pos = self.position
        count = max(pos.eval_count, 1)
        values = {f"{prefix}_{name}": float(total) / count for name, total in pos.eval_sums.items()}
        self.metrics.update(values)
        pos.eval_sums, pos.eval_count = {}, 0
        return values

    def evaluate(self, request: Any, *, prefix: str = "val") -> dict[str, float]:
        """Run the model over a whole DataLoader from the provider; store ``{prefix}_loss`` etc.

        Uses no global randomness, so evaluating does not change the training run.
        """
        if self.data is None or self.model is None:
            raise SessionError("evaluate() needs a model and a DataProvider")
        loader = self.data.get_dataloader(request)
        pos = self.position
        saved_sums, saved_count = pos.eval_sums, pos.eval_count
        pos.eval_sums, pos.eval_count = {}, 0
        rng = torch.get_rng_state()
        try:
            for batch in loader:
                self._eval_batch(batch)
            values = self._store_eval_metrics(prefix)
        finally:
            torch.set_rng_state(rng)
            pos.eval_sums, pos.eval_count = saved_sums, saved_count
        self.log_event("metrics", metrics=values, stage_epoch=pos.stage_epoch)
        return values

    # ------------------------------------------------------------------ status
    def _progress_fields(self) -> dict[str, Any]:
        done = self.state == "complete" and self.outcome == "success"
        return progress_fields(
            self.position, stages=list(self.stages), total=self.stage_total(self.current_stage), done=done,
            metrics=self.metrics, last_checkpoint=self._checkpointed,
        )

    def stage_total(self, stage: Stage) -> int | None:
        """Steps the stage's budget allows (None when unbounded or the loader has no length)."""
        return steps_allowed(stage.max_steps, stage.max_epochs, self._loader_len)

    def _heartbeat(self) -> None:
        """Queue a progress write; act on the record the previous one read (a long outage, a pause request)."""
        if self._writer.ahead_pending:
            return  # the start is still being written: beat at the first step after it, without waiting
        self._status.schedule()
        previous = self._hb
        if previous is not None:
            if not previous.done():
                return  # the database is slow: skip this beat rather than queue up
            self._hb = None
            record = previous.result()
            overdue = self._outage.overdue(self.outage_pause_after)
            if overdue is not None and self.is_running:
                log.error("session %s: pausing: %s", self.id, overdue)
                self.error = {"type": "BackendUnavailableError", "message": overdue, "traceback": None}
                self.pause(reason=overdue)
            if not self.is_running:
                return
            requested = pause_request(record)
            if requested is not None:
                self.pause(reason=requested)
                return
        self._hb = self._writer.submit(
            self._status.heartbeat, self._progress_fields(), self.stage_step, self.stage_total(self.current_stage)
        )

    def heartbeat(self) -> dict:
        """Write the record's progress and heartbeat now: a session without a loop shows it is alive this way.

        Returns the record; a pause requested through it (``request_pause``) is for
        the caller to honour.
        """
        self._writer.await_ahead()
        return self._status.write(self._progress_fields())

    def close(self) -> None:
        """Flush buffered events and close the databases this session opened from URLs."""
        try:
            self.drain()
            self._status.flush()
        finally:
            self._writer.close()
            for db in self._owned:
                db.close()
            self._owned.clear()

    def graph(self) -> str:
        """The state graph as Mermaid text (no graphviz needed): ``ptutils graph`` prints it."""
        from .graph import mermaid

        return mermaid(list(self.stages.values()), self.stage_transitions, self.machine_state)

    def __repr__(self) -> str:
        return f"<Session {self.id} state={self.machine_state} step={self.step}>"
