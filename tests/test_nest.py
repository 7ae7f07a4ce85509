"""Tuning sessions: a population of children run in rounds, decided on, resumed as a whole tree after kill -9."""

from __future__ import annotations

import time

import pytest
import torch

from ptutils import open_db
from ptutils.checkpoint import HOLDS
from ptutils.errors import ConfigError, SessionError
from ptutils.nest import Tuning
from ptutils.searchers import GridSearch, MedianStopping, RandomSearch, SuccessiveHalving
from ptutils.spaces import Grid, LogUniform
from ptutils.status import SESSIONS, request_pause

from .support import tuningkit
from .support.tuningkit import BASE, STEPS, claims_alternate, pbt, result, run_killed, same, tuning

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[tuple], dict]:
    """The uninterrupted in-process run every other run must equal."""
    url = (tmp_path_factory.mktemp("reference") / "db").as_uri()
    with tuning(url) as t:
        t.run()
    return result(url)


def test_pbt_decides_every_round_and_the_recipients_continue_from_their_donors(tmp_path):
    url = (tmp_path / "db").as_uri()
    checkpoints = open_db(url).collection("checkpoints")
    clones = []

    def look_at_the_clones(t: Tuning) -> None:
        """After a round's effects, before the recipients run on: each clone is its donor's blob."""
        latest = max(r["round"] for r in t.rows())
        for row in t.rows():
            if row["round"] == latest and row["action"] == "exploit":
                clone = checkpoints.load_one({"session_id": row["child"], "cloned_from.decision": row["_id"]})
                donor = checkpoints.load_from_id(row["donor_checkpoint"])
                clones.append((row, clone, donor))

    with tuning(url, on_round=look_at_the_clones) as t:
        t.run()
        rows = t.rows()
        assert t.session.state == "complete"
        assert [r["t"] for r in rows if r["child"] == t.children[0]] == [5, 10, 15, 20]  # one row a round
        exploits = [r for r in rows if r["action"] == "exploit"]
        assert exploits and all(r["quantile"] == "lower" and r["donor"] != r["child"] for r in exploits)
        assert all(r["action"] == "done" for r in rows if r["t"] == STEPS)
        assert len(clones) == len(exploits)
        for row, clone, donor in clones:  # no bytes copied: the donor's blob, with the new values to apply
            assert clone["blob"] == donor["blob"] and clone["sha256"] == donor["sha256"]
            assert clone["apply"] == row["new_values"] and clone["step"] == donor["step"] == row["t"]
        db = open_db(url)
        for child in t.children:  # each child trained on with the lr its record holds
            record = db.collection(SESSIONS).load_from_id(child)
            state, _ = tuningkit.final_state(url, child)
            lr = record["tuning"]["values"]["model.optimizer.lr"]
            assert state["model"]["optimizer"]["param_groups"][0]["lr"] == lr
            assert record["state"] == "complete" and record["parent_id"] == t.id
        assert db.collection(HOLDS).count({}) == 0  # every clone has a checkpoint of its own after it
        for child in t.children:  # and nothing a hold kept outlives the tuning: the last one (keep=1) and the pinned
            unpinned = checkpoints.load({"session_id": child, "pinned": False})
            assert len(unpinned) <= BASE["checkpoint"]["keep"]
        summary = t.session.record["tuning"]["summary"]
        assert summary["counts"] == {"complete": 4}
        assert summary["best"] == t.best() and summary["best"]["child"] in t.children
        assert len(summary["population"]) == 4
        recipient = exploits[0]["child"]
        line = t.lineage(recipient)
        assert line[0]["from_t"] == 0 and line[0]["values"] is None  # generation 0 of some child
        assert any(seg["child"] == recipient for seg in line) and line[-1]["to_t"] is None
        table = t.table()
        assert table.splitlines()[0].split()[:4] == ["child", "state", "step", "val_loss"]


def test_the_same_seed_gives_the_same_rows_and_weights_and_another_seed_does_not(tmp_path, reference):
    again = (tmp_path / "again").as_uri()
    with tuning(again) as t:
        t.run()
    assert result(again)[0] == reference[0] and same(result(again)[1], reference[1])
    other = (tmp_path / "other").as_uri()
    with tuning(other, searcher=pbt(seed=8)) as t:
        t.run()
    assert result(other)[0] != reference[0]


