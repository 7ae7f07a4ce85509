"""Tuning sessions: a parent session that runs a population of child sessions and decides their course.

A :class:`Tuning` is a model-less parent :class:`~ptutils.session.Session`
whose children are ordinary sessions built from one base :class:`Config` plus
hyperparameter values (dotted paths, :mod:`ptutils.spaces`).  It runs them in
rounds, each to the next decision step, through an executor
(:mod:`ptutils.executors`: in-process, a local pool or Ray), then lets the
searcher (:mod:`ptutils.searchers`: random, grid, population-based) decide.

What makes it resumable as a whole tree, anywhere it is killed:

* every decision row (round, step, score, rank, quantile, action, donor, old
  and new values) is written to the ``population`` collection *before* it
  takes effect, from one seeded generator whose state the parent's record
  keeps, so a restarted parent computes the same rows again and redoes only
  the effects not yet done (each is idempotent);
* an exploit copies nothing: the recipient's newest checkpoint becomes a
  reference to the donor's blob (:meth:`CheckpointStore.clone`), held until the
  recipient has a checkpoint of its own, with the new hyperparameters applied
  after every load of it;
* children are claimed with an owner token (:mod:`ptutils.child`); a child a
  process left running is asked to pause and waited for, never run twice at
  once; finished children are not run again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import numpy as np

from .checkpoint import CheckpointStore, release_holds
from .child import ChildTask, claim_refused
from .config import Config, object_paths
from .database import DBInterface, open_db
from .errors import ConfigError, Interrupted, SessionError
from .executors import Executor, make_executor
from .population import POPULATION, best, generation, lineage, table
from .searchers import PBT, Decision, GridSearch, Member, RandomSearch, searcher_from_dict
from .session import Session, default_db_url
from .signals import PauseOnSignals
from .spaces import SearchSpace
from .status import SESSIONS, is_stale, pause_request, request_pause

log = logging.getLogger("ptutils")

FINISHED = ("complete", "failed")
POLL_S = 0.2
"""How often the parent looks again at a child another process is running."""
HEARTBEAT_S = 2.0


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The generator's state as plain JSON (its 128-bit words as decimal strings)."""
    state = rng.bit_generator.state
    return {"bit_generator": state["bit_generator"], "state": str(state["state"]["state"]),
            "inc": str(state["state"]["inc"]), "has_uint32": int(state["has_uint32"]),
            "uinteger": int(state["uinteger"])}


def _rng_from(stored: Mapping[str, Any]) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {
        "bit_generator": stored["bit_generator"],
        "state": {"state": int(stored["state"]), "inc": int(stored["inc"])},
        "has_uint32": stored["has_uint32"], "uinteger": stored["uinteger"],
    }
    return rng


