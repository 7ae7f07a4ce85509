"""The ptutils exception types.

Every error names what it is about (the config field, the session state and
trigger, the file, the document id or key path) so a user can act on it without
reading a traceback.  Each also derives from the closest built-in exception so
callers that catch ``ValueError``/``KeyError`` keep working.
"""

from __future__ import annotations

from typing import Any


class PtutilsError(Exception):
    """Base class of every error raised by ptutils."""


class ConfigError(PtutilsError, ValueError):
    """A configuration value is missing, of the wrong type, or unknown.

    ``field`` is the dotted path of the offending field (e.g. ``optimizer.lr``).
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field {field!r}: {message}")


class TransitionError(PtutilsError):
    """A trigger was fired in a state that does not allow it."""

    def __init__(self, trigger: str, state: str, message: str | None = None):
        self.trigger = trigger
        self.state = state
        detail = f": {message}" if message else ""
        super().__init__(f"cannot {trigger!r} a session in state {state!r}{detail}")


class SessionError(PtutilsError):
    """A session cannot be built, resumed or run as asked."""


class StorageError(PtutilsError):
    """Base class of errors raised by a DBInterface."""


class BackendUnavailableError(StorageError):
    """The database cannot be reached (possibly transient: retry later)."""


class NotFoundError(StorageError, KeyError):
    """No document (or blob) has the given id."""

    def __init__(self, what: str, key: str, where: str = ""):
        self.key = key
        loc = f" in {where}" if where else ""
        super().__init__(f"no {what} with id {key!r}{loc}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class SessionNotFound(NotFoundError, SessionError):
    """No session record has the given id in the database given (``url``); ``hint`` may name ids most like it."""

    def __init__(self, session_id: str, url: str, hint: str = ""):
        self.session_id = session_id
        self.url = url
        self._hint = hint
        super().__init__("session", session_id, url)

    def __str__(self) -> str:
        return super().__str__() + self._hint


class ConfigChangeError(SessionError, ValueError):
    """A session was asked to go on under a config that differs from the one its record ran with.

    ``fields`` maps each differing dotted path to ``(recorded, new)``; the
    message says, per field, whether ``overrides=`` could apply it.
    """

    def __init__(self, session_id: str, fields: dict[str, tuple[Any, Any]], message: str):
        self.session_id = session_id
        self.fields = fields
        super().__init__(message)


class InvalidIdError(StorageError, ValueError):
    """An id or collection name is malformed or could escape the storage root."""

    def __init__(self, kind: str, value: Any, reason: str):
        self.value = value
        super().__init__(f"invalid {kind} {value!r}: {reason}")


class CodecError(StorageError, TypeError):
    """A value cannot be encoded or decoded; ``path`` is its key path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"at {path or '<root>'}: {message}")


class QueryError(StorageError, ValueError):
    """A query or update document uses something outside the supported subset."""


class ConflictError(StorageError):
    """An optimistic update lost a race: the document changed in between."""


class CorruptionError(StorageError):
    """Stored bytes fail their checksum or cannot be parsed; ``where`` names them."""

    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(f"{where}: {message}")


class SchemaVersionError(StorageError):
    """The database was written by a newer, unknown version of ptutils."""


class DocumentTooLargeError(StorageError):
    """A document exceeds what the backend can store in one record."""


class CheckpointError(PtutilsError):
    """No usable checkpoint could be saved or loaded."""


class DataError(PtutilsError):
    """A data source is missing, malformed or inconsistent; names file and index."""

    def __init__(self, message: str, *, file: str | None = None, index: Any = None):
        self.file = file
        self.index = index
        where = []
        if file is not None:
            where.append(f"file {file!r}")
        if index is not None:
            where.append(f"index {index!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(prefix + message)


class GpuDiscoveryError(PtutilsError):
    """GPUs could not be listed: a node's answer is malformed or its query failed; names the node and the line.

    ``node`` is the host (or salt minion) whose output is at fault, ``None``
    where the whole query failed; ``line_number`` counts from 1 within that
    node's output and ``line`` is its text.
    """

    def __init__(self, node: str | None, message: str, *, line_number: int | None = None, line: str | None = None):
        self.node = node
        self.line_number = line_number
        self.line = line
        where = []
        if node is not None:
            where.append(f"node {node!r}")
        if line_number is not None:
            where.append(f"line {line_number} {line!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(prefix + message)


class Interrupted(KeyboardInterrupt):
    """``Session.run()`` was stopped by a signal (Ctrl-C's SIGINT, or SIGTERM); ``signal`` names it.

    After the first signal the session checkpointed at a step boundary and its
    record says ``paused`` (``aborted`` is False); after a second one it stopped
    at once and its record says ``paused`` and ``interrupted`` (``aborted`` is
    True), to resume from its newest checkpoint.  Either way ``run()`` continues
    it.  A KeyboardInterrupt rather than a PtutilsError, so that ``except
    Exception`` does not swallow it and ``except KeyboardInterrupt`` still
    catches a Ctrl-C.
    """

    def __init__(self, signal: str, session_id: str, step: int, *, aborted: bool = False):
        self.signal = signal
        self.session_id = session_id
        self.step = step
        self.aborted = aborted
        if aborted:
            what = (f"aborted by a second {signal} at step {step}; its record says paused (interrupted): "
                    "run() resumes it from its newest checkpoint")
        else:
            what = f"paused by {signal} at step {step} (checkpointed): run() continues it"
        super().__init__(f"session {session_id!r} {what}")
