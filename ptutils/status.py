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
on the next successful heartbeat: nothing is dropped.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .database import DBInterface
from .errors import NotFoundError, StorageError

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
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def request_pause(db: DBInterface, session_id: str, reason: str = "requested") -> dict:
    """Ask a running session (in any process) to checkpoint and pause at its next heartbeat."""
    return db.collection(SESSIONS).update(
        session_id, {"$set": {"control.pause": True, "control.reason": reason, "control.at": time.time()}}
    )


class StatusWriter:
    """Writes one session's status record and event log through a DBInterface."""

    def __init__(self, db: DBInterface, session_id: str, *, interval: float = 2.0):
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
        self.errors = 0
        self.last_error: str | None = None
        self.outage_since: float | None = None

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
        self.outage_since = None
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
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.outage_since is None:
            self.outage_since = time.monotonic()
        log.warning("status write for session %s failed (%s); will retry", self.session_id, self.last_error)

    def outage_seconds(self) -> float:
        """How long the database has been failing status writes (0 when healthy)."""
        return 0.0 if self.outage_since is None else time.monotonic() - self.outage_since

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


def db_reachable(db: DBInterface) -> Callable[[Any], bool]:
    """A start condition: the database answers a ping (its error becomes the blocking reason)."""

    def db_reachable(_session: Any) -> bool:
        db.ping()
        return True

    return db_reachable