class Tuning:
    """Tune a population of child sessions of ``config`` with ``searcher``; ``run()`` it, resume it by id.

    ``space`` maps dotted config paths to spaces (PBT's ``hyperparam_mutations``
    by default); ``initial`` gives the children's starting values instead of
    sampling them (to pair two searches).  ``executor`` is ``"inprocess"``,
    ``"pool"``, ``"ray"`` or their settings (``{"kind": "pool", "workers": 2}``).
    ``metric``/``mode`` rank the children where the searcher has none (random
    and grid search); ``interval`` is the steps between decisions of an early
    stopping rule.  ``on_round(tuning)`` is called after each round's decisions.
    """

    def __init__(
        self,
        config: Config | Mapping[str, Any],
        searcher: PBT | RandomSearch | GridSearch,
        *,
        space: SearchSpace | Mapping[str, Any] | None = None,
        initial: Sequence[Mapping[str, Any]] | None = None,
        executor: str | Mapping[str, Any] | Executor = "inprocess",
        db: DBInterface | str | None = None,
        name: str = "tuning",
        session_id: str | None = None,
        metric: str | None = None,
        mode: str | None = None,
        interval: int | None = None,
        on_round: Callable[[Tuning], None] | None = None,
    ):
        self.config = config if isinstance(config, Config) else Config.from_dict(config)
        built_in_code = object_paths(self.config.to_dict())
        if built_in_code:
            raise ConfigError(built_in_code[0], "is a Python object: a tuning session rebuilds every child from "
                                                "its stored config, so give a spec ({'cls': 'module.Class', ...})")
        self.searcher = searcher
        stopper = getattr(searcher, "stopper", None)
        self.metric = metric or getattr(searcher, "metric", None) or getattr(stopper, "metric", None)
        self.mode = mode or getattr(searcher, "mode", None) or getattr(stopper, "mode", None) or "max"
        if self.metric is None:
            raise ConfigError("tuning.metric", "name the metric that ranks the children (e.g. metric='val_loss')")
        if self.mode not in ("min", "max"):
            raise ConfigError("tuning.mode", f"expected 'min' or 'max', got {self.mode!r}")
        if space is None:
            space = getattr(searcher, "hyperparam_mutations", None)
        if space is None:
            raise ConfigError("tuning.space", "give the search space: {'model.optimizer.lr': LogUniform(1e-4, 1e-1)}")
        self.space = space if isinstance(space, SearchSpace) else SearchSpace(space)
        self.space.check(self.config)
        if stopper is not None and not hasattr(stopper, "next_boundary") and interval is None:
            raise ConfigError("tuning.interval", "early stopping needs the steps between its decisions (interval=)")
        if interval is not None and (not isinstance(interval, int) or interval < 1):
            raise ConfigError("tuning.interval", f"expected a positive number of steps, got {interval!r}")
        self.interval = interval
        self.initial = [dict(v) for v in initial] if initial is not None else None
        for values in self.initial or ():
            self.space.check_values(values)
        self._executor_settings = executor
        self.on_round = on_round
        self.session = Session(None, stages=("tune",), db=db or default_db_url(), name=name, session_id=session_id,
                               metadata={"kind": "tuning"})
        self.id = self.session.id
        self.db = self.session.db
        self.sessions = self.db.collection(SESSIONS)
        self.rows_db = self.db.collection(POPULATION)
        self._executor: Executor | None = None
        self._interrupt: str | None = None
        """The signal (or reason) that asked the tuning to pause, set by :meth:`request_pause`."""
        self._checkpoints: DBInterface | None = None
        self._state: dict[str, Any] = dict(self.session.record.get("tuning") or {})
        if not self._state:
            self._state = self._initial_state()
            self._write_state()
        else:
            self._check_same(self._state)

    # ------------------------------------------------------------------ stored state
    def _settings(self) -> dict[str, Any]:
        executor = self._executor_settings
        if isinstance(executor, Executor):
            executor = executor.settings()
        elif isinstance(executor, str):
            executor = {"kind": executor}
        return {
            "searcher": self.searcher.to_dict(), "space": self.space.to_dict(),
            "base": self.config.to_dict(), "executor": dict(executor), "metric": self.metric, "mode": self.mode,
            "interval": self.interval,
        }

    def _initial_state(self) -> dict[str, Any]:
        seed = int(getattr(self.searcher, "seed", 0))
        rng = np.random.default_rng(seed)
        values = self.initial if self.initial is not None else self.searcher.initial(self.space, rng)
        children = [f"{self.id}-{i:03d}" for i in range(len(values))]
        return {**self._settings(), "version": 1, "initial": values, "children": children, "round": 0,
                "decided": -1, "rng": _rng_state(rng), "token": None, "summary": {}}

    def _check_same(self, stored: Mapping[str, Any]) -> None:
        mine = self._settings()
        differ = [key for key in ("searcher", "space", "base", "metric", "mode", "interval")
                  if stored.get(key) != mine[key]]
        if differ:
            raise SessionError(f"tuning session {self.id!r} was started with another {', '.join(differ)}: "
                               f"resume it with Tuning.resume(db, {self.id!r}) or give another session_id")

    def _write_state(self, **fields: Any) -> None:
        self._state.update(fields)
        self.sessions.update(self.id, {"$set": {"tuning": self._state}})

    @classmethod
    def resume(cls, db: DBInterface | str, session_id: str, *, executor: str | Mapping[str, Any] | None = None,
               on_round: Callable[[Tuning], None] | None = None) -> Tuning:
        """The stored tuning session ``session_id``, rebuilt from its record (``run()`` goes on where it stopped).

        ``executor`` runs it elsewhere than it ran (the results are the same).
        """
        from .records import session_record

        stored = session_record(db, session_id).record.get("tuning")
        if not stored:
            raise SessionError(f"session {session_id!r} is not a tuning session (its record has no 'tuning')")
        return cls(stored["base"], searcher_from_dict(stored["searcher"]), space=SearchSpace.from_dict(stored["space"]),
                   initial=stored["initial"], executor=executor or stored["executor"], db=db,
                   name=session_record(db, session_id).record.get("name", "tuning"), session_id=session_id,
                   metric=stored["metric"], mode=stored["mode"], interval=stored["interval"], on_round=on_round)

    # ------------------------------------------------------------------ children
    @property
    def children(self) -> list[str]:
        """The children's ids, in the order they were made."""
        return list(self._state["children"])

    def _child_config(self, index: int, values: Mapping[str, Any]) -> Config:
        base = self.config
        return base.with_overrides({**values, "seed": base.seed + index, "name": f"{self.session.name}-{index}",
                                    "db": self.db.url})

    def _make_children(self) -> None:
        """Create the records of children not made yet (ids are fixed, so a restart makes each once)."""
        for index, (child, values) in enumerate(zip(self._state["children"], self._state["initial"])):
            if self.sessions.exists(child):
                continue
            session = Session.from_config(self._child_config(index, values), session_id=child, db=self.db,
                                          parent=self.session, metadata={"tuning": self.id})
            session.close()
            self.sessions.update(child, {"$set": {"tuning": {"parent": self.id, "index": index,
                                                             "values": dict(values), "generation": 0}}})

    def _records(self) -> dict[str, dict]:
        found = {r["_id"]: r for r in self.sessions.load_from_ids(self.children)}
        return {c: found[c] for c in self.children}

    def _members(self, records: Mapping[str, Mapping[str, Any]]) -> list[Member]:
        return [Member(id=c, t=int(r.get("step") or 0), score=_score(r, self.metric),
                       values=dict(r["tuning"]["values"]), done=_done(r)) for c, r in records.items()]

    # ------------------------------------------------------------------ the run
    def run(self) -> Tuning:
        """Run (or go on with) the tuning until every child has finished; returns self.

        Ctrl-C (or SIGTERM) pauses the children at their next step and the parent,
        then raises :class:`~ptutils.errors.Interrupted`: ``Tuning.resume(db, id).run()``
        goes on to the same result.
        """
        session = self.session
        if session.state == "complete":
            return self
        self._executor = make_executor(self._executor_settings)
        self._interrupt = None
        signals = PauseOnSignals(self)
        try:
            with signals:
                if session.state == "pending":
                    session.start()
                elif session.state == "paused":
                    session.resume()
                self._take_over_children()
                self._make_children()
                if isinstance(self.searcher, PBT) and not self.searcher.synch:
                    self._run_async()
                else:
                    self._run_synch()
                if self._interrupt is not None and session.state == "running":
                    session.pause(reason=self._interrupt)
                elif session.state == "running":
                    self._write_summary()
                    self._prune_children()
                    session.complete()
        except Exception as exc:
            if session.state in ("running", "paused"):
                session.fail(exc)
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the children pause themselves; the parent records it too
            if session.state == "running":
                session.pause(reason="interrupted")
            raise
        finally:
            self._executor.close()
            self._executor = None
        signals.raise_if_paused()
        return self

    def _take_over_children(self) -> None:
        """A new run token; children a previous run left running are asked to pause (and waited for later)."""
        self._write_state(token=uuid.uuid4().hex)
        for record in self.sessions.load_from_ids([c for c in self.children if self.sessions.exists(c)]):
            child = record["_id"]
            if record.get("state") == "running" and not is_stale(record):
                log.info("tuning %s: asking child %s, left running by a previous run, to pause", self.id, child)
                request_pause(self.db, child, "the tuning session restarted")

    def _boundary(self, t: int) -> int | None:
        """The step of the next decision after step ``t`` (None: the children run to the end)."""
        if isinstance(self.searcher, PBT):
            return self.searcher.next_boundary(t)
        stopper = self.searcher.stopper
        if hasattr(stopper, "next_boundary"):
            return stopper.next_boundary(t)
        if self.interval is not None:
            return (t // self.interval + 1) * self.interval
        return None

    def _run_synch(self) -> None:
        while True:
            if self._state["decided"] >= self._state["round"]:  # decided before a restart: finish its effects
                self._apply(self._decide_round({}))
                self._advance()
                continue
            records = self._records()
            live = [c for c, r in records.items() if not _done(r)]
            if not live:
                return
            if self._paused_by_request():
                return
            if self._state.get("until_round") == self._state["round"]:
                until = self._state["until"]  # a restart in the middle of the round: the same boundary
            else:
                until = self._boundary(min(int(records[c].get("step") or 0) for c in live))
                self._write_state(until=until, until_round=self._state["round"])
            self._run_round(live, until)
            if self._interrupt is not None:
                return  # the round is not over: a resume runs it to the same step
            records = self._records()
            rows = self._decide_round(records)
            self._apply(rows)
            self._advance()

    def _decide_round(self, records: Mapping[str, Mapping[str, Any]]) -> list[dict]:
        """This round's rows: stored ones when the round was decided before, else decided and stored now."""
        rnd = self._state["round"]
        if self._state["decided"] >= rnd:
            return self.rows_db.load({"parent": self.id, "round": rnd}, sort=[("order", 1)])
        rng = _rng_from(self._state["rng"])
        members = self._members(records)
        earlier = self.rows()
        if isinstance(self.searcher, PBT):
            decisions = self.searcher.decide(members, rng)
        else:
            history = _history(earlier)
            for m in members:  # this round's scores count, as a pruner compares children at the same step
                if m.score is not None:
                    history.setdefault(m.id, {})[m.t] = m.score
            decisions = self.searcher.decide(members, history)
        ended = {r["child"] for r in earlier if r["action"] == "done"}  # a finished child's row is written once
        decisions = [d for d in decisions if d.child not in ended]
        rows = [self._row(rnd, i, d, records) for i, d in enumerate(decisions)]
        self.rows_db.save_many(rows)  # written before any of it takes effect
        self._write_state(decided=rnd, rng=_rng_state(rng))
        return rows

    def _row(self, rnd: int, order: int, decision: Decision, records: Mapping[str, Mapping[str, Any]]) -> dict:
        row = decision.to_dict()
        donor_ckpt = None
        if decision.donor is not None:
            donor_ckpt = (records[decision.donor].get("last_checkpoint") or {}).get("id")
        return {**row, "_id": f"{self.id}.r{rnd:04d}.{decision.child}", "parent": self.id, "round": rnd,
                "order": order, "donor_checkpoint": donor_ckpt, "applied": False, "time": time.time()}

    def _apply(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Put each decision into effect (each effect idempotent, marked applied when done)."""
        for row in rows:
            if row.get("applied"):
                continue
            if row["action"] == "exploit":
                self._exploit(row)
            elif row["action"] == "stop":
                self._stop(row["child"])
            self.rows_db.update(row["_id"], {"$set": {"applied": True}})
        for child in self.children:
            release_holds(self._checkpoint_db(), child)

    def _prune_children(self) -> None:
        """Once every child has finished: drop checkpoints a hold kept beyond a donor's last prune."""
        for child in self.children:
            release_holds(self._checkpoint_db(), child)
        kept = self.config.checkpoint
        for child in self.children:
            CheckpointStore(self._checkpoint_db(), child, keep=kept.keep, keep_best=kept.keep_best,
                            best_mode=kept.best_mode).prune()

    def _checkpoint_db(self) -> DBInterface:
        """Where the children keep their checkpoints: beside their records, or the config's ``checkpoint.db``."""
        url = self.config.checkpoint.db
        if url is None:
            return self.db
        if self._checkpoints is None:
            self._checkpoints = open_db(url)
        return self._checkpoints

    def _exploit(self, row: Mapping[str, Any]) -> None:
        """The recipient continues from the donor's checkpoint, by reference, with the new values applied."""
        child, donor_ckpt = row["child"], row["donor_checkpoint"]
        if donor_ckpt is None:
            raise SessionError(f"tuning {self.id!r}: donor {row['donor']!r} of {child!r} has no checkpoint")
        record = self.sessions.load_from_id(child)
        checkpoints = self._checkpoint_db().collection("checkpoints")
        store = CheckpointStore(self._checkpoint_db(), child)
        donor = checkpoints.load_from_id(donor_ckpt)
        store.clone(donor, decision=row["_id"], attempt=int(record.get("attempt", 1)), apply=row["new_values"])
        info = record["tuning"]
        if info.get("exploited") == row["_id"]:
            return
        config = Config.from_dict(record["config"]).with_overrides(row["new_values"]).to_dict()
        changes = {"attempt": record.get("attempt", 1), "stage": record.get("stage"), "step": row["t"],
                   "time": time.time(), "reason": f"exploit {row['donor']} (tuning {self.id})",
                   "fields": [{"field": p, "from": row["old_values"].get(p), "to": v}
                              for p, v in row["new_values"].items()]}
        self.sessions.update(child, {
            "$set": {"config": config, "tuning.values": dict(row["new_values"]), "tuning.exploited": row["_id"],
                     "tuning.generation": int(info.get("generation", 0)) + 1,
                     "metrics": dict(donor.get("metrics") or {})},  # it holds the donor's weights now
            "$push": {"config_changes": changes},
        }, expected_version=record["_version"])

    def _stop(self, child: str) -> None:
        record = self.sessions.load_from_id(child)
        if _done(record):
            return
        session = Session.resume(self.db, child)
        try:
            session.stop()
        finally:
            session.close()

    def _advance(self) -> None:
        self._write_summary()
        self._write_state(round=self._state["round"] + 1)
        if self.on_round is not None:
            self.on_round(self)

    def _paused_by_request(self) -> bool:
        """Honour a pause asked for through the parent's record: between rounds, every child at a boundary."""
        record = self.session.heartbeat()
        reason = pause_request(record)
        if reason is None:
            return False
        self.session.pause(reason=reason)
        return True

    # ------------------------------------------------------------------ rounds
    def _task(self, child: str, until: int | None) -> ChildTask:
        return ChildTask(db_url=self.db.url, child_id=child, parent_id=self.id, token=self._state["token"],
                         until=until)

    def _run_round(self, children: Sequence[str], until: int | None) -> None:
        """Run every child to ``until``; a child another process holds is waited for, then run.

        After a signal (:meth:`request_pause`) no round starts any more, the running
        ones are asked to pause, and this returns once they have.
        """
        assert self._executor is not None
        todo, pending = list(children), {}
        asked = False
        beat = time.monotonic()
        while todo or pending:
            while todo and self._interrupt is None:
                child = todo.pop(0)
                pending[self._executor.submit(self._task(child, until))] = child
            if self._interrupt is not None and not asked:
                todo.clear()
                asked = True
                self._pause_rounds(pending)
            if not pending:
                break
            done, _ = wait(list(pending), timeout=POLL_S, return_when=FIRST_COMPLETED)
            if time.monotonic() - beat > HEARTBEAT_S:
                self.session.heartbeat()
                beat = time.monotonic()
            for future in done:
                child = pending.pop(future)
                try:
                    result = future.result()
                except Interrupted:
                    continue  # a child run in this process paused itself on the signal: its record says so
                if result["outcome"] == "stale":
                    raise SessionError(f"tuning session {self.id!r} is being run by another process "
                                       f"(its record has another run token)")
                if result["outcome"] == "busy" and self._interrupt is None:
                    self._wait_while_held(child)
                    todo.append(child)

    # ------------------------------------------------------------------ signals (what PauseOnSignals uses)
    @property
    def is_running(self) -> bool:
        return self.session.is_running

    @property
    def state(self) -> str:
        return self.session.state

    @property
    def step(self) -> int:
        """The round the tuning is in (its time, as a child's is its step)."""
        return int(self._state["round"])

    def request_pause(self, reason: str = "requested") -> None:
        """Pause after the rounds now running pause (safe from a signal handler: it only sets a flag)."""
        self._interrupt = reason

    def _pause_rounds(self, pending: dict[Future, str]) -> None:
        """After a signal: drop the rounds not started yet, ask the running ones to pause (they write it)."""
        for future, child in list(pending.items()):
            if future.cancel():
                del pending[future]
            else:
                request_pause(self.db, child, f"the tuning session got {self._interrupt}")

    def _wait_while_held(self, child: str) -> None:
        """Wait for the process that holds ``child`` to let go (or die), beating the parent's heartbeat meanwhile."""
        beat = time.monotonic()
        while claim_refused(self.sessions.load_from_id(child)) is not None:
            time.sleep(POLL_S)
            if time.monotonic() - beat > HEARTBEAT_S:
                self.session.heartbeat()
                beat = time.monotonic()

    def _run_async(self) -> None:
        """Ray's default PBT: each child is decided on as soon as it reaches its boundary (order-dependent)."""
        assert self._executor is not None
        pending: dict[Future, str] = {}
        rounds = {c: 0 for c in self.children}
        for row in self.rows():
            rounds[row["child"]] = max(rounds[row["child"]], row["round"] + 1)
        for row in self.rows():
            if not row.get("applied"):
                self._apply([row])
        for child, record in self._records().items():
            if not _done(record) and self._interrupt is None:
                until = self._boundary(int(record.get("step") or 0))
                pending[self._executor.submit(self._task(child, until))] = child
        asked = False
        while pending:
            if self._interrupt is not None and not asked:  # a signal: no new rounds, the running ones pause
                asked = True
                self._pause_rounds(pending)
                continue
            done, _ = wait(list(pending), timeout=HEARTBEAT_S, return_when=FIRST_COMPLETED)
            self.session.heartbeat()
            for future in done:
                child = pending.pop(future)
                try:
                    result = future.result()
                except Interrupted:
                    continue
                if self._interrupt is not None:
                    continue
                if result["outcome"] == "busy":
                    self._wait_while_held(child)
                records = self._records()
                if result["outcome"] == "ran" and not _done(records[child]):
                    rng = _rng_from(self._state["rng"])
                    members = self._members(records)
                    me = next(m for m in members if m.id == child)
                    decision = self.searcher.decide_one(me, members, rng)
                    row = self._row(rounds[child], 0, decision, records)
                    rounds[child] += 1
                    self.rows_db.save(row)
                    self._write_state(rng=_rng_state(rng))
                    self._apply([row])
                    self._write_summary()
                    if self.on_round is not None:
                        self.on_round(self)
                record = self.sessions.load_from_id(child)
                if not _done(record):
                    until = self._boundary(int(record.get("step") or 0))
                    pending[self._executor.submit(self._task(child, until))] = child

    # ------------------------------------------------------------------ what it shows
    def rows(self) -> list[dict]:
        """Every decision row, oldest first: the population table's history."""
        return self.rows_db.load({"parent": self.id}, sort=[("round", 1), ("order", 1)])

    def population(self) -> list[dict[str, Any]]:
        """One row per child now: id, state, step, score, generation and hyperparameter values."""
        return self._population(self._records(), self.rows())

    def _population(self, records: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> list[dict]:
        return [{"child": c, "state": r.get("state"), "step": r.get("step"), "score": _score(r, self.metric),
                 "generation": generation(rows, c), "values": dict(r["tuning"]["values"])}
                for c, r in records.items()]

    def table(self) -> str:
        """The population table as text."""
        return table(self.population(), self.metric)

    def lineage(self, child: str) -> list[dict[str, Any]]:
        """Where ``child``'s weights come from, back to generation 0 (see :func:`ptutils.population.lineage`)."""
        return lineage(self.rows(), child)

    def best(self) -> dict[str, Any] | None:
        """The best score reported so far, by whom and when."""
        return best(self.rows(), self.mode)

    def _write_summary(self) -> None:
        records = self._records()
        rows = self.rows()
        counts: dict[str, int] = {}
        for record in records.values():
            counts[str(record.get("state"))] = counts.get(str(record.get("state")), 0) + 1
        population = self._population(records, rows)
        self._write_state(summary={
            "counts": counts, "best": best(rows, self.mode), "population": population,
            "lineage": {c: lineage(rows, c) for c in records},
        })

    def close(self) -> None:
        """Close the parent session's databases."""
        if self._checkpoints is not None:
            self._checkpoints.close()
            self._checkpoints = None
        self.session.close()

    def __enter__(self) -> Tuning:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _score(record: Mapping[str, Any], metric: str) -> float | None:
    value = (record.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _done(record: Mapping[str, Any]) -> bool:
    return record.get("state") in FINISHED


def _history(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, float]]:
    """Each child's scores by step, from its decision rows (what an early-stopping rule compares)."""
    history: dict[str, dict[int, float]] = {}
    for row in rows:
        if row.get("score") is not None:
            history.setdefault(row["child"], {})[int(row["t"])] = float(row["score"])
    return history
