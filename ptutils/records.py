"""Reads of what sessions left in a database: the list of sessions, one session's record, its weights.

Everything that *reads* session records stands here, so a script, the command
line and a tuner see the same thing: :func:`sessions` lists them (filters run in
the database, newest first), :func:`session_record` shows one, both as a
:class:`SessionView` whose ``state`` is the state a person should see
(``interrupted`` for a ``running`` record whose process is gone, see
:func:`ptutils.status.describe`).  :func:`load_weights` and :func:`load_model`
get a session's trained weights back from its last, best or any kept
checkpoint, without training.  ``db`` is a DBInterface or a database URL
throughout, as for a Session.
"""

from __future__ import annotations

import fnmatch
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from .checkpoint import CheckpointStore
from .config import Config
from .database import DBInterface, opened
from .errors import CheckpointError, NotFoundError, SessionError
from .model import Model
from .status import SESSIONS, describe, is_stale, session_not_found, stale_after

STATES = ("pending", "running", "paused", "interrupted", "complete", "failed")
"""The states :func:`sessions` filters on: the lifecycle's, and ``interrupted`` (a dead ``running`` record)."""
NEWEST_FIRST = [("created", -1), ("_id", -1)]
_PAGE = 200
"""Records read at a time when a filter also runs here (the process check of a ``running`` record)."""


@attrs.frozen
class SessionView:
    """One session as a person wants to see it; ``record`` is the stored record itself."""

    id: str
    name: str
    state: str
    """The state to show: the stored one, or ``interrupted`` for a running record whose process is gone."""
    stored_state: str
    stage: str | None
    step: int
    epoch: int
    progress: float
    eta_seconds: float | None
    heartbeat_age: float | None
    """Seconds since the record's last heartbeat, when it was read."""
    parent_id: str | None
    created: float | None
    updated: float | None
    outcome: str | None
    error: Mapping[str, Any] | None
    """The exception type, message and traceback of a failed session."""
    attempt: int
    host: str | None
    pid: int | None
    metrics: Mapping[str, float]
    last_checkpoint: Mapping[str, Any] | None
    record: Mapping[str, Any] = attrs.field(repr=False, eq=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], now: float | None = None) -> SessionView:
        """The view of a stored session record, its heartbeat age and effective state as of ``now``."""
        now = time.time() if now is None else now
        heartbeat = record.get("heartbeat")
        return cls(
            id=record["_id"], name=str(record.get("name")), state=describe(record, now),
            stored_state=str(record.get("state")), stage=record.get("stage"), step=int(record.get("step") or 0),
            epoch=int(record.get("epoch") or 0), progress=float(record.get("progress") or 0.0),
            eta_seconds=record.get("eta_seconds"),
            heartbeat_age=None if heartbeat is None else max(0.0, now - float(heartbeat)),
            parent_id=record.get("parent_id"), created=record.get("created"), updated=record.get("updated"),
            outcome=record.get("outcome"), error=record.get("error"), attempt=int(record.get("attempt") or 1),
            host=record.get("host"), pid=record.get("pid"), metrics=dict(record.get("metrics") or {}),
            last_checkpoint=record.get("last_checkpoint"), record=record,
        )


def _state_filter(state: str, now: float) -> tuple[dict[str, Any], Callable[[Mapping[str, Any]], bool] | None]:
    """The query for ``state``, and the check that must still run here (None: the query says it all).

    Whether a running record is stale depends on its own status interval and,
    on this host, on whether its process lives: the database narrows the
    records down by heartbeat age (every record whose interval is the default
    or shorter is stale exactly when its heartbeat is older than
    ``stale_after(0)``), and :func:`~ptutils.status.is_stale` decides the rest.
    """
    if state not in STATES:
        raise ValueError(f"unknown session state {state!r}; choose from {', '.join(STATES)}")
    if state not in ("running", "interrupted"):
        return {"state": state}, None
    shortest = stale_after(0.0)
    cutoff = now - shortest
    if state == "running":
        fresh = [{"heartbeat": {"$gte": cutoff}}, {"status_interval": {"$gt": shortest / 5}}]
        query = {"state": "running", "$or": fresh}
        return query, lambda record: not is_stale(record, now)
    query = {"state": "running", "$or": [{"heartbeat": {"$lt": cutoff}}, {"host": socket.gethostname()}]}
    return query, lambda record: is_stale(record, now)


def _matching(sessions: DBInterface, query: Mapping[str, Any], keep: Callable[[Mapping[str, Any]], bool] | None,
              limit: int | None) -> list[dict]:
    """Records matching ``query`` and ``keep``, newest first, at most ``limit``; pages through the database."""
    if keep is None:
        return sessions.load(query, sort=NEWEST_FIRST, limit=limit)
    found: list[dict] = []
    skip = 0
    while limit is None or len(found) < limit:
        page = sessions.load(query, sort=NEWEST_FIRST, limit=_PAGE, skip=skip)
        found += [record for record in page if keep(record)]
        if len(page) < _PAGE:
            break
        skip += _PAGE
    return found[:limit]


