"""What the command reads of a session, through the library's own read calls (no query of its own)."""

from __future__ import annotations

import datetime as _dt
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..checkpoint import CheckpointStore
from ..database import DBInterface, opened
from ..records import SessionView, session_record
from ..status import StatusWriter, metric_history

LOWER_IS_BETTER = re.compile(r"loss|err|perplexity|mse|mae|rmse|nll", re.IGNORECASE)
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since_cutoff(text: str, now: float | None = None) -> float:
    """The time ``text`` names: an age (``90s``, ``30m``, ``2h``, ``1d``, ``1w``) or an ISO date/time (local)."""
    now = time.time() if now is None else now
    match = _SINCE.match(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: expected an age such as 30m, 2h, 1d, 1w or an ISO date such as "
                         f"2024-05-01 or 2024-05-01T14:00") from None
    return moment.timestamp()


def metric_mode(name: str, view: SessionView | None = None) -> str:
    """``min`` or ``max``: the session's own ``keep_best`` mode for that metric, else guessed from the name."""
    if view is not None:
        checkpoint = ((view.record.get("config") or {}).get("checkpoint") or {})
        if checkpoint.get("keep_best") == name and checkpoint.get("best_mode") in ("min", "max"):
            return checkpoint["best_mode"]
    return "min" if LOWER_IS_BETTER.search(name) else "max"


def events(db: DBInterface, session_id: str, kind: str | None = None) -> list[dict]:
    """The session's stored events (of ``kind``), in time order, as the session itself reads them."""
    return StatusWriter(db, session_id).load_events(kind)


def history(db: DBInterface, view: SessionView, name: str, stored: list[dict] | None = None) -> list:
    """Metric ``name``'s values in the session's current attempt (``MetricPoint``\\ s, oldest first)."""
    stored = events(db, view.id, "metrics") if stored is None else stored
    return metric_history(stored, name, view.attempt)


def metric_names(stored: Sequence[Mapping[str, Any]], attempt: int) -> list[str]:
    names: dict[str, None] = {}
    for e in stored:
        if e.get("kind") == "metrics" and e.get("attempt") == attempt:
            names.update(dict.fromkeys(e.get("metrics") or {}))
    return list(names)


def summarise(points: Sequence, mode: str) -> dict[str, Any]:
    """Last and best value (and the step of the best) of a metric's points."""
    finite = [p for p in points if isinstance(p.value, (int, float)) and math.isfinite(p.value)]
    if not finite:
        return {"last": None, "last_step": None, "best": None, "best_step": None, "count": len(points)}
    best = (min if mode == "min" else max)(finite, key=lambda p: p.value)
    return {"last": finite[-1].value, "last_step": finite[-1].step, "best": best.value, "best_step": best.step,
            "mode": mode, "count": len(points)}


def stage_total(view: SessionView) -> int | None:
    """Steps the current stage allows, from what the record shows of its progress (None: unknown)."""
    done = view.record.get("stage_step")
    frac = view.record.get("stage_progress")
    if not isinstance(done, int) or not isinstance(frac, (int, float)) or frac <= 0 or done <= 0:
        return None
    return int(round(done / frac))


def view_dict(view: SessionView) -> dict[str, Any]:
    """A session view as plain data (the record itself left out), with the current stage's step and total."""
    data = attrs.asdict(view, filter=lambda a, _v: a.name != "record")
    data["stage_step"] = view.record.get("stage_step")
    data["stage_total"] = stage_total(view)
    return data


def checkpoint_db_url(view: SessionView) -> str | None:
    """Where the session keeps its checkpoints when not in its own database (its config's ``checkpoint.db``)."""
    return ((view.record.get("config") or {}).get("checkpoint") or {}).get("db")


def checkpoints(db: DBInterface, view: SessionView) -> list[dict]:
    """The session's checkpoint records, newest first."""
    where = checkpoint_db_url(view)
    with opened(where if where else db) as store_db:
        return CheckpointStore(store_db, view.id).records()


def attempts(db: DBInterface, view: SessionView) -> list[dict[str, Any]]:
    """Every attempt of the session: the archived ones (from their archive records) and the current one."""
    rows = []
    for summary in view.record.get("history") or []:
        archived: Mapping[str, Any] = {}
        if summary.get("record"):
            try:
                archived = session_record(db, summary["record"]).record
            except Exception:  # noqa: BLE001 - an archive gone missing still leaves its summary
                archived = {}
        rows.append({**summary, "host": archived.get("host"), "pid": archived.get("pid"),
                     "reason": archived.get("pause_reason")})
    rec = view.record
    rows.append({"attempt": view.attempt, "state": view.state, "outcome": view.outcome, "started": rec.get("started"),
                 "finished": rec.get("finished"), "step": view.step, "host": view.host, "pid": view.pid,
                 "reason": rec.get("pause_reason"), "error": (view.error or {}).get("type"), "record": view.id})
    return rows
