"""Searchers: Ray's PBT quantiles and synch test, seeded decisions, random/grid starts and early stopping."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from ptutils.errors import ConfigError, SessionError
from ptutils.searchers import (
    PBT,
    Decision,
    GridSearch,
    MedianStopping,
    Member,
    RandomSearch,
    SuccessiveHalving,
    searcher_from_dict,
)
from ptutils.spaces import Choice, Grid, IntUniform, LogUniform, SearchSpace, Uniform


def keep_values(values: dict) -> dict:
    """An importable custom_explore_fn: Ray's synch test explores nothing."""
    return values


def halve_lr(values: dict) -> dict:
    return {**values, "lr": values["lr"] / 2}


def pbt(**kw) -> PBT:
    args = {"metric": "score", "mode": "max", "perturbation_interval": 1,
            "hyperparam_mutations": {"lr": LogUniform(1e-4, 1.0)}, **kw}
    return PBT(**args)


def members(scores, **kw) -> list[Member]:
    return [Member(f"c{i}", 5, s, {"lr": 0.01 * (i + 1)}, **kw) for i, s in enumerate(scores)]


@pytest.mark.parametrize("n, q, expected", [(4, 0.25, 1), (5, 0.25, 2), (3, 0.5, 1), (1, 0.25, 0), (4, 0.0, 0),
                                            (10, 0.3, 3), (8, 0.5, 4), (2, 0.25, 1)])
def test_quantile_sizes_follow_ray(n, q, expected):
    lower, upper = pbt(quantile_fraction=q).quantiles(members(range(n)))
    assert len(lower) == len(upper) == expected


def test_quantiles_are_worst_and_best_and_follow_mode():
    ms = members([3.0, 1.0, 4.0, 1.5])
    lower, upper = pbt().quantiles(ms)
    assert [m.id for m in lower] == ["c1"] and [m.id for m in upper] == ["c2"]
    lower, upper = pbt(mode="min").quantiles(ms)
    assert [m.id for m in lower] == ["c2"] and [m.id for m in upper] == ["c1"]


def test_quantiles_leave_out_done_and_unscored_members():
    ms = members([3.0, 1.0, 4.0, 1.5]) + [Member("d", 5, 100.0, {"lr": 0.1}, done=True), Member("u", 5, None, {})]
    lower, upper = pbt().quantiles(ms)
    assert [m.id for m in lower] == ["c1"] and [m.id for m in upper] == ["c2"]


def test_ties_break_by_id_deterministically():
    ms = members([1.0, 1.0, 1.0, 1.0])
    lower, upper = pbt().quantiles(ms)
    assert [m.id for m in upper] == ["c0"] and [m.id for m in lower] == ["c3"]
    assert pbt().quantiles(ms[::-1]) == (lower, upper)


def test_nan_ranks_worst():
    lower, _ = pbt().quantiles(members([1.0, float("nan"), 3.0, 2.0]))
    assert [m.id for m in lower] == ["c1"]


def test_decide_exploits_the_lower_quantile_from_the_upper():
    ms = members([3.0, 1.0, 4.0, 1.5])
    rows = pbt(resample_probability=0.0).decide(ms, np.random.default_rng(0))
    assert [(r.child, r.rank, r.quantile, r.action) for r in rows] == [
        ("c2", 1, "upper", "continue"), ("c0", 2, "middle", "continue"),
        ("c3", 3, "middle", "continue"), ("c1", 4, "lower", "exploit")]
    exploit = rows[-1]
    assert exploit.donor == "c2" and exploit.old_values == {"lr": 0.02}
    assert exploit.new_values["lr"] in (pytest.approx(0.03 * 1.2), pytest.approx(0.03 * 0.8))
    assert exploit.ops["lr"] in ("* 1.2", "* 0.8")


