"""The session's one background writer: an ordered thread for heartbeats, events and checkpoints.

Writes are submitted from the loop and run in order on a single thread, so a
checkpoint's record never overtakes the blob it points to and a heartbeat never
reports a step before the checkpoint of an earlier one.  A write lost to an
unreachable database is reported to the session's :class:`~ptutils.outage.OutageClock`
and not raised (checkpoints are periodic, heartbeats carry no history); any
other failure is raised in the loop at the next :meth:`BackgroundWriter.reap`
or :meth:`BackgroundWriter.drain`, so the session fails.

The start of a run is written *ahead* of the loop: :meth:`BackgroundWriter.ahead`
queues it first, and every later write, drain or read of the record waits for
it (:meth:`BackgroundWriter.await_ahead`).  If it fails, the undo given with it
runs on the loop's thread before the error is raised there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .errors import BackendUnavailableError
from .outage import OutageClock

log = logging.getLogger("ptutils")


class BackgroundWriter:
    """One ordered writer thread (started on first use) and the futures of its queued writes."""

    def __init__(self, owner: str, outage: OutageClock):
        self.owner = owner
        self.outage = outage
        self._pool: ThreadPoolExecutor | None = None
        self._queued: list[Future] = []
        self._ahead: Future | None = None
        self._undo: Callable[[BaseException], None] | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptutils-writer")
        return self._pool

    # ------------------------------------------------------------------ the write ahead of the loop
    def ahead(self, write: Callable[[], Any], undo: Callable[[BaseException], None]) -> None:
        """Queue ``write`` before anything else; if it fails, ``undo(error)`` runs where it is awaited."""
        self._undo = undo
        self._ahead = self._executor().submit(write)

    @property
    def ahead_pending(self) -> bool:
        """Whether the write ahead of the loop is still running."""
        return self._ahead is not None and not self._ahead.done()

    def await_ahead(self) -> None:
        """Wait for the write ahead of the loop; on failure run its undo, then raise the error."""
        ahead = self._ahead
        if ahead is None:
            return
        try:
            ahead.result()
        except BaseException as exc:
            if not ahead.done():
                raise  # the wait was interrupted (Ctrl-C), not the write: it goes on, and is awaited again
            self._ahead = None
            undo, self._undo = self._undo, None
            if undo is not None:
                undo(exc)
            raise
        self._ahead = self._undo = None

    # ------------------------------------------------------------------ ordinary writes
    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue a write (after the write ahead of the loop, and after every earlier write)."""
        self.await_ahead()
        self.reap()
        future = self._executor().submit(fn, *args)
        self._queued.append(future)
        return future

    def reap(self) -> None:
        """Forget finished writes; one lost to an outage is counted, any other failure raises here."""
        if not self._queued:
            return
        done = [f for f in self._queued if f.done()]
        if done:
            self._queued = [f for f in self._queued if not f.done()]
            for future in done:
                try:
                    future.result()
                except BackendUnavailableError as exc:
                    self._lost(exc)

    def drain(self, *, raise_errors: bool = True) -> None:
        """Wait for every queued write; raise the first failure (or only log it).

        A write lost to an unreachable database is logged and counted as an
        outage, not raised: checkpoints are periodic and heartbeats carry no
        history, so the run can go on.
        """
        self.await_ahead()
        queued, self._queued = self._queued, []
        errors = []
        for future in queued:
            try:
                future.result()
            except BackendUnavailableError as exc:
                self._lost(exc)
            except Exception as exc:
                errors.append(exc)
        for exc in errors[1:]:
            log.error("session %s: another background write failed too: %s", self.owner, exc)
        if errors:
            if raise_errors:
                raise errors[0]
            log.error("session %s: background write failed: %s", self.owner, errors[0])

    def _lost(self, exc: BaseException) -> None:
        self.outage.failed(exc)
        log.warning("session %s: background write failed, database unreachable: %s", self.owner, exc)

    def close(self) -> None:
        """Stop the thread once its queued writes are done."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
