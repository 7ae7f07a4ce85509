"""The ``ptutils`` Typer app: global options, the commands, and how errors become one line and an exit code."""

from __future__ import annotations

import csv
import io
import os
import sys
import time
import tomllib
import traceback
from pathlib import Path
from collections.abc import Mapping
from typing import Any, NoReturn, Optional

import attrs
import click
import typer

from .. import errors as E
from ..database import DBInterface, open_db, opened
from ..records import STATES, SessionView, session_record, sessions
from ..status import EVENTS, SESSIONS, is_stale, request_pause
from . import format as F
from . import reading as R

EXIT_OK, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_STORAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_USAGE: "usage or config error, or a request the session's state refuses",
    EXIT_NOT_FOUND: "no such session",
    EXIT_STORAGE: "the database cannot be used: bad URL, unreachable server, missing driver, storage error",
    EXIT_FAILED: "the session run by `run`, `resume` or `restart --run` ended failed",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); a running session was paused and can be resumed",
}


class CliError(Exception):
    """A refusal of the command itself, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        self.code = code
        super().__init__(message)


@attrs.define
class Context:
    db_url: str
    json: bool
    debug: bool
    plain: bool
    _db: DBInterface | None = None

    @property
    def db(self) -> DBInterface:
        if self._db is None:
            self._db = open_db(self.db_url)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def output(self) -> F.Output:
        return F.Output(rich=not self.plain and sys.stdout.isatty())


app = typer.Typer(
    name="ptutils", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="List, inspect and steer ptutils sessions stored in a database.\n\n"
         "The database is --db URL, else $PTUTILS_DB, else ./ptutils-runs (file://). Exit codes: 0 ok, "
         "1 usage/config/refused, 2 no such session, 3 database unusable, 4 the run ended failed, 130 Ctrl-C.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _default_db() -> str:
    from ..session import default_db_url

    return default_db_url()


@app.callback()
def _root(
    ctx: typer.Context,
    db: Optional[str] = typer.Option(None, "--db", envvar="PTUTILS_DB", show_envvar=True,
                                     help="Database URL: file:///dir, sqlite:///f.db, postgresql://..., mongodb://..."),
    json_: bool = typer.Option(False, "--json", help="Machine-readable JSON output."),
    plain: bool = typer.Option(False, "--plain", help="Plain text even in a terminal (the default when piped)."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error."),
) -> None:
    ctx.obj = Context(db_url=db or _default_db(), json=json_, debug=debug, plain=plain)
    ctx.call_on_close(ctx.obj.close)


def _ctx(ctx: typer.Context, json_: bool = False) -> Context:
    c: Context = ctx.find_root().obj
    if json_:
        c.json = True
    return c


JSON_OPT = typer.Option(False, "--json", help="Machine-readable JSON output.")


def _emit_json(value: Any) -> None:
    print(F.to_json(value))


# ---------------------------------------------------------------------------------------------------------- ls
def _tree(views: list[SessionView]) -> list[tuple[SessionView, int]]:
    """Views in order, each child right under its parent (when the parent is listed), with its depth."""
    listed = {v.id for v in views}
    children: dict[str, list[SessionView]] = {}
    for v in views:
        if v.parent_id in listed:
            children.setdefault(v.parent_id, []).append(v)
    out: list[tuple[SessionView, int]] = []

    def walk(v: SessionView, depth: int) -> None:
        out.append((v, depth))
        for child in children.get(v.id, []):
            walk(child, depth + 1)

    for v in views:
        if v.parent_id not in listed:
            walk(v, 0)
    return out


@app.command("ls")
def ls(
    ctx: typer.Context,
    state: Optional[str] = typer.Option(None, "--state", help=f"Only sessions in this state: {', '.join(STATES)}."),
    name: Optional[str] = typer.Option(None, "--name", help="Only this name, or a glob such as 'lr*'."),
    parent: Optional[str] = typer.Option(None, "--parent", help="Only the children of this session."),
    since: Optional[str] = typer.Option(None, "--since", help="Only sessions created since: 30m, 2h, 1d or an ISO date."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Add best and last value columns of this metric."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Whether lower (min) or higher (max) is the best value "
                                       "of --metric; guessed from the name (loss, error: min) or the session's keep_best."),
    limit: int = typer.Option(50, "--limit", min=0, help="Show at most N sessions (newest first); 0 shows all."),
    json_: bool = JSON_OPT,
) -> None:
    """List sessions, newest first, children indented under their parent."""
    c = _ctx(ctx, json_)
    if mode is not None and mode not in ("min", "max"):
        raise CliError(f"--mode must be min or max, got {mode!r}")
    cutoff = R.since_cutoff(since) if since else None
    views = sessions(c.db, state=state, name=name, parent=parent)
    if cutoff is not None:
        views = [v for v in views if (v.created or 0) >= cutoff]
    counts: dict[str, int] = {}
    for v in views:
        counts[v.state] = counts.get(v.state, 0) + 1
    shown = views if not limit else views[:limit]
    rows = _tree(shown)
    summaries: dict[str, dict] = {}
    if metric:
        for v, _ in rows:
            summaries[v.id] = R.summarise(R.history(c.db, v, metric), mode or R.metric_mode(metric, v))
    if c.json:
        docs = []
        for v, depth in rows:
            doc = R.view_dict(v)
            doc["depth"] = depth
            if metric:
                doc["metric"] = {"name": metric, **summaries[v.id]}
            docs.append(doc)
        _emit_json({"db": c.db.url, "counts": counts, "total": len(views), "shown": len(rows),
                    "more": len(views) - len(rows), "sessions": docs})
        return
    out = c.output()
    order = [s for s in F.STATE_ORDER if s in counts] + sorted(set(counts) - set(F.STATE_ORDER))
    summary = " | ".join(f"{counts[s]} {s}" for s in order) or "none"
    out.line(f"Sessions: {summary}        as of {time.strftime('%H:%M:%S')}  ({c.db.url})")
    if not rows:
        return
    columns = ["ID", "NAME", "STATE", "STAGE", "STEP", "PROG", "ETA", "BEAT"]
    if metric:
        columns += [f"BEST {metric}", f"LAST {metric}"]
    columns.append("PARENT")
    table, styles = [], []
    for v, depth in rows:
        total = R.stage_total(v)
        stage_step = v.record.get("stage_step")
        step = f"{F.count(stage_step)}/{F.count(total)}" if total and isinstance(stage_step, int) else F.count(v.step)
        live = v.state == "running"
        cells = [("  " * (depth - 1) + "└ " if depth else "") + v.id, v.name, v.state, v.stage or "-", step,
                 f"{v.progress * 100:.0f}%", F.duration(v.eta_seconds) if live else "-",
                 F.duration(v.heartbeat_age) if v.state in ("running", "interrupted") else "-"]
        if metric:
            s = summaries[v.id]
            cells += [f"{F.number(s['best'])} @{F.count(s['best_step'])}" if s["best"] is not None else "-",
                      F.number(s["last"])]
        cells.append(v.parent_id or "-")
        table.append(cells)
        styles.append(F.STATE_STYLE.get(v.state))
    out.table(columns, table, styles=styles, right={"STEP", "PROG", "ETA", "BEAT"})
    if len(views) > len(rows):
        hidden: dict[str, int] = {}
        for v in views[len(rows):]:
            hidden[v.state] = hidden.get(v.state, 0) + 1
        more = ", ".join(f"{n} {s}" for s, n in hidden.items())
        out.line(f"… and {len(views) - len(rows)} more ({more}): --limit 0 shows all")


# ---------------------------------------------------------------------------------------------------------- show
@app.command("show")
def show(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., metavar="ID", help="The session's id."),
    json_: bool = JSON_OPT,
) -> None:
    """A session's state, stages, attempts, error, checkpoints, metrics, config and metadata."""
    c = _ctx(ctx, json_)
    db = c.db
    view = session_record(db, session_id)
    stored = R.events(db, view.id)
    metric_events = [e for e in stored if e.get("kind") == "metrics"]
    names = R.metric_names(metric_events, view.attempt)
    metrics = {n: R.summarise(R.history(db, view, n, metric_events), R.metric_mode(n, view)) for n in names}
    series = {n: [p.value for p in R.history(db, view, n, metric_events)] for n in names}
    ckpts = R.checkpoints(db, view)
    tries = R.attempts(db, view)
    stages = [e for e in stored if e.get("kind") == "stage" and e.get("attempt") == view.attempt]
    process = [e for e in stored if e.get("kind") in ("interrupted", "resume", "warning", "config_change")]
    children = sessions(db, parent=view.id) if view.record.get("children") else []
    if c.json:
        _emit_json({"session": R.view_dict(view), "record": view.record, "attempts": tries, "stages": stages,
                    "process_events": process, "checkpoints": ckpts, "metrics": metrics,
                    "metric_history": {n: [p._asdict() for p in R.history(db, view, n, metric_events)] for n in names},
                    "children": [R.view_dict(ch) for ch in children]})
        return
    out = c.output()
    rec = view.record
    out.heading(f"Session {view.id} ({view.name})")
    total = R.stage_total(view)
    status = [("state", view.state + (f" (record says {view.stored_state})" if view.state != view.stored_state else "")),
              ("stage", f"{view.stage or '-'} of {', '.join(rec.get('stages') or []) or '-'}"),
              ("step", f"{view.step} (stage step {rec.get('stage_step', 0)}" + (f"/{total})" if total else ")")),
              ("epoch", str(view.epoch)), ("progress", f"{view.progress * 100:.1f}%"),
              ("eta", F.duration(view.eta_seconds) if view.state == "running" else "-"),
              ("heartbeat", f"{F.duration(view.heartbeat_age)} ago"),
              ("created", F.when(view.created)), ("updated", F.when(view.updated))]
    if view.outcome:
        status.append(("outcome", view.outcome))
    if rec.get("pause_reason") and view.stored_state == "paused":
        status.append(("paused", str(rec["pause_reason"]) + (" (interrupted)" if rec.get("interrupted") else "")))
    if (rec.get("control") or {}).get("pause"):
        status.append(("requested", f"pause ({rec['control'].get('reason') or 'requested'})"))
    if view.parent_id:
        status.append(("parent", view.parent_id))
    if rec.get("blocked_by"):
        status.append(("blocked by", str(rec["blocked_by"])))
    out.pairs(status)
    if stages:
        out.heading("Stages")
        out.table(["TIME", "STEP", "FROM", "TO"],
                  [[F.when(e.get("time")), str(e.get("step", "-")), str(e.get("previous") or "-"), str(e.get("stage"))]
                   for e in stages], right={"STEP"})
    out.heading("Attempts")
    out.table(["ATTEMPT", "STATE", "OUTCOME", "STARTED", "FINISHED", "STEP", "HOST", "PID", "REASON"],
              [[str(a.get("attempt")), str(a.get("state")), str(a.get("outcome") or "-"), F.when(a.get("started")),
                F.when(a.get("finished")), str(a.get("step")), str(a.get("host") or "-"), str(a.get("pid") or "-"),
                str(a.get("reason") or a.get("error") or "-")] for a in tries], right={"STEP", "PID"})
    if process:
        out.heading("Process events")
        out.table(["TIME", "ATTEMPT", "STEP", "EVENT", "DETAIL"],
                  [[F.when(e.get("time")), str(e.get("attempt", "-")), str(e.get("step", "-")), e["kind"],
                    str(e.get("reason") or e.get("message") or e.get("checkpoint") or e.get("fields") or "")]
                   for e in process], right={"STEP"})
    if view.error:
        out.heading("Error")
        out.line(f"  {view.error.get('type')}: {view.error.get('message')}")
        if view.error.get("traceback"):
            out.text_block(str(view.error["traceback"]))
    out.heading("Metrics")
    if metrics:
        out.table(["METRIC", "LAST", "BEST", "@STEP", "N", "HISTORY"],
                  [[n, F.number(s["last"]), F.number(s["best"]), str(s["best_step"] if s["best_step"] is not None
                                                                      else "-"),
                    str(s["count"]), F.sparkline(series[n], 30)] for n, s in metrics.items()],
                  right={"LAST", "BEST", "@STEP", "N"})
    else:
        out.line("  none recorded")
    out.heading("Checkpoints")
    if ckpts:
        out.table(["ID", "STEP", "REASON", "SIZE", "CREATED", "PINNED"],
                  [[k["_id"], str(k.get("step")), str(k.get("reason") or "-"), _size(k.get("nbytes")),
                    F.when(k.get("created")), "yes" if k.get("pinned") else ""] for k in ckpts],
                  right={"STEP", "SIZE"})
    else:
        out.line("  none")
    if children:
        out.heading(f"Children ({len(children)})")
        counts: dict[str, int] = {}
        for ch in children:
            counts[ch.state] = counts.get(ch.state, 0) + 1
        out.line("  " + " | ".join(f"{n} {s}" for s, n in counts.items()))
        out.table(["ID", "NAME", "STATE", "STEP"], [[ch.id, ch.name, ch.state, str(ch.step)] for ch in children])
    out.heading("Config")
    config = rec.get("config")
    if config:
        out.pairs(F.flatten(config))
    else:
        out.line("  (built in code, not from a Config)")
    out.heading("Metadata")
    meta = rec.get("metadata") or {}
    if meta:
        out.pairs(F.flatten(meta))
    else:
        out.line("  none")
    _show_runs(out, rec)


