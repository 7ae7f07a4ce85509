"""The status record of a session, and the throttled writer that keeps it current.

One record per session lives in the ``sessions`` collection of the session's
DBInterface, under the session id.  State changes are written immediately and
*before* they take effect (write-ahead); progress, ETA and the heartbeat are
written at most every ``interval`` seconds, together with buffered events
(metrics, monitor firings, restores) in the ``events`` collection: one document
per kind and write, holding that write's events of the kind in ``events``.  The same
write returns the record, so a pause requested from another process
(``request_pause``) is seen at the next heartbeat.

If the database is unreachable, buffered events stay buffered and are written
on the next successful heartbeat: nothing is dropped; every failed write is
reported to the session's :class:`~ptutils.outage.OutageClock`.

This module also holds what the record *says*: its schema
(:func:`initial_record`), the progress fields a heartbeat writes
(:func:`progress_fields`), where a pause request from another process is read
(:func:`pause_request`), how a finished attempt is archived on restart
(:func:`archive_attempt`), and a metric's history read from the events
(:func:`metric_history`).
"""

from __future__ import annotations

import difflib
import itertools
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .conditions import db_reachable  # noqa: F401  (imported from here before conditions.py)
from .database import DBInterface, opened
from .errors import NotFoundError, SessionNotFound, StorageError
from .outage import OutageClock

log = logging.getLogger("ptutils")

SESSIONS = "sessions"
EVENTS = "events"
EVENTS_PER_DOC = 1000
"""Events of one kind stored together in one document of the ``events`` collection (one per flush)."""
PROCESS_EVENTS = frozenset({"interrupted", "resume", "warning"})
"""Event kinds about the processes that ran a session, not its steps (a resume keeps them all)."""


def stale_after(interval: float) -> float:
    """Seconds without a heartbeat after which a ``running`` record is treated as interrupted."""
    return max(10.0, 5.0 * interval)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): the signal check is all there is


def is_stale(record: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether a ``running`` record's process is gone: dead pid on this host, or a stopped heartbeat."""
    if record.get("state") != "running":
        return False
    pid = record.get("pid")
    if record.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid):
        return True
    now = time.time() if now is None else now
    return now - float(record.get("heartbeat") or 0.0) > stale_after(float(record.get("status_interval", 2.0)))


def describe(record: Mapping[str, Any], now: float | None = None) -> str:
    """The state a person should see: ``interrupted`` for a running record gone stale."""
    return "interrupted" if is_stale(record, now) else str(record.get("state"))


def request_pause(db: DBInterface | str, session_id: str, reason: str = "requested") -> dict:
    """Ask a running session (in any process) to checkpoint and pause at its next heartbeat.

    ``db`` is a DBInterface or a database URL, as for a Session; SessionNotFound if it holds no such session.
    """
    with opened(db) as interface:
        try:
            return interface.collection(SESSIONS).update(
                session_id, {"$set": {"control.pause": True, "control.reason": reason, "control.at": time.time()}}
            )
        except NotFoundError:
            raise session_not_found(interface, session_id) from None


