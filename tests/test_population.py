"""Reading decision rows: lineage back to generation 0, the best score, the table."""

from __future__ import annotations

from ptutils.population import best, generation, lineage, table


def row(rnd, child, t, score, action="continue", donor=None, new=None):
    return {"round": rnd, "child": child, "t": t, "score": score, "action": action, "donor": donor,
            "new_values": new or {}}


ROWS = [
    row(0, "a", 5, 0.9), row(0, "b", 5, 0.5), row(0, "c", 5, 0.1, "exploit", "a", {"lr": 0.12}),
    row(1, "a", 10, 0.4, "exploit", "c", {"lr": 0.1}), row(1, "b", 10, 0.6), row(1, "c", 10, 0.95),
]


def test_lineage_walks_through_each_donor_back_to_generation_zero():
    # a took c's weights at 10; c had taken a's at 5: a's own first 5 steps, then c's 5..10, then a again.
    assert lineage(ROWS, "a") == [
        {"child": "a", "from_t": 0, "to_t": 5, "values": None},
        {"child": "c", "from_t": 5, "to_t": 10, "values": {"lr": 0.12}, "donor": "a"},
        {"child": "a", "from_t": 10, "to_t": None, "values": {"lr": 0.1}, "donor": "c"},
    ]
    assert lineage(ROWS, "b") == [{"child": "b", "from_t": 0, "to_t": None, "values": None}]
    assert (generation(ROWS, "a"), generation(ROWS, "b")) == (1, 0)


def test_the_best_score_by_mode_and_the_table():
    assert best(ROWS, "max") == {"child": "c", "score": 0.95, "t": 10, "round": 1}
    assert best(ROWS, "min")["child"] == "c" and best(ROWS, "min")["score"] == 0.1
    assert best([row(0, "a", 5, None)], "max") is None
    text = table([{"child": "a", "state": "paused", "step": 10, "score": 0.4, "generation": 1, "values": {"lr": 0.1}},
                  {"child": "b", "state": "complete", "step": 20, "score": None, "values": {"lr": 3e-5}}], "val_acc")
    assert text.splitlines() == [
        "child  state     step  val_acc  gen  lr",
        "a      paused    10    0.4      1    0.1",
        "b      complete  20    -        0    3e-05",
    ]
