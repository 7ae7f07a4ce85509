"""ReplicatedInterface: one DBInterface over several databases at once (e.g. a server and a local copy).

Writes go to every member; reads come from the first member that is healthy and
has missed nothing.  When a member fails (:class:`BackendUnavailableError`, or any
other storage error that only that member raises), the run continues on the
others: the failure is logged on the ``ptutils`` logger and recorded in
:attr:`ReplicatedInterface.failures`, and the writes the member missed are kept
in order in an in-memory backlog that is replayed when it answers again (tried
at most every ``retry_interval`` seconds, on the next operation, or at once with
:meth:`ReplicatedInterface.resync`).

Replication happens at the level of the DBInterface primitives, after the first
available member (the *authority*, normally the first member) has accepted a
write: a save or an update is copied as the resulting document, a delete by
query as the ids it removed, so every member ends with the same documents, ids,
versions and blobs.  Semantic errors of the authority (a version conflict, an
invalid update, a missing document) are raised to the caller and nothing is
replicated.  A backlog keeps blob ids, not blob bytes: they are read from the
authority at replay time.

Open one with ``ReplicatedInterface([db1, db2])``, :func:`open_replicated` on a
list of URLs, or ``open_db("replicated://?member=<url>&member=<url>")`` (each
member URL percent-encoded).  The backlog lives in this process only: a member
that was down when the process ended is not caught up by a later process.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

import attrs

from .database import DBInterface, open_db
from .errors import BackendUnavailableError, NotFoundError, StorageError
from .query import Node, Path, Update

log = logging.getLogger("ptutils")

_T = TypeVar("_T")


@attrs.frozen
class ReplicaFailure:
    """One recorded failure of a member: which, when, doing what, and why."""

    member: int
    where: str
    operation: str
    error: str
    time: float


@attrs.define
class _Member:
    root: DBInterface
    siblings: dict[str, DBInterface]
    backlog: collections.deque = attrs.field(factory=collections.deque)
    failed: bool = False
    next_attempt: float = 0.0
    last_error: str | None = None

    def on(self, collection: str) -> DBInterface:
        db = self.siblings.get(collection)
        if db is None:
            db = self.siblings[collection] = self.root.collection(collection)
        return db

    @property
    def in_sync(self) -> bool:
        return not self.failed and not self.backlog


class _State:
    """Shared by a replicated interface and its sibling collections."""

    def __init__(self, members: Sequence[DBInterface], retry_interval: float):
        self.members = [_Member(m, {m.collection_name: m}) for m in members]
        self.retry_interval = retry_interval
        self.failures: list[ReplicaFailure] = []
        self.lock = threading.RLock()
        self.closed = False


class ReplicatedInterface(DBInterface):
    """Several DBInterfaces kept identical: write to all, read from the first healthy one (see module doc)."""

    scheme = "replicated"

    def __init__(self, members: Sequence[DBInterface], *, retry_interval: float = 5.0):
        """``members`` in order of preference (the first is the primary); all use their own collection names."""
        members = list(members)
        if not members or not all(isinstance(m, DBInterface) for m in members):
            raise TypeError("ReplicatedInterface needs a non-empty list of DBInterfaces")
        names = {m.collection_name for m in members}
        if len(names) != 1:
            raise StorageError(f"members must use one collection name, got {sorted(names)}")
        super().__init__(members[0].collection_name)
        self._state = _State(members, float(retry_interval))
        self._owner = True

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ReplicatedInterface:
        """``replicated://?member=<url>&member=<url>[&retry_interval=s]``; other options go to each member."""
        parts = urlsplit(url)
        members = [value for key, value in parse_qsl(parts.query) if key == "member"]
        settings = {key: value for key, value in parse_qsl(parts.query) if key != "member"}
        if not members:
            raise StorageError(f"{url!r}: name the members as ?member=<url>&member=<url>")
        interval = float(settings.pop("retry_interval", 5.0))
        if settings:
            raise StorageError(f"{url!r}: unknown settings {sorted(settings)}")
        return cls([open_db(m, **options) for m in members], retry_interval=interval)

    @property
    def url(self) -> str:
        query = "&".join(f"member={quote(m.root.url, safe='')}" for m in self._state.members)
        return f"replicated://?{query}&retry_interval={self._state.retry_interval}"

    def __repr__(self) -> str:
        return f"ReplicatedInterface({[m.root for m in self._state.members]!r}, collection={self.collection_name!r})"

    def _where(self) -> str:
        return f"replicated collection {self.collection_name!r}"

    def _sibling(self, collection: str) -> ReplicatedInterface:
        sibling = object.__new__(type(self))
        DBInterface.__init__(sibling, collection)
        sibling._state = self._state
        sibling._owner = False
        return sibling

    # ----------------------------------------------------------------- health
    @property
    def members(self) -> list[DBInterface]:
        """The member interfaces on this collection, in order of preference."""
        return [m.on(self.collection_name) for m in self._state.members]

    @property
    def failures(self) -> list[ReplicaFailure]:
        """Every member failure recorded so far (oldest first)."""
        with self._state.lock:
            return list(self._state.failures)

    def status(self) -> list[dict[str, Any]]:
        """Per member: its URL, whether it is in sync, how many writes it has missed, the last error."""
        with self._state.lock:
            return [
                {
                    "member": i,
                    "url": repr(m.root),
                    "in_sync": m.in_sync,
                    "pending": len(m.backlog),
                    "last_error": m.last_error,
                }
                for i, m in enumerate(self._state.members)
            ]

    def resync(self) -> bool:
        """Replay missed writes to every member that answers now; True if all are in sync afterwards."""
        with self._state.lock:
            for index in range(len(self._state.members)):
                self._replay(index, force=True)
            return all(m.in_sync for m in self._state.members)

    def ping(self) -> None:
        self._read("ping", lambda db: db.ping())

    def close(self) -> None:
        """Close every member (from the interface that was opened; siblings share them)."""
        state = self._state
        if self._owner and not state.closed:
            state.closed = True
            for member in state.members:
                member.root.close()

    # ----------------------------------------------------------------- machinery
    def _record(self, index: int, operation: str, exc: BaseException) -> None:
        state = self._state
        member = state.members[index]
        member.failed = True
        member.last_error = f"{type(exc).__name__}: {exc}"
        member.next_attempt = time.monotonic() + state.retry_interval
        failure = ReplicaFailure(index, repr(member.root), operation, member.last_error, time.time())
        state.failures.append(failure)
        log.warning(
            "ptutils: replica %d (%r) failed during %s, continuing without it: %s",
            index,
            member.root,
            operation,
            member.last_error,
        )

    def _apply(self, index: int, collection: str, op: tuple) -> None:
        """Apply one replicated operation to member ``index``."""
        db = self._state.members[index].on(collection)
        kind = op[0]
        if kind == "write":
            db._write(op[1], op[2])
        elif kind == "remove_ids":
            db._remove_ids(op[1])
        elif kind == "put_blob":
            data = op[2] if len(op) > 2 else self._blob_for_replay(index, collection, op[1])
            if data is not None:
                db._put_blob(op[1], data)
        elif kind == "delete_blobs":
            db._delete_blobs(op[1])
        else:
            raise AssertionError(f"unknown replicated operation {kind!r}")

    def _blob_for_replay(self, index: int, collection: str, blob_id: str) -> bytes | None:
        """Current bytes of a blob a member missed, from an in-sync member (None if it is gone since)."""
        for i, member in enumerate(self._state.members):
            if i != index and member.in_sync:
                try:
                    return member.on(collection)._get_blob(blob_id)
                except NotFoundError:
                    return None
        raise BackendUnavailableError(f"no member in sync to read blob {blob_id!r} from for the replay")

    def _replay(self, index: int, force: bool = False) -> None:
        member = self._state.members[index]
        if member.in_sync or (not force and time.monotonic() < member.next_attempt):
            return
        try:
            member.root.ping()
            while member.backlog:
                collection, op = member.backlog[0]
                self._apply(index, collection, op)
                member.backlog.popleft()
        except StorageError as exc:
            self._record(index, "replay", exc)
            return
        member.failed = False
        member.last_error = None
        log.info("ptutils: replica %d (%r) is back and in sync", index, member.root)

    def _replay_due(self) -> None:
        for index, member in enumerate(self._state.members):
            if not member.in_sync:
                self._replay(index)

    def _read(self, operation: str, fn: Callable[[DBInterface], _T]) -> _T:
        """``fn`` on the first in-sync member that answers."""
        state = self._state
        if state.closed:
            raise StorageError(f"{self._where()}: the interface is closed")
        with state.lock:
            self._replay_due()
            errors = []
            for index, member in enumerate(state.members):
                if not member.in_sync:
                    continue
                try:
                    return fn(member.on(self.collection_name))
                except BackendUnavailableError as exc:
                    self._record(index, operation, exc)
                    errors.append(f"member {index}: {exc}")
            raise BackendUnavailableError(f"{self._where()}: no member in sync is available ({'; '.join(errors)})")

    def _replicated_write(
        self, operation: str, fn: Callable[[DBInterface], _T], replica: Callable[[_T], tuple | None]
    ) -> _T:
        """Run ``fn`` on the authority, then copy ``replica(result)`` to every other member (or its backlog).

        The authority is the first in-sync member that answers; members before it
        (which just failed or were already behind) get the write in their backlog.
        """
        state = self._state
        if state.closed:
            raise StorageError(f"{self._where()}: the interface is closed")
        collection = self.collection_name
        with state.lock:
            self._replay_due()
            authority = None
            for index, member in enumerate(state.members):
                if not member.in_sync:
                    continue
                try:
                    result = fn(member.on(collection))
                except BackendUnavailableError as exc:
                    self._record(index, operation, exc)
                    continue
                authority = index
                break
            if authority is None:
                raise BackendUnavailableError(f"{self._where()}: no member in sync is available for {operation}")
            op = replica(result)
            if op is None:
                return result
            for index, member in enumerate(state.members):
                if index == authority:
                    continue
                if not member.in_sync:
                    member.backlog.append((collection, self._backlog_form(op)))
                    continue
                try:
                    self._apply(index, collection, op)
                except StorageError as exc:
                    self._record(index, operation, exc)
                    member.backlog.append((collection, self._backlog_form(op)))
            return result

    @staticmethod
    def _backlog_form(op: tuple) -> tuple:
        return op[:2] if op[0] == "put_blob" else op

    # ----------------------------------------------------------------- primitives
    def _write(self, doc_id: str, body: dict) -> dict | None:
        return self._replicated_write("save", lambda db: db._write(doc_id, body), lambda _: ("write", doc_id, body))

    def _get(self, ids: Sequence[str]) -> dict[str, dict]:
        return self._read("load", lambda db: db._get(ids))

    def _find(
        self, query: Node, sort: list[tuple[Path, int]], limit: int | None, skip: int, projection: list[Path] | None
    ) -> list[dict]:
        return self._read("load", lambda db: db._find(query, sort, limit, skip, projection))

    def _count(self, query: Node) -> int:
        return self._read("count", lambda db: db._count(query))

    def _remove_ids(self, ids: Sequence[str]) -> list[dict]:
        return self._replicated_write(
            "delete", lambda db: db._remove_ids(ids), lambda removed: ("remove_ids", [d["_id"] for d in removed])
        )

    def _remove_query(self, query: Node) -> list[dict]:
        return self._replicated_write(
            "delete", lambda db: db._remove_query(query), lambda removed: ("remove_ids", [d["_id"] for d in removed])
        )

    def _update(
        self, doc_id: str, update: Update, expected_version: int | None, upsert: bool
    ) -> tuple[dict | None, dict] | None:
        def replica(result: tuple[dict | None, dict] | None) -> tuple | None:
            if result is None:
                return None
            new = result[1]
            return ("write", doc_id, {k: v for k, v in new.items() if k not in ("_id", "_version")})

        return self._replicated_write(
            "update", lambda db: db._update(doc_id, update, expected_version, upsert), replica
        )

    def _put_blob(self, blob_id: str, data: bytes) -> None:
        self._replicated_write(
            "put_blob", lambda db: db._put_blob(blob_id, data), lambda _: ("put_blob", blob_id, data)
        )

    def _get_blob(self, blob_id: str) -> bytes:
        return self._read("get_blob", lambda db: db._get_blob(blob_id))

    def _delete_blobs(self, blob_ids: Iterable[str]) -> None:
        ids = list(blob_ids)
        if ids:
            self._replicated_write("delete_blobs", lambda db: db._delete_blobs(ids), lambda _: ("delete_blobs", ids))


def open_replicated(urls: Sequence[str], *, retry_interval: float = 5.0, **options: Any) -> ReplicatedInterface:
    """A ReplicatedInterface over ``open_db(url, **options)`` for each URL (the first is the primary)."""
    return ReplicatedInterface([open_db(url, **options) for url in urls], retry_interval=retry_interval)