def test_decide_rows_put_done_and_skipped_members_last():
    ms = members([3.0, 1.0]) + [Member("b", 5, None, {"lr": 0.1}), Member("a", 5, 9.0, {"lr": 0.1}, done=True)]
    rows = pbt(require_attrs=False).decide(ms, np.random.default_rng(0))
    assert [(r.child, r.action, r.rank) for r in rows][-2:] == [("a", "done", None), ("b", "skip", None)]


def test_decide_requires_the_metric_by_default():
    ms = members([3.0, 1.0]) + [Member("quiet", 5, None, {"lr": 0.1})]
    with pytest.raises(SessionError, match="'quiet'.*'score'"):
        pbt().decide(ms, np.random.default_rng(0))


def test_explore_perturbs_every_mutated_path_in_sorted_order():
    p = pbt(hyperparam_mutations={"b": Choice([1, 2, 3]), "a": Uniform(0.0, 10.0)}, resample_probability=0.0)
    new, ops = p.explore({"a": 5.0, "b": 2, "fixed": "x"}, np.random.default_rng(1))
    r = np.random.default_rng(1)
    r.random()
    factor = (1.2, 0.8)[int(r.integers(2))]
    r.random()
    shift = (-1, 1)[int(r.integers(2))]
    assert new == {"a": pytest.approx(5.0 * factor), "b": 2 + shift, "fixed": "x"}
    assert ops == {"a": f"* {factor}", "b": "shift left" if shift < 0 else "shift right"}


def test_explore_clips_and_labels_it():
    p = pbt(hyperparam_mutations={"lr": Uniform(0.0, 1.0)}, resample_probability=0.0, perturbation_factors=(2.0,))
    assert p.explore({"lr": 0.8}, np.random.default_rng(0)) == ({"lr": 1.0}, {"lr": "* 2.0 (clipped)"})
    p = pbt(hyperparam_mutations={"lr": Uniform(0.0, 1.0)}, resample_probability=0.0, perturbation_factors=(2.0,),
            clip=False)
    assert p.explore({"lr": 0.8}, np.random.default_rng(0)) == ({"lr": 1.6}, {"lr": "* 2.0"})


def test_custom_explore_fn_runs_after_the_mutations_and_is_labelled():
    p = pbt(hyperparam_mutations={"lr": Uniform(0.001, 1.0)}, resample_probability=0.0,
            perturbation_factors=(1.0,), custom_explore_fn=halve_lr)
    assert p.explore({"lr": 0.5}, np.random.default_rng(0)) == ({"lr": 0.25}, {"lr": "custom"})
    p = pbt(hyperparam_mutations={"lr": Uniform(0.4, 1.0)}, resample_probability=0.0,
            perturbation_factors=(1.0,), custom_explore_fn=halve_lr)
    assert p.explore({"lr": 0.5}, np.random.default_rng(0)) == ({"lr": 0.4}, {"lr": "custom (clipped)"})


def test_custom_explore_fn_by_import_path_alone():
    p = PBT(metric="score", mode="max", perturbation_interval=2, custom_explore_fn="tests.test_searchers:halve_lr")
    assert p.explore({"lr": 0.5}, np.random.default_rng(0)) == ({"lr": 0.25}, {"lr": "custom"})


@pytest.mark.parametrize("kw, field", [
    ({"mode": "maximize"}, "pbt.mode"), ({"quantile_fraction": 0.6}, "pbt.quantile_fraction"),
    ({"quantile_fraction": -0.1}, "pbt.quantile_fraction"), ({"perturbation_interval": 0}, "pbt.perturbation_interval"),
    ({"hyperparam_mutations": None}, "pbt.hyperparam_mutations"), ({"resample_probability": 2}, "pbt.resample_probability"),
    ({"perturbation_factors": ()}, "pbt.perturbation_factors"), ({"burn_in_period": -1}, "pbt.burn_in_period"),
    ({"custom_explore_fn": "tests.test_searchers:nothing_here"}, "pbt.custom_explore_fn"), ({"metric": ""}, "pbt.metric"),
    ({"population_size": 1}, "pbt.population_size"),
])
def test_pbt_validation_names_the_parameter(kw, field):
    with pytest.raises(ConfigError) as info:
        pbt(**kw)
    assert info.value.field == field