def sessions(
    db: DBInterface | str,
    *,
    state: str | None = None,
    name: str | None = None,
    parent: str | None = None,
    limit: int | None = None,
) -> list[SessionView]:
    """The sessions stored in ``db``, newest first, as :class:`SessionView`\\ s.

    ``state`` is one of :data:`STATES` as shown (``"running"`` leaves out dead
    records, ``"interrupted"`` is only those); ``name`` an exact name or a glob
    (``"lr*"``); ``parent`` a parent session's id.  Archived attempts are not
    listed.  The filters run in the database; the liveness of ``running``
    records is checked here.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    now = time.time()
    query: dict[str, Any] = {"kind": "session"}
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    if state is not None:
        state_query, check = _state_filter(state, now)
        query.update(state_query)
        if check is not None:
            checks.append(check)
    if name is not None:
        if any(c in name for c in "*?["):
            checks.append(lambda record: fnmatch.fnmatchcase(str(record.get("name")), name))
        else:
            query["name"] = name
    if parent is not None:
        query["parent_id"] = parent
    keep = None if not checks else (lambda record: all(check(record) for check in checks))
    with opened(db) as interface:
        found = _matching(interface.collection(SESSIONS), query, keep, limit)
    return [SessionView.from_record(record, now) for record in found]


def session_record(db: DBInterface | str, session_id: str) -> SessionView:
    """The session ``session_id`` of ``db`` (its stored record in ``.record``); SessionNotFound names id and URL."""
    with opened(db) as interface:
        try:
            record = interface.collection(SESSIONS).load_from_id(session_id)
        except NotFoundError:
            raise session_not_found(interface, session_id) from None
    return SessionView.from_record(record)


def _checkpoint_state(db: DBInterface, view: SessionView, checkpoint: str | int,
                      checkpoint_db: DBInterface | str | None) -> dict[str, Any]:
    """The state saved in the session's ``checkpoint`` ("last", "best" or a step), read without pickle."""
    config = view.record.get("config") or {}
    where = checkpoint_db if checkpoint_db is not None else (config.get("checkpoint") or {}).get("db") or db
    with opened(where) as store_db:
        store = CheckpointStore(store_db, view.id)
        if checkpoint == "last":
            found = store.load_latest()
            if found is None:
                raise CheckpointError(f"session {view.id!r} has no readable checkpoint in {store_db.url}")
            return found[0]
        return store.read(store.find(checkpoint))


def load_weights(db: DBInterface | str, session_id: str, checkpoint: str | int = "last", *,
                 checkpoint_db: DBInterface | str | None = None) -> dict[str, torch.Tensor]:
    """The module's state dict (CPU tensors) saved in a session's ``"last"`` or ``"best"`` checkpoint, or at a step.

    ``"best"`` is the best by the session's ``keep_best`` metric.  The
    checkpoints are read from ``checkpoint_db`` when the session kept them apart
    (a config's ``checkpoint.db`` is found by itself).
    """
    with opened(db) as interface:
        view = session_record(interface, session_id)
        return _checkpoint_state(interface, view, checkpoint, checkpoint_db)["model"]["module"]


def load_model(db: DBInterface | str, session_id: str, *, model: Model | nn.Module | None = None,
               checkpoint: str | int = "last", checkpoint_db: DBInterface | str | None = None) -> Model | nn.Module:
    """A session's model with the weights of its ``checkpoint``, trained no further.

    Without ``model`` it is rebuilt from the config in the session's record (a
    session made by ``Session.from_config``), without touching the global RNG;
    a ``Model`` given gets its module, optimizer and scheduler state, an
    ``nn.Module`` its weights.  Returns the model loaded.
    """
    with opened(db) as interface:
        view = session_record(interface, session_id)
        state = _checkpoint_state(interface, view, checkpoint, checkpoint_db)["model"]
        if model is None:
            if not view.record.get("config"):
                raise SessionError(
                    f"session {session_id!r} was not built from a Config, so its model cannot be rebuilt from its "
                    f"record: pass model= (a ptutils Model or a torch.nn.Module shaped as the one it trained)"
                )
            with torch.random.fork_rng(devices=[]):
                model = Model.from_config(Config.from_dict(view.record["config"]).model)
        elif not isinstance(model, (Model, nn.Module)):
            raise SessionError(f"model must be a ptutils Model or a torch.nn.Module, got {type(model).__name__}")
    try:
        if isinstance(model, Model):
            model.load_state_dict(state)
        else:
            model.load_state_dict(state["module"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SessionError(
            f"the {checkpoint!r} checkpoint of session {session_id!r} does not fit the model "
            f"(did a stage's setup change its structure? then pass model= shaped as it ended): {exc}"
        ) from exc
    return model
