"""The session's lifecycle: its state machine, what each state change records first, who may start, takeover.

* :class:`Lifecycle` builds the ``transitions`` machine from the stages
  (:mod:`ptutils.stages`) and fires its triggers; an illegal one raises
  :class:`~ptutils.errors.TransitionError` naming the state and the trigger.
* Write-ahead: every transition's first ``before`` callback records the change
  before it takes effect; if that fails the transition is cancelled.  What a
  change records, and what must be durable before it (the pause checkpoint,
  the final one, the initial one of an attempt, the archive of the attempt a
  restart ends), is declared per trigger in :data:`STEPS`.  A start, and a
  resume in a new process, also record the run's metadata
  (:mod:`ptutils.metadata`): the record's ``run``, and one entry in ``runs``.
* :class:`Admission`: whether a pending session may start (its queue, its
  start conditions), with the blocking reason written to its record.
* :func:`take_over`: the state a session continues from when its record
  already exists; a ``running`` record whose process is gone is taken over as
  paused (interrupted, :func:`mark_interrupted`), a live one is refused.

Nothing here imports the Session: the machine calls back into a
:class:`StateOwner`, which the Session is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from transitions import MachineError
from transitions.extensions.nesting import HierarchicalMachine

from .errors import SessionError, StorageError, TransitionError
from .metadata import process_token, run_metadata, run_summary
from .stages import SEP, Stage, StageState, StageTransition, machine_states, machine_transitions
from .status import StatusWriter, is_stale

log = logging.getLogger("ptutils")


class _Machine(HierarchicalMachine):
    state_cls = StageState


class _Model:
    """The object ``transitions`` drives; kept private so the Session's API stays ours."""

    state: str


@attrs.define
class StateChange:
    """One state change being recorded: what the record will say before it takes effect."""

    trigger: str
    state: str
    """The lifecycle state it goes to (``running``, ``paused`` ...)."""
    stage: str
    """The stage it goes to ('' when the destination is not running)."""
    fields: dict[str, Any]
    push: dict[str, Any] = attrs.field(factory=dict)
    initial: Any = None
    """For a start: the initial checkpoint, written ahead of the loop with the record."""