def _show_runs(out: Any, rec: Mapping[str, Any]) -> None:
    """What produced the attempt (``record["run"]``) and where each part of it ran (``record["runs"]``)."""
    run = rec.get("run")
    out.heading("Run")
    if not isinstance(run, Mapping):
        out.line("  not started")
        return
    versions = run.get("versions") or {}
    git = run.get("git")
    devices = run.get("devices") or []
    pairs = [
        ("host", f"{run.get('host')} (pid {run.get('pid')})"),
        ("command", " ".join(str(a) for a in run.get("argv") or [])),
        ("python / torch / ptutils", " / ".join(str(versions.get(k, "-")) for k in ("python", "torch", "ptutils"))),
        ("devices", ", ".join(str(d.get("name")) for d in devices) or "cpu"),
        ("seed", str(run.get("seed"))),
    ]
    if isinstance(git, Mapping):
        dirty = f"dirty, diff sha256 {str(git.get('diff_sha256'))[:12]}" if git.get("dirty") else "clean"
        pairs.append(("git", f"{str(git.get('commit'))[:12]} on {git.get('branch')} ({dirty})"))
    else:
        pairs.append(("git", "not a repository"))
    out.pairs(pairs)
    runs = rec.get("runs") or []
    if len(runs) > 1:
        out.table(["ATTEMPT", "TRIGGER", "TIME", "HOST", "PID"],
                  [[str(r.get("attempt")), str(r.get("trigger")), F.when(r.get("time")), str(r.get("host")),
                    str(r.get("pid"))] for r in runs], right={"ATTEMPT", "PID"})


