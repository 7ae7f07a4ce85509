"""One round of one child of a tuning session: claim its record, rebuild it, run it to a step, let go.

This is what crosses a process boundary (a pool worker, a Ray task): a
:class:`ChildTask` holds only the database URL, the child's id, the step to run
to and the parent's run token.  The child is rebuilt from the config its
record holds and continues from its newest checkpoint, so any process can run
any round, and a round run twice gives the same weights.

A child is claimed before it runs: the record's ``owner`` is set by a
guarded update (``expected_version``), refused while another live process
holds it, and a task whose parent has since restarted (a new run token in the
parent's record) does not run at all.  The record's ``owner`` is cleared when
the round ends; its ``claims`` list logs every claim and release.  The
database is the truth; the return value only says what happened.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from .database import DBInterface, open_db
from .errors import ConflictError, NotFoundError, SessionError
from .session import Session
from .status import SESSIONS, is_stale, pid_alive

CLAIM_GRACE_S = 60.0
"""A claim of another host's process that has not started its session after this long is taken as dead."""


@attrs.frozen
class ChildTask:
    """What a worker needs to run one round of a child: only ids and numbers, so it pickles anywhere."""

    db_url: str
    child_id: str
    parent_id: str
    token: str
    """The parent's run token; a task from before the parent restarted finds another one and does nothing."""
    until: int | None = None
    """The step to run to (None: to the end of the child's budget)."""
    threads: int | None = 1
    """torch's intra-op threads for the round (the same count everywhere gives the same weights)."""
    env: Mapping[str, str] = attrs.field(factory=dict)
    """Environment for the round, e.g. ``CUDA_VISIBLE_DEVICES`` from :mod:`ptutils.gpus`."""


OUTCOMES = ("ran", "finished", "busy", "stale")
"""``ran``: the round ran; ``finished``: the child had ended; ``busy``: another process holds it; ``stale``: the
parent restarted since the task was made."""


def claim_refused(record: Mapping[str, Any], now: float | None = None) -> str | None:
    """Why a child's record cannot be claimed now (another live process holds it), or None."""
    now = time.time() if now is None else now
    if record.get("state") == "running" and not is_stale(record, now):
        return f"running in process {record.get('pid')} on {record.get('host')}"
    owner = record.get("owner")
    if not isinstance(owner, Mapping):
        return None
    if owner.get("host") == socket.gethostname():
        pid = owner.get("pid")
        alive = isinstance(pid, int) and (pid == os.getpid() or pid_alive(pid))
        return f"claimed by process {pid}" if alive else None
    if now - float(owner.get("claimed") or 0.0) < CLAIM_GRACE_S:
        return f"claimed by process {owner.get('pid')} on {owner.get('host')}"
    return None


def claim(sessions: DBInterface, child_id: str, token: str) -> dict | str:
    """Take the child's record for this process (the new record), or the reason it cannot be taken."""
    record = sessions.load_from_id(child_id)
    refused = claim_refused(record)
    if refused is not None:
        return refused
    owner = {"token": token, "pid": os.getpid(), "host": socket.gethostname(), "claimed": time.time()}
    try:
        return sessions.update(child_id, {"$set": {"owner": owner}, "$push": {"claims": {**owner, "event": "claim"}}},
                               expected_version=record["_version"])
    except ConflictError:
        return "claimed by another process at the same time"


def release(sessions: DBInterface, child_id: str, token: str) -> None:
    """Clear the claim, if it is still this process's (again if the record was written meanwhile)."""
    while True:
        record = sessions.load_from_id(child_id)
        owner = record.get("owner")
        if not (isinstance(owner, Mapping) and owner.get("token") == token and owner.get("pid") == os.getpid()):
            return
        entry = {"token": token, "pid": os.getpid(), "host": socket.gethostname(), "released": time.time(),
                 "event": "release"}
        try:
            sessions.update(child_id, {"$set": {"owner": None}, "$push": {"claims": entry}},
                            expected_version=record["_version"])
            return
        except ConflictError:
            continue  # a pause request or a heartbeat landed between the read and the write


def run_child(task: ChildTask) -> dict[str, Any]:
    """Run one round of a child (see :class:`ChildTask`); returns ``{"child", "outcome", "state", "step"}``."""
    old_env = {key: os.environ.get(key) for key in task.env}
    os.environ.update(task.env)
    old_threads = torch.get_num_threads()
    if task.threads:
        torch.set_num_threads(task.threads)
    db = open_db(task.db_url)
    try:
        sessions = db.collection(SESSIONS)
        try:
            parent = sessions.load_from_id(task.parent_id)
        except NotFoundError:
            raise SessionError(f"tuning session {task.parent_id!r} is not in {task.db_url}") from None
        if (parent.get("tuning") or {}).get("token") != task.token:
            return _result(task, "stale", parent)
        record = sessions.load_from_id(task.child_id)
        if record.get("state") in ("complete", "failed"):
            return _result(task, "finished", record)
        claimed = claim(sessions, task.child_id, task.token)
        if isinstance(claimed, str):
            return {**_result(task, "busy", record), "reason": claimed}
        try:
            session = Session.resume(db, task.child_id)
            try:
                session.run(until_step=task.until)
            except Exception:
                pass  # the session recorded its failure (type, message, traceback): the record tells the parent
            finally:
                session.close()
        finally:
            release(sessions, task.child_id, task.token)
        return _result(task, "ran", sessions.load_from_id(task.child_id))
    finally:
        db.close()
        torch.set_num_threads(old_threads)
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _result(task: ChildTask, outcome: str, record: Mapping[str, Any]) -> dict[str, Any]:
    return {"child": task.child_id, "outcome": outcome, "state": record.get("state"), "step": record.get("step")}