class StateOwner(Protocol):
    """What the write-ahead steps use of the session whose changes they record.

    The public members are the Session's own; the private ones are its side of
    this interface, called only from here.
    """

    id: str
    seed: int
    error: dict[str, Any] | None
    outcome: str | None
    _pause_reason: str

    @property
    def state(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def record(self) -> dict[str, Any]: ...
    @property
    def stage(self) -> str: ...
    @property
    def step(self) -> int: ...
    def drain(self, *, raise_errors: bool = True) -> None: ...
    def _enter_stage(self, stage: str) -> None: ...
    def _begin_attempt(self) -> Any: ...
    def _checkpoint_for(self, reason: str) -> None: ...
    def _at_checkpoint(self) -> bool: ...
    def _end_attempt(self, change: StateChange) -> None: ...
    def _record_change(self, change: StateChange) -> None: ...


def _record_run(change: StateChange, owner: StateOwner, now: float) -> None:
    """Record which process, machine and code runs the attempt now: ``run`` in full, an entry in ``runs``.

    ``host`` follows too, so a resume on another machine is not judged by its pid on the first one.
    """
    run = {"attempt": owner.attempt, "trigger": change.trigger, "time": now, **run_metadata(seed=owner.seed)}
    change.fields.update(run=run, host=run["host"])
    change.push["runs"] = run_summary(run)


def _ran_here(owner: StateOwner) -> bool:
    """Whether this process already recorded its run of the current attempt (a resume after a pause here)."""
    try:
        run = owner.record.get("run") or {}
    except StorageError:
        return False  # an outage: the resume's own write waits it out; an entry too many is harmless
    return run.get("process") == process_token() and run.get("attempt") == owner.attempt


def _start(change: StateChange, owner: StateOwner, now: float) -> None:
    change.initial = owner._begin_attempt()
    change.fields.update(started=now, blocked_by=None, queue_position=None, interrupted=False)
    change.fields["control.pause"] = False  # a request that reached a session not running is void
    _record_run(change, owner, now)


def _resume(change: StateChange, owner: StateOwner, now: float) -> None:
    owner.error = None
    change.fields.update(interrupted=False, pause_reason=None, error=None)
    change.fields["control.pause"] = False
    if not _ran_here(owner):  # a resume in a new process (a crash, a PBT round, another host) says where it runs
        _record_run(change, owner, now)


def _pause(change: StateChange, owner: StateOwner, now: float) -> None:
    if owner.state == "running":
        owner._checkpoint_for("pause")  # checkpoint, then record paused: a paused record can always resume
    change.fields.update(pause_reason=owner._pause_reason, error=owner.error, **{"control.pause": False})


def _final_checkpoint(change: StateChange, owner: StateOwner, now: float) -> None:
    if owner.state == "running" and not owner._at_checkpoint():
        owner._checkpoint_for("final")  # the trained weights outlive the process


def _finish(change: StateChange, owner: StateOwner, now: float) -> None:
    change.fields.update(finished=now, outcome=owner.outcome, error=owner.error)


def _restart(change: StateChange, owner: StateOwner, now: float) -> None:
    owner._end_attempt(change)
    change.fields["run"] = None  # the archived attempt keeps its run; the new one records its own at its start


STEPS: dict[str, tuple[Callable[[StateChange, StateOwner, float], None], ...]] = {
    "start": (_start,),
    "resume": (_resume,),
    "pause": (_pause,),
    "complete": (_final_checkpoint, _finish),
    "stop": (_final_checkpoint, _finish),
    "fail": (_finish,),
    "restart": (_restart,),
}
"""What each lifecycle trigger does before its change is recorded; stage triggers only enter their stage."""


class Lifecycle:
    """The ``transitions`` machine of one session; every change is recorded by its owner first."""

    def __init__(
        self,
        owner: StateOwner,
        stages: Sequence[Stage],
        stage_transitions: Sequence[StageTransition],
        initial: str,
        start_guard: Callable[..., bool],
    ):
        self._owner = owner
        self._model = _Model()
        self._machine = _Machine(
            model=self._model,
            states=machine_states(stages),
            transitions=machine_transitions(
                stages,
                stage_transitions,
                start_conditions=[start_guard],
                write_ahead=self._write_ahead_callback,
                stage_is=lambda name: (lambda *_a, **_k: owner.stage == name),
            ),
            initial=initial,
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )

    @property
    def state(self) -> str:
        """The machine's full state: ``running/<stage>``, ``paused`` ..."""
        return self._model.state

    def fire(self, trigger: str, *args: Any) -> bool:
        """Fire ``trigger`` (guards and callbacks get ``args``); False when a guard refused it."""
        try:
            return bool(self._model.trigger(trigger, *args))
        except MachineError as exc:
            raise TransitionError(trigger, self._model.state) from exc

    def set_state(self, state: str) -> None:
        """Put the machine in ``state`` without a transition (undoing a start that could not be recorded)."""
        self._machine.set_state(state, model=self._model)

    def _write_ahead_callback(self, trigger: str, dest: str) -> Callable:
        def write_ahead(*_: Any, **__: Any) -> None:
            self._write_ahead(trigger, dest)

        return write_ahead

    def _write_ahead(self, trigger: str, dest: str) -> None:
        """Record a state change before it happens; an exception here cancels the change."""
        owner = self._owner
        owner.drain(raise_errors=trigger != "fail")
        state, _, stage = dest.partition(SEP)
        change = StateChange(trigger, state, stage, {"state": state, "last_trigger": trigger})
        now = time.time()
        if stage and stage != owner.stage:
            change.push["stage_history"] = {"stage": stage, "from": owner.stage if owner.state == "running" else None,
                                            "step": owner.step, "time": now, "trigger": trigger}
            owner._enter_stage(stage)
        elif stage and trigger == "start":
            change.push["stage_history"] = {"stage": stage, "from": None, "step": owner.step, "time": now,
                                            "trigger": trigger}
        if stage:
            change.fields["stage"] = stage
        for step in STEPS.get(trigger, ()):
            step(change, owner, now)
        owner._record_change(change)
        log.info("session %s: %s -> %s", owner.id, self._model.state, dest)


class Admission:
    """Whether a pending session may start: first in its queue, and every start condition met."""

    def __init__(self, status: StatusWriter, session_id: str, queue: str | None, conditions: Sequence[Callable]):
        self._status = status
        self._id = session_id
        self.queue = queue
        self.conditions = list(conditions)

    def queue_position(self, created: float) -> int | None:
        """1 + the number of pending sessions created earlier in the same queue (None without a queue)."""
        if self.queue is None:
            return None
        ahead = self._status.sessions.count({
            "queue": self.queue,
            "state": "pending",
            "$or": [{"created": {"$lt": created}}, {"created": created, "_id": {"$lt": self._id}}],
        })
        return ahead + 1

    def admits(self, session: Any, created: float) -> bool:
        """Whether ``session`` may start now; if not, its record says what blocks it."""
        position = self.queue_position(created)
        if position is not None and position > 1:
            self._status.write({
                "blocked_by": f"waiting in queue {self.queue!r} behind {position - 1} session(s)",
                "queue_position": position,
            })
            return False
        for cond in self.conditions:
            try:
                ok = cond(session)
                reason = None if ok else f"start condition {getattr(cond, '__name__', cond)!r} is not met"
            except Exception as exc:  # a failing guard is a blocking reason, not a crash
                ok, reason = False, f"{type(exc).__name__}: {exc}"
            if not ok:
                self._status.write({"blocked_by": reason, "queue_position": position})
                return False
        return True


def mark_interrupted(status: StatusWriter, log_event: Callable[..., None], reason: str = "interrupted",
                     **fields: Any) -> None:
    """Record a run that stopped between checkpoints as paused and interrupted: it resumes from the newest one.

    What a dead process's ``running`` record is taken over as, and what a run
    aborted at once (a second Ctrl-C) records itself.
    """
    status.write({**fields, "state": "paused", "interrupted": True, "pause_reason": reason})
    log_event("interrupted", reason=reason)


def take_over(record: dict[str, Any], status: StatusWriter, log_event: Callable[..., None]) -> str:
    """The machine state to continue an existing record from; a dead process's ``running`` becomes paused.

    A ``running`` record whose heartbeat is fresh (and whose process, on this
    host, is alive) belongs to a live session and is refused.
    """
    session_id = status.session_id
    state = record.get("state")
    if state == "running":
        if not is_stale(record):
            raise SessionError(
                f"session {session_id!r} is running in process {record.get('pid')} on {record.get('host')} "
                f"(heartbeat {time.time() - float(record.get('heartbeat') or 0):.1f}s ago)"
            )
        mark_interrupted(status, log_event)
        return "paused"
    if state in ("pending", "paused", "complete", "failed"):
        return state
    raise SessionError(f"session {session_id!r} has an unknown state {state!r} in its record")
