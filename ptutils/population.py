"""What a tuning session's decision rows say: the population table, each child's lineage, the best child.

Pure functions over stored rows (the ``population`` collection, one row per
child per decision; see :mod:`ptutils.nest`), so the command line and a
notebook read a tuning the same way the tuning session does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

POPULATION = "population"
"""The collection of decision rows."""


def lineage(rows: Sequence[Mapping[str, Any]], child: str) -> list[dict[str, Any]]:
    """Where ``child``'s weights come from, oldest first: ``{"child", "from_t", "to_t", "values"}`` segments.

    Each exploit row ("copy the donor's checkpoint at t") starts a segment of
    the recipient; before it, the weights were the donor's, so the walk goes on
    through the donor's rows up to t, back to a child of generation 0.
    """
    exploits: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("action") == "exploit":
            exploits.setdefault(row["child"], []).append(row)
    segments: list[dict[str, Any]] = []
    current, until = child, math.inf
    while True:
        earlier = [r for r in exploits.get(current, ()) if r["t"] < until]
        if not earlier:
            segments.append({"child": current, "from_t": 0, "to_t": None if until == math.inf else until,
                             "values": None})
            break
        row = max(earlier, key=lambda r: (r["t"], r["round"]))
        segments.append({"child": current, "from_t": row["t"], "to_t": None if until == math.inf else until,
                         "values": dict(row["new_values"]), "donor": row["donor"]})
        current, until = row["donor"], row["t"]
    return segments[::-1]


def generation(rows: Sequence[Mapping[str, Any]], child: str) -> int:
    """How many times ``child`` took another child's weights."""
    return sum(1 for r in rows if r.get("child") == child and r.get("action") == "exploit")


def best(rows: Sequence[Mapping[str, Any]], mode: str) -> dict[str, Any] | None:
    """The best score any decision row holds: ``{"child", "score", "t", "round"}`` (None before any score)."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [r for r in rows if isinstance(r.get("score"), (int, float)) and math.isfinite(r["score"])]
    if not scored:
        return None
    top = max(scored, key=lambda r: (sign * r["score"], -r["round"], r["child"]))
    return {"child": top["child"], "score": top["score"], "t": top["t"], "round": top["round"]}


def table(members: Sequence[Mapping[str, Any]], metric: str) -> str:
    """The population table as text: one line per child (id, state, step, score, generation, values)."""
    paths = sorted({p for m in members for p in (m.get("values") or {})})
    head = ["child", "state", "step", metric, "gen", *paths]
    lines = [head]
    for m in members:
        score = m.get("score")
        values = m.get("values") or {}
        lines.append([
            str(m["child"]), str(m.get("state")), str(m.get("step")),
            "-" if score is None else f"{score:.4g}", str(m.get("generation", 0)),
            *(_show(values.get(p)) for p in paths),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