def _size(nbytes: Any) -> str:
    if not isinstance(nbytes, int):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return "-"


# ---------------------------------------------------------------------------------------------------------- metrics
@app.command("metrics")
def metrics_cmd(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., metavar="ID"),
    name: Optional[list[str]] = typer.Option(None, "--name", help="Only this metric (repeatable)."),
    export: Optional[str] = typer.Option(None, "--export", help="Write every point as csv or json to stdout."),
    json_: bool = JSON_OPT,
) -> None:
    """A session's metric history (current attempt): step, value, stage and epoch of every point."""
    c = _ctx(ctx, json_)
    if export is not None and export not in ("csv", "json"):
        raise CliError(f"--export must be csv or json, got {export!r}")
    view = session_record(c.db, session_id)
    stored = R.events(c.db, view.id, "metrics")
    names = R.metric_names(stored, view.attempt)
    if name:
        unknown = [n for n in name if n not in names]
        if unknown:
            raise CliError(f"session {view.id!r} has no metric {unknown[0]!r}; it has {', '.join(names) or 'none'}")
        names = list(name)
    points = [(n, p) for n in names for p in R.history(c.db, view, n, stored)]
    if export == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["metric", "step", "value", "stage", "epoch"])
        for n, p in points:
            writer.writerow([n, p.step, repr(float(p.value)), p.stage or "", "" if p.epoch is None else p.epoch])
        sys.stdout.write(buf.getvalue())
        return
    if export == "json" or c.json:
        _emit_json({"session": view.id, "attempt": view.attempt,
                    "metrics": {n: [p._asdict() for p in R.history(c.db, view, n, stored)] for n in names}})
        return
    out = c.output()
    if not points:
        out.line(f"session {view.id} has no metrics recorded")
        return
    out.table(["METRIC", "STEP", "VALUE", "STAGE", "EPOCH"],
              [[n, str(p.step), F.number(p.value), p.stage or "-", "-" if p.epoch is None else str(p.epoch)]
               for n, p in points], right={"STEP", "VALUE", "EPOCH"})


