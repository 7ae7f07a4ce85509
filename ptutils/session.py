"""Session: an experiment as an explicit finite state machine, and the thin loop that drives it.

The machine (built on ``transitions``) has the lifecycle states ``pending``,
``running`` (with the user's stages as sub-states), ``paused``, ``complete``
and ``failed``; see :mod:`ptutils.stages`.  :meth:`Session.run` repeats: take a
batch from the current stage's DataLoader, step the :class:`~ptutils.model.Model`,
call the updates (``update(session) -> session``).  Updates and polled guards
change the course by firing triggers; every state change is written to the
status record before it takes effect.  The per-step path touches no FSM and no
database: status writes are throttled by time and checkpoints are periodic.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transitions import MachineError
from transitions.extensions.nesting import HierarchicalMachine

from . import status as status_mod
from .checkpoint import (
    CheckpointStore, deserialize, rng_state, seed_everything, serialize, serialize_parts, set_rng_state,
)
from .config import Config, build
from .data import DataProvider, set_loader_position
from .database import BlobData, DBInterface, backend_for, check_id, open_db
from .errors import (
    BackendUnavailableError, CheckpointError, ConfigError, SessionError, StorageError, TransitionError,
)
from .model import Model
from .stages import (
    LIFECYCLE,
    STAGE_DONE,
    SEP,
    StageState,
    Stage,
    StageTransition,
    machine_states,
    machine_transitions,
    parse_transitions,
)
from .status import StatusWriter
from .update import Update

log = logging.getLogger("ptutils")

DEFAULT_DIR = "ptutils-runs"
"""Where sessions keep their records when no database is given: ./ptutils-runs (filesystem backend)."""


def default_db_url() -> str:
    """``file://`` URL of :data:`DEFAULT_DIR` under the current directory."""
    return Path(DEFAULT_DIR).resolve().as_uri()


class _Machine(HierarchicalMachine):
    state_cls = StageState


class _Lifecycle:
    """The object ``transitions`` drives; the Session keeps it private so its API stays ours."""

    state: str


def _checkpoint_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a session's record shows of its newest checkpoint."""
    return {"id": record["_id"], "step": record["step"], "reason": record["reason"], "time": record["created"]}


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40].strip("-_.")
    return keep or "session"