def test_a_local_pool_gives_the_in_process_result(tmp_path, reference):
    url = (tmp_path / "db").as_uri()
    with tuning(url, executor={"kind": "pool", "workers": 2}) as t:
        t.run()
    rows, weights = result(url)
    assert rows == reference[0] and same(weights, reference[1])


@pytest.mark.slow
@pytest.mark.parametrize("point, nth", [
    ("rows", 2),        # after a round's decision rows, before the round is marked decided
    ("clone", 1),       # between a decision and its effect: the clone written, the recipient's config not
    ("checkpoint", 7),  # half-way through a child's checkpoint blob
])
def test_a_parent_killed_in_process_resumes_to_the_uninterrupted_result(tmp_path, reference, point, nth):
    url = (tmp_path / "db").as_uri()
    run_killed(url, point, nth)
    with Tuning.resume(url, "pbt") as t:
        t.run()
        assert t.session.state == "complete"
    rows, weights = result(url)
    assert rows == reference[0] and same(weights, reference[1])
    claims_alternate(url, t.children)


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["workers-outlive-the-parent", "whole-group-killed"])
def test_a_parent_killed_mid_round_on_the_pool_resumes_to_the_same_result(tmp_path, reference, group):
    url = (tmp_path / "db").as_uri()
    run_killed(url, "round", 2, "pool", group=group, step_sleep=0.05)
    with Tuning.resume(url, "pbt") as t:
        t.run()
    rows, weights = result(url)
    assert rows == reference[0] and same(weights, reference[1])
    if not group:  # the orphaned workers finished their round (asked to pause) before any new claim
        claims_alternate(url, t.children)
    deadline = time.monotonic() + 10
    while _orphans(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _orphans(url), "pool workers of the killed parent are still alive"


def _orphans(url: str) -> list[int]:
    """Pids of processes still holding a child's claim (workers of a killed parent)."""
    from ptutils.status import pid_alive

    sessions = open_db(url).collection(SESSIONS)
    pids = {e["pid"] for c in sessions.load({"parent_id": "pbt"}) for e in c.get("claims") or []}
    return [p for p in pids if pid_alive(p)]


def test_a_pause_asked_through_the_record_stops_between_rounds_and_resume_goes_on(tmp_path, reference):
    url = (tmp_path / "db").as_uri()
    paused = []

    def ask_after_round_one(t: Tuning) -> None:
        if t.rows() and max(r["round"] for r in t.rows()) == 1 and not paused:
            request_pause(url, t.id, "see the table")
            paused.append(True)

    with tuning(url, on_round=ask_after_round_one) as t:
        t.run()
        assert t.session.state == "paused" and t.session.record["pause_reason"] == "see the table"
    with Tuning.resume(url, "pbt") as t:
        t.run()
    rows, weights = result(url)
    assert rows == reference[0] and same(weights, reference[1])


def test_random_search_with_median_stopping_stops_the_hopeless(tmp_path):
    url = (tmp_path / "db").as_uri()
    searcher = RandomSearch(6, seed=3, stopper=MedianStopping("val_loss", "min", grace_period=5, min_samples_required=3))
    with Tuning(BASE, searcher, space={"model.optimizer.lr": LogUniform(1e-4, 1.0)}, db=url, interval=5) as t:
        t.run()
        records = open_db(url).collection(SESSIONS).load({"parent_id": t.id})
        outcomes = sorted(r["outcome"] for r in records)
        assert "stopped" in outcomes and "success" in outcomes
        stops = [r for r in t.rows() if r["action"] == "stop"]
        assert {r["child"] for r in stops} == {r["_id"] for r in records if r["outcome"] == "stopped"}


def test_successive_halving_keeps_the_top_half_at_each_rung(tmp_path):
    url = (tmp_path / "db").as_uri()
    searcher = RandomSearch(4, seed=1, stopper=SuccessiveHalving("val_loss", "min", min_steps=5, reduction_factor=2))
    with Tuning(BASE, searcher, space={"model.optimizer.lr": LogUniform(1e-4, 1.0)}, db=url) as t:
        t.run()
        rows = t.rows()
        at5 = sorted((r for r in rows if r["round"] == 0), key=lambda r: r["score"])  # the first rung: 5 steps
        assert [(r["t"], r["action"]) for r in at5] == [(5, "continue")] * 2 + [(5, "stop")] * 2
        at10 = sorted((r for r in rows if r["round"] == 1 and r["t"] == 10), key=lambda r: r["score"])
        assert [r["action"] for r in at10] == ["continue", "stop"]
        steps = sorted(p["step"] for p in t.population())
        assert steps == [5, 5, 10, STEPS]  # the last one ran to the end of its budget (the next rung, 20)
        assert sorted(r["child"] for r in rows if r["action"] == "done") == sorted(t.children)  # once each


def test_grid_search_runs_every_point_to_the_end(tmp_path):
    url = (tmp_path / "db").as_uri()
    space = {"model.optimizer.lr": Grid([0.01, 0.1]), "model.optimizer.momentum": Grid([0.0, 0.9])}
    with Tuning(BASE, GridSearch(), space=space, db=url, metric="val_loss", mode="min") as t:
        t.run()
        table = t.population()
        assert sorted((p["values"]["model.optimizer.lr"], p["values"]["model.optimizer.momentum"]) for p in table) == \
            [(0.01, 0.0), (0.01, 0.9), (0.1, 0.0), (0.1, 0.9)]
        assert all(p["state"] == "complete" and p["step"] == STEPS for p in table)
        assert {r["action"] for r in t.rows()} == {"done"}


def test_async_pbt_decides_each_child_as_it_arrives(tmp_path):
    url = (tmp_path / "db").as_uri()
    with tuning(url, searcher=pbt(synch=False)) as t:
        t.run()
        rows = t.rows()
        assert t.session.state == "complete"
        assert {p["state"] for p in t.population()} == {"complete"}
        assert any(r["action"] == "exploit" for r in rows)


def test_bad_input_is_refused_naming_the_field(tmp_path):
    url = (tmp_path / "db").as_uri()
    with pytest.raises(ConfigError, match="model.optimiser.lr"):
        Tuning(BASE, pbt(hyperparam_mutations={"model.optimiser.lr": LogUniform(1e-3, 1.0)}), db=url)
    with pytest.raises(ConfigError, match="model.optimizer.lr"):
        Tuning(BASE, pbt(), initial=[{"model.optimizer.lr": 5.0}] * 4, db=url)
    with pytest.raises(ConfigError, match="executor.kind"):
        Tuning(BASE, pbt(), executor="slurm", db=url).run()
    obj = {**BASE, "model": {**BASE["model"], "module": torch.nn.Linear(8, 2)}}
    with pytest.raises(ConfigError, match="model.module"):
        Tuning(obj, pbt(), db=url)
    with pytest.raises(ConfigError, match="tuning.metric"):
        Tuning(BASE, RandomSearch(2), space={"model.optimizer.lr": LogUniform(1e-3, 1.0)}, db=url)
    with tuning(url, session_id="first") as t:
        pass
    with pytest.raises(SessionError, match="another searcher"):
        tuning(url, session_id="first", searcher=pbt(seed=99))
    with pytest.raises(SessionError, match="not a tuning session"):
        Tuning.resume(url, _plain_session(url))


def _plain_session(url: str) -> str:
    from .support.sessionkit import session

    s = session(url, name="plain")
    s.close()
    return s.id


@pytest.mark.slow
def test_ctrl_c_pauses_the_children_and_the_parent_and_resume_goes_on_to_the_same_result(tmp_path, reference):
    import os
    import signal
    import subprocess
    import sys

    url = (tmp_path / "db").as_uri()
    env = {**os.environ, "PTUTILS_TEST_STEP_SLEEP": "0.05", "PYTHONPATH": str(tuningkit.ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.tuningkit", url, "pbt"], cwd=tuningkit.ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows = open_db(url).collection("population")
    deadline = time.monotonic() + 120
    while rows.count({"parent": "pbt"}) < 4 and time.monotonic() < deadline:  # the first round is decided
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert "interrupted" in out and "state=paused" in out, out[-2000:]
    with Tuning.resume(url, "pbt") as t:
        t.run()
    got = result(url)
    assert got[0] == reference[0] and same(got[1], reference[1])


def test_every_backend_holds_a_tuning_and_gives_the_same_result(db_url, reference):
    """The rows, claims, clones and holds go through the DBInterface: the same tuning on any backend."""
    import uuid

    session_id = f"pbt-{uuid.uuid4().hex[:6]}"
    with tuning(db_url, session_id=session_id) as t:
        t.run()
        assert t.session.state == "complete"
    rows, weights = result(db_url, session_id)
    renamed = [tuple(v.replace(session_id, "pbt") if isinstance(v, str) else v for v in row) for row in rows]
    assert renamed == reference[0]
    assert same({c.replace(session_id, "pbt"): w for c, w in weights.items()}, reference[1])