# ---------------------------------------------------------------------------------------------------------- control
def _finished(session: Any) -> None:
    """Print a session's final state; exit 4 when it failed."""
    print(f"{session.id} {session.state} step={session.step}" +
          (f" outcome={session.outcome}" if session.outcome else ""))
    if session.state == "failed":
        raise typer.Exit(EXIT_FAILED)


def _rebuild(db: DBInterface, session_id: str, view: SessionView) -> Any:
    """The stored session rebuilt from its record: a tuning parent as a Tuning, any other from its config."""
    tuning = view.record.get("tuning")
    if isinstance(tuning, dict) and "base" in tuning:
        from ..nest import Tuning

        return Tuning.resume(db, session_id)
    from ..session import Session

    return Session.resume(db, session_id)


@app.command("pause")
def pause(ctx: typer.Context, session_id: str = typer.Argument(..., metavar="ID"),
          reason: str = typer.Option("requested from the command line", "--reason"),
          wait: float = typer.Option(0.0, "--wait", help="Wait up to this many seconds until it says paused."),
          json_: bool = JSON_OPT) -> None:
    """Ask a running session (in any process, on any host) to checkpoint and pause at its next heartbeat."""
    c = _ctx(ctx, json_)
    view = session_record(c.db, session_id)
    if view.state != "running":
        raise CliError(f"session {view.id!r} is {view.state}, not running: there is nothing to pause")
    request_pause(c.db, view.id, reason)
    state = "pause requested"
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline:
        current = session_record(c.db, view.id)
        if current.state != "running":
            state = current.state
            break
        time.sleep(0.2)
    if c.json:
        _emit_json({"id": view.id, "result": state, "reason": reason})
    else:
        print(f"{view.id} {state}" + ("" if state != "pause requested" else
                                      f" (seen at its next heartbeat, every {view.record.get('status_interval', 2)}s)"))