class Session:
    """One experiment: a Model, a DataProvider and a DBInterface, driven as a state machine.

    Give ``session_id`` to attach to an existing record (resume in a new
    process); otherwise a new id is made from ``name``.  ``checkpoint_db``
    keeps checkpoints apart from the records (e.g. records on a server,
    checkpoints in a local directory).
    """

    def __init__(
        self,
        model: Model,
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
        status_interval: float = 2.0,
        start_conditions: Sequence[Callable[[Session], bool]] = (),
        queue: str | None = None,
        outage_pause_after: float = 60.0,
        outage_wait: float = 300.0,
        parent: Session | None = None,
        config: Config | None = None,
        metadata: Mapping[str, Any] | None = None,
    ):
        if not isinstance(model, Model):
            raise SessionError(f"model must be a ptutils.model.Model, got {type(model).__name__}")
        self.model = model
        self.data = data
        self.name = name
        self.seed = seed
        self.config = config
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
        self.model.track_grad_norm = any(getattr(u, "needs_grad_norm", False) for u in self.updates)
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_every_epochs = checkpoint_every_epochs
        self.start_conditions = list(start_conditions)
        self.queue = queue
        self.outage_pause_after = outage_pause_after
        self.outage_wait = outage_wait
        self._outage_since: float | None = None
        self._outage_error: str | None = None

        self.id = check_id(session_id) if session_id else f"{_slug(name)}-{uuid.uuid4().hex[:10]}"
        if len(self.id) > 80:
            raise SessionError(f"session id {self.id!r} is longer than 80 characters")
        self._owned: list[DBInterface] = []
        self.db = self._open(db or default_db_url())
        ckpt_db = self._open(checkpoint_db) if checkpoint_db is not None else self.db
        self._status = StatusWriter(self.db, self.id, interval=status_interval)
        self.checkpoints = CheckpointStore(
            ckpt_db, self.id, keep=keep_checkpoints, on_warning=lambda m: self.log_event("warning", message=m)
        )

        # Loop position and observations.
        self.attempt = 1
        self.stage: str = next(iter(self.stages))
        self.step = 0
        self.stage_step = 0
        self.stage_epoch = 0
        self.batch_in_epoch = 0
        self.loss: torch.Tensor | None = None
        self.metrics: dict[str, float] = {}
        self.event = "step"
        self.error: dict[str, Any] | None = None
        self.outcome: str | None = None
        self.parent = parent
        self.children: list[Session] = []

        self._interrupt = False
        self._pause_reason = "requested"
        self._pause_requested: str | None = None
        self._last_checkpoint: tuple | None = None
        self._checkpointed: dict[str, Any] | None = None
        """The newest checkpoint written, as the record shows it (``last_checkpoint``)."""
        self._loader: Any = None
        self._data_override: Any = None
        self._pending_rng: Mapping[str, Any] | None = None
        self._needs_restore = False
        self._eval_sums: dict[str, torch.Tensor] = {}
        self._eval_count = 0
        self._loader_len: int | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._hb: Future | None = None
        self._ahead: Future | None = None  # the start's record, written on the writer thread
        self._start_snapshot: memoryview | None = None
        self._start_mark = 0
        self._start_error: BaseException | None = None

        self._fsm = _Lifecycle()
        record = self._status.load()
        initial = "pending" if record is None else self._initial_from_record(record)
        self._machine = _Machine(
            model=self._fsm,
            states=machine_states(list(self.stages.values())),
            transitions=machine_transitions(
                list(self.stages.values()),
                self.stage_transitions,
                start_conditions=[self._start_guard],
                write_ahead=self._write_ahead_callback,
                stage_is=lambda name: (lambda *_a, **_k: self.stage == name),
            ),
            initial=initial,
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )
        self._polled: dict[str, list[StageTransition]] = {s: [] for s in self.stages}
        self._stage_done: dict[str, list[StageTransition]] = {s: [] for s in self.stages}
        for t in self.stage_transitions:
            for src in t.sources:
                if t.polled:
                    self._polled[src].append(t)
                if t.trigger == STAGE_DONE:
                    self._stage_done[src].append(t)
        if record is None:
            self._status.create(self._initial_record())
            if parent is not None:
                parent.add_child(self)
        elif parent is not None and self not in parent.children:
            parent.children.append(self)

    # ------------------------------------------------------------------ construction
    def _open(self, db: DBInterface | str) -> DBInterface:
        if isinstance(db, DBInterface):
            return db
        opened = open_db(db)
        self._owned.append(opened)
        return opened

    @classmethod
    def from_config(cls, config: Config | Mapping[str, Any], *, session_id: str | None = None, **overrides: Any) -> Session:
        """Build a session (model, data, updates, stages) from a Config or its dict."""
        cfg = config if isinstance(config, Config) else Config.from_dict(config)
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
        kwargs: dict[str, Any] = dict(
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
            status_interval=cfg.status_interval,
            config=cfg,
            metadata=cfg.metadata,
        )
        kwargs.update(overrides)
        return cls(model, data, session_id=session_id, **kwargs)

    def _initial_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "session",
            "parent_id": self.parent.id if self.parent is not None else None,
            "children": [],
            "attempt": self.attempt,
            "previous_attempt": None,
            "history": [],
            "state": "pending",
            "stage": None,
            "stages": [s.name for s in self.stages.values()],
            "step": 0,
            "epoch": 0,
            "stage_step": 0,
            "progress": 0.0,
            "stage_progress": 0.0,
            "eta_seconds": None,
            "started": None,
            "finished": None,
            "outcome": None,
            "error": None,
            "blocked_by": None,
            "queue": self.queue,
            "queue_position": None,
            "metrics": {},
            "seed": self.seed,
            "config": self.config.to_dict() if self.config is not None else None,
            "metadata": self.metadata,
            "control": {"pause": False},
        }

    def _initial_from_record(self, record: Mapping[str, Any]) -> str:
        """Take over an existing record: state, stage and counters; a dead 'running' becomes paused."""
        self.name = record.get("name", self.name)
        self.attempt = int(record.get("attempt", 1))
        self.stage = record.get("stage") or self.stage
        if self.stage not in self.stages:
            raise SessionError(f"session {self.id!r} is in stage {self.stage!r}, which this session does not declare")
        self.step = int(record.get("step", 0))
        self.metrics = dict(record.get("metrics") or {})
        self.outcome = record.get("outcome")
        self.error = record.get("error")
        state = record.get("state")
        if state == "running":
            if not status_mod.is_stale(record):
                raise SessionError(
                    f"session {self.id!r} is running in process {record.get('pid')} on {record.get('host')} "
                    f"(heartbeat {time.time() - float(record.get('heartbeat') or 0):.1f}s ago)"
                )
            self._status.write({"state": "paused", "interrupted": True, "pause_reason": "interrupted"})
            self.log_event("interrupted")
            state = "paused"
        if state == "paused":
            self._needs_restore = True
            return "paused"
        if state in ("pending", "complete", "failed"):
            return state
        raise SessionError(f"session {self.id!r} has an unknown state {state!r} in its record")

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> str:
        """Lifecycle state: pending, running, paused, complete or failed."""
        return self._fsm.state.split(SEP, 1)[0]

    @property
    def is_running(self) -> bool:
        return self._fsm.state.startswith("running")

    @property
    def current_stage(self) -> Stage:
        return self.stages[self.stage]

    @property
    def record(self) -> dict:
        """The status record as stored now (once this process's pending start has been recorded)."""
        self._await_start()
        found = self._status.load()
        if found is None:
            raise SessionError(f"session {self.id!r} has no status record")
        return found

    def _fire(self, trigger: str) -> bool:
        try:
            return bool(self._fsm.trigger(trigger, self))
        except MachineError as exc:
            raise TransitionError(trigger, self._fsm.state) from exc

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
            raise TransitionError(name, self._fsm.state, f"no such trigger (known: {', '.join(sorted(set(LIFECYCLE) | known))})")
        if not self.is_running:
            raise TransitionError(name, self._fsm.state, "stage triggers need a running session")
        return self._fire(name)

    def start(self) -> bool:
        """pending -> running (first stage); False, with the blocking reason recorded, if a guard refuses.

        Returns once the record says running (:meth:`run` instead overlaps that
        write with the first steps).
        """
        started = self._fire("start")
        self._await_start()
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
        self._interrupt = True

    def resume(self) -> bool:
        """paused -> running in the stage it was paused in."""
        return self._fire("resume")

    def stop(self) -> bool:
        """End the session early: -> complete with outcome 'stopped'."""
        self.outcome = "stopped"
        return self._fire("stop")

    def complete(self) -> bool:
        """running -> complete with outcome 'success'."""
        self.outcome = "success"
        return self._fire("complete")

    def fail(self, exc: BaseException) -> bool:
        """-> failed, recording the exception type, message and traceback."""
        self.error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        }
        self.outcome = "failure"
        return self._fire("fail")

    def restart(self) -> bool:
        """complete|failed -> pending as a new attempt (history kept, weights reset to the start)."""
        return self._fire("restart")

    # ------------------------------------------------------------------ write-ahead
    def queue_position(self) -> int | None:
        """1 + the number of pending sessions created earlier in the same queue (None without a queue)."""
        if self.queue is None:
            return None
        created = self.record["created"]
        ahead = self._status.sessions.count({
            "queue": self.queue,
            "state": "pending",
            "$or": [{"created": {"$lt": created}}, {"created": created, "_id": {"$lt": self.id}}],
        })
        return ahead + 1

    def _start_guard(self, *_: Any) -> bool:
        position = self.queue_position()
        if position is not None and position > 1:
            self._status.write({
                "blocked_by": f"waiting in queue {self.queue!r} behind {position - 1} session(s)",
                "queue_position": position,
            })
            return False
        for cond in self.start_conditions:
            try:
                ok = cond(self)
                reason = None if ok else f"start condition {getattr(cond, '__name__', cond)!r} is not met"
            except Exception as exc:  # a failing guard is a blocking reason, not a crash
                ok, reason = False, f"{type(exc).__name__}: {exc}"
            if not ok:
                self._status.write({"blocked_by": reason, "queue_position": position})
                return False
        return True

    def wait_to_start(self, *, poll: float = 1.0, timeout: float | None = None) -> bool:
        """Try to start every ``poll`` seconds until the guards (and the queue) let it; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.start():
            if deadline is not None and time.monotonic() + poll > deadline:
                return False
            time.sleep(poll)
        return True

    def _write_ahead_callback(self, trigger: str, dest: str) -> Callable:
        def write_ahead(*_: Any, **__: Any) -> None:
            self._write_ahead(trigger, dest)

        return write_ahead

    def _write_ahead(self, trigger: str, dest: str) -> None:
        """Record a state change before it happens; an exception here cancels the change."""
        self.drain(raise_errors=trigger != "fail")
        self._hb = None
        state, _, stage = dest.partition(SEP)
        fields: dict[str, Any] = {"state": state, "last_trigger": trigger}
        push: dict[str, Any] = {}
        now = time.time()
        if stage and stage != self.stage:
            push["stage_history"] = {"stage": stage, "from": self.stage if self.state == "running" else None,
                                     "step": self.step, "time": now, "trigger": trigger}
            self._enter_stage(stage)
        elif stage and trigger == "start":
            push["stage_history"] = {"stage": stage, "from": None, "step": self.step, "time": now, "trigger": trigger}
        if stage:
            fields["stage"] = stage
        initial = None
        if trigger == "start":
            initial = self._begin_attempt()
            fields.update(started=now, blocked_by=None, queue_position=None, interrupted=False)
        if trigger in ("resume", "start"):
            fields["control.pause"] = False  # a request that reached a session not running is void
        if trigger == "resume":
            self.error = None
            fields.update(interrupted=False, pause_reason=None, error=None)
        if trigger == "pause":
            reason = getattr(self, "_pause_reason", "requested")
            if self.state == "running":
                self._retrying_outage(lambda: self.save_checkpoint(reason="pause"))
            fields.update(pause_reason=reason, error=self.error, **{"control.pause": False})
        if state == "complete" and self.state == "running" and self._last_checkpoint != self._position():
            self.save_checkpoint(reason="final", pinned=True)  # the trained weights outlive the process
        if state in ("complete", "failed"):
            fields.update(finished=now, outcome=self.outcome, error=self.error)
        if trigger == "restart":
            self._archive_attempt(fields)
        fields.update(self._progress_fields())
        if state != "running":
            fields["eta_seconds"] = None
        if initial is not None:
            self._defer_start(initial, fields, push or None)
        else:
            self._write_with_retry(fields, push or None)
        self._interrupt = True
        log.info("session %s: %s -> %s", self.id, self._fsm.state, dest)

    def _write_with_retry(self, fields: dict[str, Any], push: dict[str, Any] | None) -> None:
        """A state-change write: retried with backoff while the database is unreachable.

        The loop stalls rather than run ahead of its record; after
        ``outage_wait`` seconds the BackendUnavailableError propagates.
        """
        self._retrying_outage(lambda: self._status.write(fields, push=push), "record state change")

    def _enter_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise SessionError(f"unknown stage {stage!r}")
        self.log_event("stage", stage=stage, previous=self.stage)
        self.stage = stage
        self.stage_step = self.stage_epoch = self.batch_in_epoch = 0
        self._data_override = None
        self._loader = None
        self._setup_stage(stage)

    def _setup_stage(self, stage: str) -> None:
        setup = self.stages[stage].setup
        if setup is not None:
            setup(self)

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

    def request_data(self, request: Any) -> None:
        """Ask the DataProvider for a new DataLoader; the loop switches at the next step."""
        self._data_override = request
        self._loader = None
        self.batch_in_epoch = 0
        self._interrupt = True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, RNG, loop position, update states."""
        return {
            "model": self.model.state_dict(),
            "grad_clip": self.model.grad_clip,
            "rng": rng_state(),
            "loop": {
                "attempt": self.attempt,
                "stage": self.stage,
                "step": self.step,
                "stage_step": self.stage_step,
                "stage_epoch": self.stage_epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "data_override": self._data_override if isinstance(self._data_override, (str, dict)) else None,
                "eval_sums": dict(self._eval_sums),
                "eval_count": self._eval_count,
            },
            "metrics": dict(self.metrics),
            "updates": [u.state_dict() if hasattr(u, "state_dict") else None for u in self.updates],
        }

    def save_checkpoint(self, reason: str = "periodic", pinned: bool = False, *, background: bool = False) -> Any:
        """Checkpoint now: the state is captured at once, then written (blob first, then its record).

        With ``background`` the write happens on the session's writer thread from a
        snapshot and a Future is returned; otherwise the tensors' own memory is
        written (nothing trains meanwhile) and the record is returned once durable.
        """
        state = self.state_dict()
        info = self._checkpoint_info(reason, pinned)
        if background:
            return self._submit(self._write_checkpoint, serialize(state), info)
        self.drain()
        return self._write_checkpoint(serialize_parts(state), info)

    def _checkpoint_info(self, reason: str, pinned: bool) -> dict[str, Any]:
        """A checkpoint record's fields for the state now (which it marks as checkpointed)."""
        self._last_checkpoint = self._position()
        return dict(pinned=pinned, attempt=self.attempt, step=self.step, stage=self.stage,
                    stage_epoch=self.stage_epoch, batch_in_epoch=self.batch_in_epoch, reason=reason)

    def _position(self) -> tuple:
        return (self.attempt, self.stage, self.stage_step, self.step)

    def _retrying_outage(self, write: Callable[[], Any], what: str = "write checkpoint") -> None:
        """Run a write the record depends on, retried with backoff while the database is unreachable.

        State changes and the checkpoints a record will point to wait out an
        outage for ``outage_wait`` seconds, then the BackendUnavailableError propagates.
        """
        deadline = time.monotonic() + self.outage_wait
        delay = 0.2
        while True:
            try:
                write()
                return
            except BackendUnavailableError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("session %s: cannot %s (%s); retrying in %.1fs", self.id, what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

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

    # ------------------------------------------------------------------ storage outages
    def _storage_outage(self, exc: BaseException) -> None:
        """Note a background write lost to an unreachable database; pause if it lasts too long."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        self._outage_error = f"{type(exc).__name__}: {exc}"
        log.warning("session %s: background write failed, database unreachable: %s", self.id, exc)

    def _storage_healthy(self) -> None:
        self._outage_since = None
        self._outage_error = None

    def _check_outage(self) -> None:
        """Pause (recording why, once the database answers again) after a long outage."""
        since = self._outage_since
        if since is None and self._status.outage_since is not None:
            since = self._status.outage_since
            self._outage_error = self._status.last_error
        if since is None or time.monotonic() - since < self.outage_pause_after or not self.is_running:
            return
        reason = f"storage outage for {time.monotonic() - since:.0f}s: {self._outage_error}"
        log.error("session %s: pausing: %s", self.id, reason)
        self.error = {"type": "BackendUnavailableError", "message": reason, "traceback": None}
        self.pause(reason=reason)

    # ------------------------------------------------------------------ background writes
    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue a write on the session's one writer thread (writes stay in order, after the start's record)."""
        self._await_start()
        self._reap()
        future = self._writer_pool().submit(fn, *args)
        self._pending.append(future)
        return future

    def _writer_pool(self) -> ThreadPoolExecutor:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptutils-writer")
        return self._writer

    def _reap(self) -> None:
        """Drop finished writes; a failed one raises here, in the loop, so the session fails."""
        if not self._pending:
            return
        done = [f for f in self._pending if f.done()]
        if done:
            self._pending = [f for f in self._pending if not f.done()]
            for future in done:
                try:
                    future.result()
                except BackendUnavailableError as exc:
                    self._storage_outage(exc)

    def drain(self, *, raise_errors: bool = True) -> None:
        """Wait for every queued background write; raise the first failure.

        A write lost to an unreachable database (BackendUnavailableError) is
        logged and counted as an outage, not raised: checkpoints are periodic
        and heartbeats carry no history, so the run can go on.
        """
        self._await_start()
        pending, self._pending = self._pending, []
        errors = []
        for future in pending:
            try:
                future.result()
            except BackendUnavailableError as exc:
                self._storage_outage(exc)
            except Exception as exc:
                errors.append(exc)
        for exc in errors[1:]:
            log.error("session %s: another background write failed too: %s", self.id, exc)
        if errors:
            if raise_errors:
                raise errors[0]
            log.error("session %s: background write failed: %s", self.id, errors[0])

    def _load_state(self, state: Mapping[str, Any], *, with_updates: bool) -> None:
        self.model.load_state_dict(state["model"])
        self.model.grad_clip = state.get("grad_clip")
        loop = state["loop"]
        self.attempt = loop["attempt"]
        self.stage = loop["stage"]
        self.step, self.stage_step = loop["step"], loop["stage_step"]
        self.stage_epoch, self.batch_in_epoch = loop["stage_epoch"], loop["batch_in_epoch"]
        self._data_override = loop.get("data_override")
        self._eval_sums, self._eval_count = dict(loop.get("eval_sums") or {}), loop.get("eval_count", 0)
        self.metrics = dict(state.get("metrics") or {})
        if with_updates:
            for update, saved in zip(self.updates, state.get("updates") or []):
                if saved is not None and hasattr(update, "load_state_dict"):
                    update.load_state_dict(saved)
        self._pending_rng = state["rng"]
        self._loader = None
        self.loss = None  # observations of the abandoned steps must not reach later updates
        self.model.grad_norm = None
        self._interrupt = True

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
        self.log_event("restore", checkpoint=record["_id"], restored_step=record["step"])
        return record

    # ------------------------------------------------------------------ lifecycle helpers
    def _begin_attempt(self) -> tuple[memoryview, dict[str, Any]]:
        """Seed, set the first stage up and snapshot the initial state (its checkpoint and info)."""
        seed_everything(self.seed)
        self._setup_stage(self.stage)
        self.drain()
        return serialize(self.state_dict()), self._checkpoint_info("initial", pinned=True)

    def _defer_start(self, initial: tuple[memoryview, dict[str, Any]], fields: dict[str, Any],
                     push: dict[str, Any] | None) -> None:
        """Record the start on the writer thread while the first steps run.

        The initial checkpoint is written *before* the record says running, so a
        record that says running (or paused) always has a checkpoint to resume
        from, and a crash before it leaves an honest ``pending``.  The loop runs
        ahead of that record only until its first background write, state change
        or read of the record, which all wait for it; if it cannot be written the
        start is undone (:meth:`_await_start`).
        """
        snapshot, info = initial
        self._start_snapshot = snapshot
        self._start_mark = self._status.last_event()

        def record_start() -> None:
            # No events before it: until the start is recorded, the steps being run may yet be undone.
            self._retrying_outage(lambda: self._write_checkpoint(snapshot, info, events_first=False))
            self._write_with_retry({**fields, "last_checkpoint": self._checkpointed}, push)

        self._ahead = self._writer_pool().submit(record_start)

    def _await_start(self) -> None:
        """Wait until the start is recorded; if it could not be, go back to pending with the initial state."""
        ahead = self._ahead
        if ahead is None:
            return
        try:
            ahead.result()
        except BaseException as exc:
            self._ahead = None
            state = deserialize(self._start_snapshot, "the initial state of the start being undone")
            self._start_snapshot = None
            self._machine.set_state("pending", model=self._fsm)
            self._load_state(state, with_updates=True)
            self._last_checkpoint = None
            self._status.discard_events_after(self._start_mark)  # the undone steps' epochs and such
            self._start_error = exc
            log.error("session %s: its start could not be recorded, so it is pending again: %s", self.id, exc)
            raise
        self._ahead = None
        self._start_snapshot = None

    def _archive_attempt(self, fields: dict[str, Any]) -> None:
        current = self.record
        archive_id = f"{self.id}.attempt{self.attempt}"
        archived = {k: v for k, v in current.items() if k not in ("_id", "_version")}
        self._status.sessions.save({**archived, "_id": archive_id, "kind": "attempt", "attempt_of": self.id})
        summary = {k: current.get(k) for k in ("attempt", "state", "outcome", "started", "finished", "step")}
        summary["error"] = (current.get("error") or {}).get("type") if current.get("error") else None
        summary["record"] = archive_id
        found = self.checkpoints.load_latest(attempt=self.attempt, reason="initial")
        self.attempt += 1
        if found is not None:
            state, _ = found
            try:
                self.model.load_state_dict(state["model"])
            except RuntimeError as exc:
                self.attempt -= 1
                raise SessionError(
                    f"cannot restart session {self.id!r} in place: a stage changed the model's structure "
                    f"({exc}); build a new Session with session_id={self.id!r} and call restart() on it"
                ) from exc
            self.model.grad_clip = state.get("grad_clip")
        self.stage = next(iter(self.stages))
        self.step = self.stage_step = self.stage_epoch = self.batch_in_epoch = 0
        self.metrics, self.error, self.outcome, self.loss = {}, None, None, None
        self._loader = None
        fields.update(
            attempt=self.attempt, previous_attempt=archive_id, outcome=None, error=None, started=None,
            finished=None, stage=None, step=0, epoch=0, stage_step=0, metrics={}, stage_history=[],
            last_checkpoint=None,
        )
        self._checkpointed = None
        self._status.sessions.update(self.id, {"$push": {"history": summary}})

    # ------------------------------------------------------------------ the loop
    def run(self) -> Session:
        """Run (or resume) until the session is complete, failed or paused; returns self.

        An exception from a step or an update moves the session to ``failed``
        with its traceback recorded, then propagates.
        """
        if self.state == "pending":
            if not self._fire("start"):
                return self
        elif self.state == "paused":
            if self._needs_restore:
                self._restore_for_resume()
            self.resume()
        elif self.state != "running":
            raise TransitionError("run", self.state, "restart() it first")
        try:
            self._loop()
            self.drain()
        except BaseException as exc:
            if exc is self._start_error:
                pass  # the start was undone: the session is pending, as its record says
            elif isinstance(exc, BackendUnavailableError):
                log.error("session %s stopped: the database stayed unreachable: %s", self.id, exc)
            elif self.state in ("running", "paused", "pending"):
                try:
                    self.fail(exc)
                except StorageError as store_exc:
                    log.error("session %s failed (%s) and the failure could not be recorded: %s", self.id, exc, store_exc)
            raise
        return self

    def _replay_setups(self, until: str) -> None:
        """Rebuild the structure the checkpoint was saved from: the setups of the stages gone through."""
        path = [h["stage"] for h in self.record.get("stage_history") or []]
        if until in path:
            path = path[: len(path) - path[::-1].index(until)]
        for stage in path or [until]:
            if stage in self.stages:
                self._setup_stage(stage)

    def _restore_for_resume(self) -> None:
        found = self.checkpoints.load_latest(attempt=self.attempt)
        if found is None:
            found = self.checkpoints.load_latest()
        if found is None:
            raise CheckpointError(f"session {self.id!r} is paused but has no usable checkpoint to resume from")
        state, record = found
        self._replay_setups(record["stage"])
        self._load_state(state, with_updates=True)
        self._needs_restore = False
        dropped = self._status.drop_stored_after(record.get("attempt", self.attempt), record["step"])  # run again
        self.log_event("resume", checkpoint=record["_id"], restored_step=record["step"], dropped_events=dropped)

    def _get_loader(self) -> Any:
        if self._loader is not None:
            return self._loader
        stage = self.current_stage
        request = self._data_override if self._data_override is not None else stage.data
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

    def _iterate(self, loader: Any) -> Any:
        """An iterator positioned at ``batch_in_epoch``; draws no global randomness mid-epoch."""
        exact = isinstance(loader, DataLoader) and set_loader_position(loader, self.stage_epoch, self.batch_in_epoch)
        if self.batch_in_epoch and self._pending_rng is None:
            saved = torch.get_rng_state()
            it = iter(loader)
            torch.set_rng_state(saved)
        else:
            it = iter(loader)
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        if not exact and self.batch_in_epoch:
            log.warning("session %s: loader has no resumable sampler; skipping %d batches", self.id, self.batch_in_epoch)
            for _ in range(self.batch_in_epoch):
                next(it)
        return it

    def _budget_left(self, stage: Stage) -> bool:
        if stage.max_steps is not None and self.stage_step >= stage.max_steps:
            return False
        if stage.max_epochs is not None and self.stage_epoch >= stage.max_epochs:
            return False
        return True

    def _finish_stage(self) -> None:
        for t in self._stage_done[self.stage]:
            if t.guards_hold(self) and self._fire(STAGE_DONE):
                return
        self.complete()

    def _loop(self) -> None:
        updates = self.updates
        while self.is_running:
            if self._pause_requested is not None:
                reason, self._pause_requested = self._pause_requested, None
                self.pause(reason=reason)
                break
            stage = self.current_stage
            if not self._budget_left(stage):
                self._finish_stage()
                continue
            loader = self._get_loader()
            self._interrupt = False
            train = stage.mode == "train"
            step_fn = self.model.train_step if train else self._eval_batch
            polled = self._polled[stage.name]
            max_steps = stage.max_steps
            every = self.checkpoint_every_steps
            status = self._status
            step_scheduler = train and self.model.scheduler is not None and self.model.scheduler_interval == "step"
            finished_epoch = True
            if not train and self.batch_in_epoch == 0:
                self._eval_sums, self._eval_count = {}, 0
            for batch in self._iterate(loader):
                self.loss = step_fn(batch)
                self.batch_in_epoch += 1
                self.stage_step += 1
                if train:
                    self.step += 1
                self.event = "step"
                if step_scheduler:
                    self.model.scheduler.step()
                if updates:
                    self._run_updates()
                for t in polled:
                    if self._interrupt:
                        break
                    if t.guards_hold(self):
                        self._fire(t.trigger)
                if every is not None and train and self.step % every == 0 and not self._interrupt:
                    self._periodic_checkpoint()
                if status.due():
                    self._heartbeat()
                if self._interrupt or (max_steps is not None and self.stage_step >= max_steps):
                    finished_epoch = False
                    break
            if finished_epoch and self.is_running and self.stage == stage.name:
                self._end_epoch(stage)
        self._status.try_flush()  # an unreachable database keeps them buffered, as background writes do

    def _end_epoch(self, stage: Stage) -> None:
        self.stage_epoch += 1
        self.batch_in_epoch = 0
        epoch = self.stage_epoch
        if stage.mode == "eval":
            self._store_eval_metrics(stage.name)
        elif self.model.scheduler is not None and self.model.scheduler_interval == "epoch":
            self.model.step_scheduler(self.metrics)
        self.event = "epoch"
        self._interrupt = False
        self._run_updates()
        self.event = "step"
        # Logged even when an update just changed the stage: the epoch's metrics belong to its stage.
        self.log_event("epoch", stage=stage.name, stage_epoch=epoch, metrics=dict(self.metrics))
        if not self.is_running or self._interrupt:
            return
        if self.checkpoint_every_epochs and self.stage_epoch % self.checkpoint_every_epochs == 0:
            self._periodic_checkpoint()
        if self._status.due():
            self._heartbeat()

    def _run_updates(self) -> None:
        """Call the updates in order; one that changes course (interrupt) ends this round."""
        for update in self.updates:
            if update(self) not in (self, None):
                raise SessionError(f"update {update!r} must return the session (or None)")
            if self._interrupt:
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
        self._eval_count += 1
        return loss

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        prev = self._eval_sums.get(name)
        self._eval_sums[name] = value if prev is None else prev + value

    def _store_eval_metrics(self, prefix: str) -> dict[str, float]:
        count = max(self._eval_count, 1)
        values = {f"{prefix}_{name}": float(total) / count for name, total in self._eval_sums.items()}
        self.metrics.update(values)
        self._eval_sums, self._eval_count = {}, 0
        return values

    def evaluate(self, request: Any, *, prefix: str = "val") -> dict[str, float]:
        """Run the model over a whole DataLoader from the provider; store ``{prefix}_loss`` etc.

        Uses no global randomness, so evaluating does not change the training run.
        """
        if self.data is None:
            raise SessionError("evaluate() needs a DataProvider")
        loader = self.data.get_dataloader(request)
        saved_sums, saved_count = self._eval_sums, self._eval_count
        self._eval_sums, self._eval_count = {}, 0
        rng = torch.get_rng_state()
        try:
            for batch in loader:
                self._eval_batch(batch)
            values = self._store_eval_metrics(prefix)
        finally:
            torch.set_rng_state(rng)
            self._eval_sums, self._eval_count = saved_sums, saved_count
        self.log_event("metrics", metrics=values)
        return values

    # ------------------------------------------------------------------ status
    def _progress_fields(self) -> dict[str, Any]:
        stage = self.current_stage
        total = self.stage_total(stage)
        stage_progress = min(1.0, self.stage_step / total) if total else 0.0
        names = list(self.stages)
        index = names.index(self.stage)
        done = self.state == "complete" and self.outcome == "success"
        progress = 1.0 if done else (index + stage_progress) / len(names)
        return {
            "step": self.step,
            "stage_step": self.stage_step,
            "epoch": self.stage_epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "stage_progress": 1.0 if done else stage_progress,
            "progress": progress,
            "metrics": {k: v for k, v in self.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
            **({"last_checkpoint": self._checkpointed} if self._checkpointed is not None else {}),
        }

    def stage_total(self, stage: Stage) -> int | None:
        """Steps the stage's budget allows (None when unbounded or the loader has no length)."""
        totals = []
        if stage.max_steps is not None:
            totals.append(stage.max_steps)
        if stage.max_epochs is not None and self._loader_len:
            totals.append(stage.max_epochs * self._loader_len)
        return min(totals) if totals else None

    def _heartbeat(self) -> None:
        """Queue a progress write; act on the record the previous one read (a pause request)."""
        if self._ahead is not None and not self._ahead.done():
            return  # the start is still being written: beat at the first step after it, without waiting
        self._status.schedule()
        previous = self._hb
        if previous is not None:
            if not previous.done():
                return  # the database is slow: skip this beat rather than queue up
            self._hb = None
            record = previous.result()
            if record is not None:
                self._storage_healthy()
            self._check_outage()
            if not self.is_running:
                return
            control = (record or {}).get("control") or {}
            if control.get("pause") and self.is_running:
                self.pause(reason=control.get("reason") or "requested")
                return
        self._hb = self._submit(
            self._status.heartbeat, self._progress_fields(), self.stage_step, self.stage_total(self.current_stage)
        )

    def close(self) -> None:
        """Flush buffered events and close the databases this session opened from URLs."""
        try:
            self.drain()
            self._status.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            for db in self._owned:
                db.close()
            self._owned.clear()

    def graph(self) -> str:
        """The state graph as Mermaid text (no graphviz needed): ``ptutils graph`` prints it."""
        from .graph import mermaid

        return mermaid(self)

    def __repr__(self) -> str:
        return f"<Session {self.id} state={self._fsm.state} step={self.step}>"