def test_pbt_round_trips_through_a_dict():
    p = pbt(hyperparam_mutations={"lr": LogUniform(1e-4, 1.0), "bs": [16, 32, 64]}, custom_explore_fn=keep_values,
            burn_in_period=3, synch=False, seed=9)
    data = p.to_dict()
    assert data["custom_explore_fn"] == "tests.test_searchers:keep_values"
    assert data["hyperparam_mutations"]["bs"] == {"type": "choice", "values": [16, 32, 64]}
    again = PBT.from_dict(data)
    assert again.to_dict() == data and searcher_from_dict(data).to_dict() == data
    assert again.hyperparam_mutations == p.hyperparam_mutations


def test_a_lambda_explore_fn_cannot_be_stored():
    p = pbt(custom_explore_fn=lambda values: values)
    with pytest.raises(ConfigError, match="importable") as info:
        p.to_dict()
    assert info.value.field == "pbt.custom_explore_fn"


def test_due_and_next_boundary_account_for_burn_in():
    p = pbt(perturbation_interval=5, burn_in_period=12)
    assert not p.due(10, 0) and p.due(12, 0) and not p.due(15, 12) and p.due(17, 12)
    assert [p.next_boundary(t) for t in (0, 11, 12, 13, 17)] == [12, 12, 17, 17, 22]
    p = pbt(perturbation_interval=5)
    assert [p.next_boundary(t) for t in (0, 4, 5, 9)] == [5, 5, 10, 10]


def test_decision_round_trips_and_validates():
    row = Decision(child="c1", t=4, score=1.0, rank=3, quantile="lower", action="exploit", donor="c0",
                   old_values={"lr": 0.1}, new_values={"lr": 0.12}, ops={"lr": "* 1.2"})
    assert Decision.from_dict(row.to_dict()) == row
    with pytest.raises(ConfigError):
        Decision.from_dict({**row.to_dict(), "action": "explode"})
    with pytest.raises(ConfigError):
        Decision.from_dict({**row.to_dict(), "extra": 1})


# Ray's PopulationBasedTrainingSynchTest: score = step + a, interval 1, 3 steps.  Exploit copies the donor's
# checkpoint (its step) and its values; only "c" is mutated (always 1), so "a" travels with the weights.

def ray_synch_run(a_values, steps=3, seed=0):
    p = PBT(metric="mean_accuracy", mode="max", perturbation_interval=1, hyperparam_mutations={"c": Choice([1])},
            population_size=len(a_values), seed=seed)
    state = {f"trial{i}": {"t": 0, "values": {"a": a, "c": 1}} for i, a in enumerate(a_values)}
    rng, t = np.random.default_rng(p.seed), 0
    while t < steps:
        t = min(p.next_boundary(t), steps)
        for s in state.values():
            s["t"] = t
        population = [Member(c, s["t"], s["t"] + s["values"]["a"], s["values"], done=s["t"] >= steps)
                      for c, s in state.items()]
        for row in p.decide(population, rng):
            if row.action == "exploit":
                state[row.child] = {"t": state[row.donor]["t"], "values": row.new_values}
    return {c: s["t"] + s["values"]["a"] for c, s in state.items()}


@pytest.mark.parametrize("seed", range(5))
def test_ray_synch_pass_every_trial_ends_at_43(seed):
    assert set(ray_synch_run([10, 20, 40], seed=seed).values()) == {43}


@pytest.mark.parametrize("seed", range(5))
def test_ray_synch_pass_last_every_trial_ends_at_33(seed):
    assert set(ray_synch_run([30, 20, 10], seed=seed).values()) == {33}


