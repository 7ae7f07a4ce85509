"""Ctrl-C and SIGTERM during ``Session.run()``: the first pauses at the next step boundary, a second aborts.

:class:`PauseOnSignals` is the context manager ``run()`` enters around its
loop.  In the main thread it installs handlers for SIGINT and SIGTERM and
restores the previous ones on exit, also when the loop raises; called from any
other thread it installs nothing (Python lets only the main thread set
handlers, and a signal is the whole process's, not one session's).

* The first signal asks the session to pause (``request_pause(reason="SIGINT")``,
  which only sets flags): the loop checkpoints at the next step boundary and
  records ``paused`` with the signal as its reason; ``run()`` then raises
  :class:`~ptutils.errors.Interrupted` (:meth:`PauseOnSignals.raise_if_paused`).
* A second signal while the session still runs raises ``Interrupted(aborted=True)``
  from the handler, wherever the step is; ``run()`` then records ``paused`` and
  ``interrupted`` (:func:`abort_reason`), to resume from the newest checkpoint
  as after a crash.
* A handler the user installed from Python before ``run()`` is called at
  every signal, after the pause is requested (and before a second signal
  aborts), with the same arguments; if it raises, the run stops at once as
  after a second signal.  A signal set to be ignored (``SIG_IGN``, as for jobs a
  shell starts in the background) stays ignored, and one whose handler was not
  set from Python (``getsignal`` gives None) is left alone, as it could not be
  restored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Any, Protocol

from .errors import Interrupted

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
"""The signals ``run()`` turns into a pause: Ctrl-C, and a scheduler preempting the job."""


class Pausable(Protocol):
    """What the handlers use of a session."""

    id: str

    @property
    def is_running(self) -> bool: ...
    @property
    def step(self) -> int: ...
    @property
    def state(self) -> str: ...
    def request_pause(self, reason: str = "requested") -> None: ...


class PauseOnSignals:
    """While entered (in the main thread): SIGINT and SIGTERM pause ``session`` instead of killing it."""

    def __init__(self, session: Pausable, signals: Sequence[signal.Signals] = SIGNALS):
        self._session = session
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self.received: str | None = None
        """The name of the first signal received while entered (``"SIGINT"``), or None."""

    def __enter__(self) -> PauseOnSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self._signals:
            previous = signal.getsignal(sig)
            if previous is None or previous is signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        session = self._session
        first = self.received is None
        if first:
            self.received = name
            if session.is_running:  # else the loop has ended: nothing is left to pause
                session.request_pause(reason=name)
        chained = self._previous.get(signum)
        if callable(chained) and chained is not signal.default_int_handler:
            chained(signum, frame)
        if not first and session.is_running:
            raise Interrupted(name, session.id, session.step, aborted=True)

    def raise_if_paused(self) -> None:
        """After the loop: raise Interrupted if a signal paused the session (not if it ended anyway)."""
        if self.received is not None and self._session.state == "paused":
            raise Interrupted(self.received, self._session.id, self._session.step)


def abort_reason(exc: BaseException, step: int) -> str:
    """The ``pause_reason`` of a run stopped at once by ``exc`` (a second signal, a KeyboardInterrupt, a SystemExit)."""
    if isinstance(exc, Interrupted):
        return f"aborted by a second {exc.signal} at step {step}"
    return f"aborted by {type(exc).__name__} at step {step}"