@app.command("resume")
def resume(ctx: typer.Context, session_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Continue a paused (or interrupted) session from its stored config and newest checkpoint, in this process."""
    c = _ctx(ctx)
    view = session_record(c.db, session_id)
    if view.state in ("complete", "failed"):
        raise CliError(f"session {view.id!r} is {view.state}: `ptutils restart {view.id} --run` runs it again")
    if view.state == "running":
        raise CliError(f"session {view.id!r} is running in process {view.pid} on {view.host}: pause it first")
    session = _rebuild(c.db, view.id, view)
    try:
        session.run()
    finally:
        _close(session)
    _finished(session)


def _close(session: Any) -> None:
    closer = getattr(session, "close", None) or getattr(getattr(session, "session", None), "close", None)
    if closer is not None:
        closer()


@app.command("stop")
def stop(ctx: typer.Context, session_id: str = typer.Argument(..., metavar="ID"),
         wait: float = typer.Option(60.0, "--wait", help="Seconds to wait for a running session to pause first.")) -> None:
    """End a session early (complete, outcome 'stopped'); a running one is paused first, then stopped."""
    c = _ctx(ctx)
    view = session_record(c.db, session_id)
    if view.state in ("complete", "failed"):
        raise CliError(f"session {view.id!r} is already {view.state}")
    if view.state == "running":
        request_pause(c.db, view.id, "stop requested from the command line")
        deadline = time.monotonic() + wait
        while view.state == "running":
            if time.monotonic() > deadline:
                raise CliError(f"session {view.id!r} did not pause within {wait:g}s; its stop was not recorded "
                               f"(a pause is still requested)")
            time.sleep(0.2)
            view = session_record(c.db, view.id)
    session = _rebuild(c.db, view.id, view)
    target = getattr(session, "session", session)
    try:
        target.stop()
    finally:
        _close(session)
    print(f"{view.id} {target.state} outcome={target.outcome}")


@app.command("restart")
def restart(ctx: typer.Context, session_id: str = typer.Argument(..., metavar="ID"),
            run: bool = typer.Option(False, "--run", help="Run the new attempt now, in this process.")) -> None:
    """Start a finished (complete or failed) session again as a new attempt; its history is kept."""
    c = _ctx(ctx)
    view = session_record(c.db, session_id)
    if view.state not in ("complete", "failed"):
        raise CliError(f"session {view.id!r} is {view.state}: only a complete or failed session restarts")
    session = _rebuild(c.db, view.id, view)
    try:
        session.restart()
        if run:
            session.run()
    finally:
        _close(session)
    if run:
        _finished(session)
    else:
        print(f"{view.id} {session.state} attempt={session.attempt}")


@app.command("delete")
def delete(ctx: typer.Context, session_id: str = typer.Argument(..., metavar="ID"),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Remove a session's record, archived attempts, events, and checkpoints with their blobs."""
    from ..checkpoint import CheckpointStore

    c = _ctx(ctx)
    db = c.db
    view = session_record(db, session_id)
    if view.stored_state == "running" and not is_stale(view.record):
        raise CliError(f"session {view.id!r} is running in process {view.pid} on {view.host}: "
                       f"pause or stop it before deleting it")
    ckpts = R.checkpoints(db, view)
    if not yes:
        if not sys.stdin.isatty():
            raise CliError(f"delete session {view.id!r}: confirm with --yes (no terminal to ask in)")
        typer.confirm(f"Delete session {view.id} ({view.name}, {view.state}) with its {len(ckpts)} checkpoints?",
                      abort=True)
    where = R.checkpoint_db_url(view)
    with opened(where if where else db) as store_db:
        store = CheckpointStore(store_db, view.id)
        for record in ckpts:
            store.delete(record)
    events = db.collection(EVENTS)
    removed_events = events.delete({"session_id": view.id})
    records = db.collection(SESSIONS)
    archived = records.delete({"attempt_of": view.id})
    records.delete(view.id)
    print(f"deleted {view.id}: {len(ckpts)} checkpoints, {removed_events} event documents, {archived} archived attempts")


# ---------------------------------------------------------------------------------------------------------- run/graph
def _parse_set(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set {item!r}: expected key=value (e.g. model.optimizer.lr=0.01)")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        overrides[key.strip()] = value
    return overrides


@app.command("run")
def run_cmd(ctx: typer.Context, config: Path = typer.Argument(..., metavar="CONFIG.toml"),
            set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a field: key=value (a TOML value, "
                                                     "else a string); repeatable."),
            session_id: Optional[str] = typer.Option(None, "--id", help="The session's id (default: a new one).")) -> None:
    """Build a session from a TOML config and run it here; prints its final state and id."""
    from ..config import Config
    from ..session import Session

    c = _ctx(ctx)
    cfg = Config.from_toml(config)
    overrides = _parse_set(set_ or [])
    if overrides:
        cfg = cfg.with_overrides(overrides)
    explicit_db = ctx.find_root().params.get("db") is not None or "PTUTILS_DB" in os.environ
    kwargs: dict[str, Any] = {"db": c.db} if explicit_db or cfg.db is None else {}
    session = Session.from_config(cfg, session_id=session_id, **kwargs)
    try:
        session.run()
    finally:
        session.close()
    _finished(session)


@app.command("graph")
def graph(ctx: typer.Context, target: str = typer.Argument(..., metavar="CONFIG_OR_ID")) -> None:
    """The state graph as Mermaid text, from a TOML config file or a stored session's config."""
    from ..config import Config
    from ..graph import mermaid
    from ..stages import Stage

    c = _ctx(ctx)
    if target.endswith(".toml") or Path(target).is_file():
        cfg = Config.from_toml(target)
        state = "pending"
    else:
        view = session_record(c.db, target)
        stored = view.record.get("config")
        if not stored:
            stages = [Stage.coerce(s) for s in (view.record.get("stages") or ["train"])]
            print(mermaid(stages, [], _machine_state(view)))
            return
        cfg = Config.from_dict(stored)
        state = _machine_state(view)
    stages = [Stage.coerce(s) for s in cfg.stages] or [Stage.coerce("train")]
    print(mermaid(stages, cfg.transitions, state))


def _machine_state(view: SessionView) -> str:
    from ..stages import SEP

    state = view.stored_state
    return f"running{SEP}{view.stage}" if state == "running" and view.stage else state


# ---------------------------------------------------------------------------------------------------------- main
def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _code_of(exc: BaseException) -> int:
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, E.SessionNotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, (E.ConfigError, E.TransitionError, E.SessionError)):
        return EXIT_USAGE
    if isinstance(exc, (E.StorageError, E.CheckpointError)):
        return EXIT_STORAGE
    return EXIT_USAGE


def _fail(message: str, code: int, debug: bool) -> NoReturn:
    if debug:
        traceback.print_exc()
    print(f"ptutils: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); exits with one of :data:`EXIT_CODES`."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or os.environ.get("PTUTILS_DEBUG") == "1"
    command = typer.main.get_command(app)
    try:
        code = command.main(args, prog_name="ptutils", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", EXIT_USAGE, False)
    except click.exceptions.ClickException as exc:  # usage errors: bad option, missing argument
        hint = ""
        if isinstance(exc, click.exceptions.UsageError) and exc.ctx is not None:
            hint = f" (see: {exc.ctx.command_path} --help)"
        _fail(_one_line(exc.format_message() if hasattr(exc, "format_message") else exc) + hint, EXIT_USAGE, debug)
    except E.Interrupted as exc:
        _fail(_one_line(exc), EXIT_INTERRUPTED, debug)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED, debug)
    except (CliError, E.PtutilsError, ValueError) as exc:
        _fail(_one_line(exc), _code_of(exc), debug)
    except ImportError as exc:  # a backend's driver (or an imported spec's module) is not installed
        _fail(f"missing module: {_one_line(exc)}", EXIT_STORAGE, debug)
    except OSError as exc:
        _fail(_one_line(exc), EXIT_STORAGE, debug)
    except Exception as exc:  # noqa: BLE001 - the command's promise: one line, unless --debug
        _fail(f"{type(exc).__name__}: {_one_line(exc)} (--debug shows the traceback)", EXIT_USAGE, debug)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
