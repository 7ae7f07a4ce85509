"""The ``ptutils`` command: list, inspect and steer stored sessions from a shell (``python -m ptutils`` too).

Everything it shows is read through the calls a script has (:func:`ptutils.sessions`,
:func:`ptutils.session_record`, :func:`ptutils.status.metric_history`), and
everything it changes goes through the Session (``Session.resume(db, id)``,
:func:`ptutils.status.request_pause`), so the command adds no second path.

Exit codes (:data:`EXIT_CODES`): 0 success, 1 a usage or config error or a
request the session's state refuses, 2 no such session, 3 the database cannot
be used (bad URL, unreachable server, missing driver, storage error), 4 a
session run by ``run``/``resume`` ended failed, 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

from .app import EXIT_CODES, app, main

__all__ = ["EXIT_CODES", "app", "main"]