def test_ray_asynch_fail_not_every_trial_ends_at_43():
    """Async (decide_one per result), arrival order from step times a/20 s as in Ray's test: a fast weak trial
    finishes before the strong ones have reported, so it never exploits them."""
    p = PBT(metric="mean_accuracy", mode="max", perturbation_interval=1, hyperparam_mutations={"c": Choice([1])},
            population_size=3, synch=False)
    state = {f"trial{i}": {"t": 0, "last": 0, "values": {"a": a, "c": 1}} for i, a in enumerate([10, 20, 40])}
    latest: dict[str, Member] = {}
    events = [(s["values"]["a"] / 20, c) for c, s in state.items()]
    heapq.heapify(events)
    rng = np.random.default_rng(0)
    while events:
        now, c = heapq.heappop(events)
        s = state[c]
        s["t"] += 1
        latest[c] = Member(c, s["t"], s["t"] + s["values"]["a"], s["values"], done=s["t"] >= 3)
        if latest[c].done:
            continue
        if p.due(s["t"], s["last"]):
            row = p.decide_one(latest[c], list(latest.values()), rng)
            s["last"] = s["t"]
            if row.action == "exploit":
                donor = state[row.donor]
                s.update(t=donor["t"], last=donor["last"], values=row.new_values)
        heapq.heappush(events, (now + s["values"]["a"] / 20, c))
    final = {c: m.score for c, m in latest.items()}
    assert any(score != 43 for score in final.values())
    assert final["trial0"] == 13


def toy_rounds(seed, rounds=6, size=6):
    """A seeded PBT loop on a toy: score grows by -log10(lr - 0.01)**2-ish; returns every decision row."""
    p = pbt(hyperparam_mutations={"lr": LogUniform(1e-4, 1.0), "bs": [16, 32, 64, 128]}, population_size=size,
            seed=seed, quantile_fraction=0.5)
    rng = np.random.default_rng(p.seed)
    values = {f"c{i}": v for i, v in enumerate(p.initial(SearchSpace(), rng))}
    score = {c: 0.0 for c in values}
    rows = []
    for r in range(1, rounds + 1):
        for c, v in values.items():
            score[c] += -abs(np.log10(v["lr"]) + 2) + v["bs"] / 128
        decided = p.decide([Member(c, r, score[c], values[c]) for c in values], rng)
        for row in decided:
            if row.action == "exploit":
                values[row.child], score[row.child] = row.new_values, score[row.donor]
        rows += [row.to_dict() for row in decided]
    return rows


def test_same_seed_same_decisions_different_seed_different_donors():
    first = toy_rounds(3)
    assert first == toy_rounds(3)
    assert any(row["action"] == "exploit" for row in first)
    donors = [[row["donor"] for row in rows] for rows in (first, toy_rounds(4))]
    assert donors[0] != donors[1]


def test_decide_one_judges_one_member_against_the_rest():
    ms = members([3.0, 1.0, 4.0, 1.5])
    p = pbt()
    assert p.decide_one(ms[1], ms, np.random.default_rng(0)).action == "exploit"
    row = p.decide_one(ms[2], ms, np.random.default_rng(0))
    assert (row.action, row.quantile, row.rank) == ("continue", "upper", 1)
    alone = p.decide_one(ms[1], [Member("other", 1, None, {})], np.random.default_rng(0))
    assert (alone.action, alone.quantile) == ("continue", "middle")


def test_pbt_initial_fills_mutated_paths_the_space_lacks():
    p = pbt(hyperparam_mutations={"lr": LogUniform(1e-4, 1.0), "bs": [16, 32]}, population_size=3)
    starts = p.initial(SearchSpace({"bs": Grid([8])}), np.random.default_rng(0))
    assert len(starts) == 3 and all(s["bs"] == 8 and 1e-4 <= s["lr"] <= 1.0 for s in starts)


def test_random_search_samples_each_child():
    space = SearchSpace({"lr": LogUniform(1e-4, 1.0), "layers": IntUniform(1, 4)})
    starts = RandomSearch(5, seed=2).initial(space)
    assert len(starts) == 5 and starts == RandomSearch(5, seed=2).initial(space, np.random.default_rng(2))
    assert len({s["lr"] for s in starts}) == 5