def session_not_found(db: DBInterface, session_id: str) -> SessionNotFound:
    """The error for a session id ``db`` holds no record of, naming the database and the ids most like it."""
    ids = [doc["_id"] for doc in db.collection(SESSIONS).load({"kind": "session"}, projection=["_id"], limit=10_000)]
    close = difflib.get_close_matches(session_id, ids, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else f" ({len(ids)} sessions there)"
    return SessionNotFound(session_id, db.url, hint)


def pause_request(record: Mapping[str, Any] | None) -> str | None:
    """The reason of a pause requested in ``record`` (by :func:`request_pause`), or None.

    A running session reads it from the record its previous heartbeat returned,
    so a request is honoured within two status intervals.
    """
    control = (record or {}).get("control") or {}
    if not control.get("pause"):
        return None
    return control.get("reason") or "requested"


def initial_record(
    *,
    name: str,
    parent_id: str | None,
    attempt: int,
    stages: Sequence[str],
    queue: str | None,
    seed: int,
    config: Mapping[str, Any] | None,
    metadata: Mapping[str, Any],
) -> dict[str, Any]:
    """The fields of a new session's record (``pending``); :meth:`StatusWriter.create` adds who and when.

    ``metadata`` is the user's; ``run`` (what runs the attempt: versions, host, devices, command line, git)
    and ``runs`` (one short entry per process that ran an attempt) are written at each start and at a
    resume in a new process (:mod:`ptutils.metadata`).
    """
    return {
        "name": name,
        "kind": "session",
        "parent_id": parent_id,
        "children": [],
        "attempt": attempt,
        "previous_attempt": None,
        "history": [],
        "state": "pending",
        "stage": None,
        "stages": list(stages),
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
        "queue": queue,
        "queue_position": None,
        "metrics": {},
        "seed": seed,
        "config": config,
        "metadata": dict(metadata),
        "run": None,
        "runs": [],
        "control": {"pause": False},
    }


def steps_allowed(max_steps: int | None, max_epochs: int | None, loader_len: int | None) -> int | None:
    """Steps a stage's budget allows (None when unbounded or the loader has no length)."""
    totals = []
    if max_steps is not None:
        totals.append(max_steps)
    if max_epochs is not None and loader_len:
        totals.append(max_epochs * loader_len)
    return min(totals) if totals else None


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric metrics: what a record (or a checkpoint's record) stores of them."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def progress_fields(
    position: Any,
    *,
    stages: Sequence[str],
    total: int | None,
    done: bool,
    metrics: Mapping[str, Any],
    last_checkpoint: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What the record shows of a session's progress at ``position`` (a LoopPosition).

    ``progress`` counts each stage as an equal share; ``done`` (complete with
    success) shows 1.0.  Only finite numeric metrics are written.
    """
    stage_progress = min(1.0, position.stage_step / total) if total else 0.0
    progress = 1.0 if done else (list(stages).index(position.stage) + stage_progress) / len(stages)
    return {
        "step": position.step,
        "stage_step": position.stage_step,
        "epoch": position.stage_epoch,
        "batch_in_epoch": position.batch_in_epoch,
        "stage_progress": 1.0 if done else stage_progress,
        "progress": progress,
        "metrics": finite_metrics(metrics),
        **({"last_checkpoint": dict(last_checkpoint)} if last_checkpoint is not None else {}),
    }


def archive_attempt(sessions: Any, session_id: str, attempt: int, record: Mapping[str, Any]) -> dict[str, Any]:
    """Keep a finished attempt's record as ``<id>.attempt<N>``; return its summary for the record's ``history``."""
    archive_id = f"{session_id}.attempt{attempt}"
    archived = {k: v for k, v in record.items() if k not in ("_id", "_version")}
    sessions.save({**archived, "_id": archive_id, "kind": "attempt", "attempt_of": session_id})
    summary = {k: record.get(k) for k in ("attempt", "state", "outcome", "started", "finished", "step")}
    summary["error"] = (record.get("error") or {}).get("type") if record.get("error") else None
    summary["runs"] = [r for r in record.get("runs") or () if r.get("attempt") == attempt]  # where it ran, which code
    summary["record"] = archive_id
    return summary


class MetricPoint(NamedTuple):
    """One recorded value of a metric."""

    step: int
    """The training step it was computed after."""
    value: float
    stage: str | None
    """The stage it belongs to."""
    epoch: int | None
    """The stage epoch it was computed at (the epoch it is the mean of, for ``{stage}_*``)."""


def metric_history(events: Sequence[Mapping[str, Any]], name: str, attempt: int) -> list[MetricPoint]:
    """The values of metric ``name`` in ``attempt``'s ``metrics`` events (each holds the values computed then)."""
    return [
        MetricPoint(e["step"], e["metrics"][name], e.get("stage"), e.get("stage_epoch"))
        for e in events
        if e.get("kind") == "metrics" and e.get("attempt") == attempt and name in (e.get("metrics") or {})
    ]


class StatusWriter:
    """Writes one session's status record and event log through a DBInterface."""

    def __init__(self, db: DBInterface, session_id: str, *, interval: float = 2.0, outage: OutageClock | None = None):
        self.sessions = db.collection(SESSIONS)
        self.events = db.collection(EVENTS)
        self.session_id = session_id
        self.interval = interval
        self._next = 0.0
        self._buffer: list[dict] = []
        self._flushing = threading.Lock()
        """One flush at a time: two would store the same events and trim each other's from the buffer."""
        self._seq = itertools.count(1)
        self._last_seq = 0
        self._token = uuid.uuid4().hex[:8]
        self._rate: float | None = None
        self._last_sample: tuple[float, int] | None = None
        self.outage = outage if outage is not None else OutageClock()
        """Where failed writes are reported (the session shares its clock with its background writer)."""

    # ------------------------------------------------------------------ record
    def load(self) -> dict | None:
        """The stored record, or None when this session has none yet."""
        try:
            return self.sessions.load_from_id(self.session_id)
        except NotFoundError:
            return None

    def create(self, record: Mapping[str, Any]) -> dict:
        """Write the initial record (pending)."""
        now = time.time()
        doc = {
            "_id": self.session_id,
            "created": now,
            "updated": now,
            "heartbeat": now,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "status_interval": self.interval,
            **record,
        }
        self.sessions.save(doc)
        return self.sessions.load_from_id(self.session_id)

    def write(self, fields: Mapping[str, Any], *, push: Mapping[str, Any] | None = None) -> dict:
        """Write ``fields`` now (state changes); raises if the database cannot take it."""
        now = time.time()
        changes: dict[str, Any] = {"$set": {**fields, "updated": now, "heartbeat": now, "pid": os.getpid()}}
        if push:
            changes["$push"] = dict(push)
        record = self.sessions.update(self.session_id, changes)
        self.try_flush()
        return record

    # ------------------------------------------------------------------ heartbeat
    def due(self) -> bool:
        """Whether a heartbeat is due (cheap: one clock read)."""
        return time.monotonic() >= self._next

    def schedule(self) -> None:
        """Make the next heartbeat due one interval from now."""
        self._next = time.monotonic() + self.interval

    def heartbeat(self, fields: Mapping[str, Any], steps_done: int, steps_total: int | None) -> dict | None:
        """Throttled progress write; returns the record (with any control requests) or None on outage."""
        eta = self._eta(time.monotonic(), steps_done, steps_total)
        try:
            record = self.write({**fields, "eta_seconds": eta})
        except StorageError as exc:
            self._failed(exc)
            return None
        self.outage.healthy()
        return record

    def _eta(self, mono: float, steps_done: int, steps_total: int | None) -> float | None:
        if self._last_sample is not None:
            t0, s0 = self._last_sample
            if mono > t0 and steps_done >= s0:
                rate = (steps_done - s0) / (mono - t0)
                self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
        self._last_sample = (mono, steps_done)
        if steps_total is None or not self._rate:
            return None
        return max(0.0, (steps_total - steps_done) / self._rate)

    def _failed(self, exc: Exception) -> None:
        self.outage.failed(exc)
        log.warning("status write for session %s failed (%s); will retry", self.session_id, self.outage.error)

    # ------------------------------------------------------------------ events
    def event(self, kind: str, **data: Any) -> None:
        """Buffer one event (metrics, monitor firing, restore ...) for the next write."""
        seq = self._last_seq = next(self._seq)
        event_id = f"{self.session_id}.{self._token}.{seq:08d}"  # re-saving after a lost reply replaces, never duplicates
        self._buffer.append(
            {"_id": event_id, "session_id": self.session_id, "kind": kind, "time": time.time(), "seq": seq, **data}
        )

    def flush(self) -> None:
        """Write buffered events, one document per kind; on failure they stay buffered for the next try."""
        with self._flushing:
            pending = list(self._buffer)
            if pending:
                self.events.save_many(self._batches(pending))
                del self._buffer[: len(pending)]  # events logged meanwhile (by another thread) stay

    def _batches(self, events: list[dict]) -> list[dict]:
        """Events grouped by kind, at most :data:`EVENTS_PER_DOC` to a document.

        A document's id is its first event's: a flush retried after a lost
        reply, with more events since, replaces what the first try stored.
        """
        by_kind: dict[str, list[dict]] = {}
        for event in events:
            by_kind.setdefault(event["kind"], []).append(event)
        docs = []
        for kind, group in by_kind.items():
            for start in range(0, len(group), EVENTS_PER_DOC):
                chunk = group[start : start + EVENTS_PER_DOC]
                docs.append({"_id": chunk[0]["_id"], "session_id": self.session_id, "kind": kind,
                             "time": chunk[0]["time"], "events": chunk})
        return docs

    def last_event(self) -> int:
        """The sequence number of the last event buffered (0 before the first)."""
        return self._last_seq

    def discard_events_after(self, seq: int) -> None:
        """Drop buffered events logged after ``seq`` (they belong to steps that were undone)."""
        with self._flushing:
            self._buffer[:] = [e for e in self._buffer if e["seq"] <= seq]

    def drop_stored_after(self, attempt: int, step: int) -> int:
        """Delete stored events of ``attempt`` after ``step`` that earlier processes logged; return how many.

        A resume from the checkpoint at ``step`` runs those steps again, so their
        events (epochs, monitor firings, stage changes) would otherwise be logged
        twice; TensorBoard's ``purge_step`` does the same.  Events that describe the
        processes rather than the steps (``interrupted``, ``resume``, ``warning``)
        stay.
        """
        mine = f"{self.session_id}.{self._token}."

        def abandoned(event: Mapping[str, Any]) -> bool:
            return (event.get("attempt") == attempt and isinstance(event.get("step"), int) and event["step"] > step
                    and event.get("kind") not in PROCESS_EVENTS and not str(event.get("_id", "")).startswith(mine))

        dropped = 0
        for doc in self.events.load({"session_id": self.session_id}):
            batched = "events" in doc
            events = doc["events"] if batched else [doc]
            kept = [e for e in events if not abandoned(e)]
            if len(kept) == len(events):
                continue
            dropped += len(events) - len(kept)
            if kept and batched:
                self.events.save({**doc, "events": kept})  # save() keeps the id and ignores _version
            else:
                self.events.delete(doc["_id"])
        return dropped

    def end_run(self) -> None:
        """Count the events logged so far as an ended run's, as if another process had logged them.

        After a run aborted between checkpoints, a resume in the same process
        then drops its stored events past the checkpoint (:meth:`drop_stored_after`).
        """
        self.try_flush()
        self._token = uuid.uuid4().hex[:8]

    def try_flush(self) -> None:
        """Flush, counting a failure as an outage: the events stay buffered for the next write."""
        try:
            self.flush()
        except StorageError as exc:
            self._failed(exc)

    def load_events(self, kind: str | None = None) -> list[dict]:
        """This session's events (of one ``kind``) in time order."""
        query: dict[str, Any] = {"session_id": self.session_id}
        if kind is not None:
            query["kind"] = kind
        # A document holds one write's events of a kind (or, as written before, one event).
        events = [e for doc in self.events.load(query) for e in doc.get("events") or [doc]]
        return sorted(events, key=lambda e: (e["time"], e["seq"]))
