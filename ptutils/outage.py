"""Storage outages: the one clock of how long the database has been unreachable, and retrying through it.

A session writes in two ways.  Writes its record depends on (a state change,
the checkpoint a record will point to) wait out an outage with
:func:`retry_through_outage`.  Background writes (heartbeats, events, periodic
checkpoints) are not retried: each one lost is reported to the session's
:class:`OutageClock`, and so is every failed status write.  One clock sees them
all, so a long outage is measured from its first lost write, whichever kind
that was; when it has lasted ``pause_after`` seconds the session pauses
(:meth:`OutageClock.overdue` says why).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .errors import BackendUnavailableError

log = logging.getLogger("ptutils")


class OutageClock:
    """When the current storage outage began and its latest error; None/None while healthy."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.error: str | None = None
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        """Note a write lost to an unreachable database (the first one starts the clock)."""
        if self.since is None:
            self.since = time.monotonic()
        self.failures += 1
        self.error = f"{type(exc).__name__}: {exc}"

    def healthy(self) -> None:
        """The database answered: the outage, if any, is over."""
        self.since = None
        self.error = None

    def seconds(self) -> float:
        """How long the database has been failing writes (0 when healthy)."""
        return 0.0 if self.since is None else time.monotonic() - self.since

    def overdue(self, pause_after: float) -> str | None:
        """The reason to pause when the outage has lasted ``pause_after`` seconds, else None."""
        if self.since is None:
            return None
        lasted = time.monotonic() - self.since
        if lasted < pause_after:
            return None
        return f"storage outage for {lasted:.0f}s: {self.error}"


def retry_through_outage(write: Callable[[], Any], *, what: str, wait: float, owner: str) -> Any:
    """Run ``write``, retried with backoff while the database is unreachable; return its result.

    After ``wait`` seconds the BackendUnavailableError propagates.  ``what`` and
    ``owner`` (the session id) name the write in the log.
    """
    deadline = time.monotonic() + wait
    delay = 0.2
    while True:
        try:
            return write()
        except BackendUnavailableError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("session %s: cannot %s (%s); retrying in %.1fs", owner, what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