def test_grid_search_repeats_the_grid_and_samples_the_rest():
    space = SearchSpace({"opt": Grid(["sgd", "adam"]), "bs": Grid([16, 32]), "lr": Uniform(0.0, 1.0)})
    starts = GridSearch(repeats=2).initial(space, np.random.default_rng(0))
    assert [(s["bs"], s["opt"]) for s in starts] == [(16, "sgd"), (16, "adam"), (32, "sgd"), (32, "adam")] * 2
    assert len({s["lr"] for s in starts}) == 8 and list(starts[0]) == ["bs", "lr", "opt"]


def test_searchers_validate_and_round_trip():
    with pytest.raises(ConfigError) as info:
        RandomSearch(0)
    assert info.value.field == "random_search.num_samples"
    with pytest.raises(ConfigError):
        GridSearch(repeats=0)
    for s in (RandomSearch(3, seed=1, stopper=MedianStopping("loss", "min")),
              GridSearch(2, stopper=SuccessiveHalving("acc", "max", min_steps=2))):
        assert searcher_from_dict(s.to_dict()) == s


def test_searchers_without_stopper_continue():
    ms = members([1.0, 2.0]) + [Member("z", 9, 3.0, {}, done=True)]
    assert [(r.child, r.action) for r in RandomSearch(3).decide(ms, {})] == [
        ("c0", "continue"), ("c1", "continue"), ("z", "done")]


def history_at(t, scores):
    return {c: {t: s} for c, s in scores.items()}


def test_median_stopping_stops_below_the_median_of_the_others():
    scores = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    ms = [Member(c, 10, s, {}) for c, s in scores.items()]
    rows = {r.child: r.action for r in MedianStopping("acc", "max").decide(ms, history_at(10, scores))}
    assert rows == {"a": "stop", "b": "stop", "c": "continue", "d": "continue"}
    rows = {r.child: r.action for r in MedianStopping("loss", "min").decide(ms, history_at(10, scores))}
    assert rows == {"a": "continue", "b": "continue", "c": "stop", "d": "stop"}


def test_median_stopping_waits_for_grace_and_samples():
    scores = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    ms = [Member(c, 10, s, {}) for c, s in scores.items()]
    assert {r.action for r in MedianStopping("acc", "max", grace_period=11).decide(ms, history_at(10, scores))} == {
        "continue"}
    assert {r.action for r in MedianStopping("acc", "max", min_samples_required=4).decide(
        ms, history_at(10, scores))} == {"continue"}
    other_t = {"a": {10: 1.0}, "b": {9: 2.0}, "c": {9: 3.0}, "d": {9: 4.0}}
    assert MedianStopping("acc", "max").decide(ms[:1], other_t)[0].action == "continue"


def test_successive_halving_keeps_the_top_fraction_at_a_rung():
    sh = SuccessiveHalving("acc", "max", min_steps=2, reduction_factor=4)
    assert [t for t in range(40) if sh.is_rung(t)] == [2, 8, 32] and sh.next_boundary(8) == 32
    scores = {f"c{i}": float(i) for i in range(8)}
    ms = [Member(c, 8, s, {}) for c, s in scores.items()]
    rows = {r.child: r.action for r in sh.decide(ms, history_at(8, scores))}
    assert [c for c, a in rows.items() if a == "continue"] == ["c7", "c6"]
    off_rung = [Member(c, 9, s, {}) for c, s in scores.items()]
    assert {r.action for r in sh.decide(off_rung, history_at(9, scores))} == {"continue"}


def test_successive_halving_keeps_one_and_breaks_ties_by_id():
    sh = SuccessiveHalving("acc", "max", min_steps=1)
    scores = {"b": 1.0, "a": 1.0, "c": 0.5}
    rows = {r.child: r.action for r in sh.decide([Member(c, 1, s, {}) for c, s in scores.items()],
                                                   history_at(1, scores))}
    assert rows == {"a": "continue", "b": "stop", "c": "stop"}
