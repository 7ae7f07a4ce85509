"""Stages and the session's state graph, declared in Python and handed to ``transitions``.

The lifecycle is fixed: ``pending -> running <-> paused -> complete | failed``
(plus ``restart`` back to ``pending``).  ``running`` holds the user's stages as
sub-states (``running/train``, ``running/test`` ...).  Stage transitions are
transitions-style dicts whose ``source``/``dest`` name stages::

    {"trigger": "evaluate", "source": "train", "dest": "test", "conditions": [overfitting]}

A stage transition *with* conditions is polled after every update and fires as
soon as all its guards hold; one without conditions fires only when an update
calls ``session.trigger(name)``.  The trigger ``stage_done`` is fired by the
loop when a stage's budget (max_epochs/max_steps) runs out; if no
``stage_done`` transition of that stage passes its guards, the session
completes.  Guards (``conditions``/``unless``) and callbacks
(``before``/``after``) are all called with the session.  Structural changes
that must survive a resume belong in a stage's ``setup``, not in ``after``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from transitions.extensions.nesting import NestedState

from .config import StageConfig, import_object
from .errors import ConfigError

LIFECYCLE = ("start", "pause", "resume", "complete", "fail", "stop", "restart")
STAGE_DONE = "stage_done"
SEP = "/"


class StageState(NestedState):
    """A ``transitions`` nested state whose path separator is :data:`SEP` (stage names may hold '_')."""

    separator = SEP


_TRANSITION_KEYS = {"trigger", "source", "dest", "conditions", "unless", "before", "after", "prepare"}


@attrs.frozen
class Stage:
    """One stage: which data it asks for, whether it trains or evaluates, and its budget.

    ``data`` is the request handed to the DataProvider (a name, a dict, or a
    callable ``session -> request``).  ``setup(session)`` (a callable or an
    import path) changes the model's *structure* for this stage (a new head, a
    fresh optimizer): it runs when the stage is entered and is replayed, for
    every stage the session went through, before a checkpoint is loaded into a
    new process, so the checkpoint finds the structure it was saved from.
    """

    name: str
    data: Any = None
    mode: str = "train"
    max_epochs: int | None = None
    max_steps: int | None = None
    setup: Any = None

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or SEP in self.name:
            raise ConfigError("stages[].name", f"a stage name is a non-empty string without {SEP!r}, got {self.name!r}")
        if self.mode not in ("train", "eval"):
            raise ConfigError(f"stages.{self.name}.mode", f"expected 'train' or 'eval', got {self.mode!r}")
        if self.setup is not None and not callable(self.setup):
            object.__setattr__(self, "setup", _resolve_callable(self.setup, f"stages.{self.name}.setup"))
        for field in ("max_epochs", "max_steps"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"stages.{self.name}.{field}", f"expected a positive int or None, got {value!r}")

    @classmethod
    def coerce(cls, value: Stage | StageConfig | Mapping[str, Any] | str) -> Stage:
        """A Stage from a Stage, a StageConfig, a dict, or just a name."""
        if isinstance(value, Stage):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, StageConfig):
            return cls(**attrs.asdict(value))
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in attrs.fields(cls)}
            if unknown:
                raise ConfigError(f"stages.{value.get('name', '?')}.{sorted(unknown)[0]}", "unknown key")
            return cls(**value)
        raise ConfigError("stages[]", f"expected a Stage, dict or name, got {type(value).__name__}")


def _resolve_callable(value: Any, field: str) -> Callable:
    if isinstance(value, str):
        value = import_object(value, field)
    if not callable(value):
        raise ConfigError(field, f"expected a callable or an import path, got {value!r}")
    return value


def _callables(value: Any, field: str) -> list[Callable]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [_resolve_callable(v, f"{field}[{i}]") for i, v in enumerate(items)]


@attrs.frozen
class StageTransition:
    """A validated stage transition (guards resolved to callables)."""

    trigger: str
    sources: tuple[str, ...]
    dest: str
    conditions: tuple[Callable, ...] = ()
    unless: tuple[Callable, ...] = ()
    before: tuple[Callable, ...] = ()
    after: tuple[Callable, ...] = ()

    @property
    def polled(self) -> bool:
        """Whether the loop checks this transition's guards after every update."""
        return bool(self.conditions or self.unless) and self.trigger != STAGE_DONE

    def guards_hold(self, session: Any) -> bool:
        """Evaluate the guards as plain callables (cheap; no FSM involved)."""
        return all(c(session) for c in self.conditions) and not any(u(session) for u in self.unless)


def parse_transitions(raw: Iterable[Mapping[str, Any]], stage_names: Sequence[str]) -> list[StageTransition]:
    """Validate stage transition dicts against the declared stages."""
    known = set(stage_names)
    out = []
    for i, t in enumerate(raw):
        field = f"transitions[{i}]"
        if not isinstance(t, Mapping):
            raise ConfigError(field, f"expected a mapping, got {type(t).__name__}")
        unknown = set(t) - _TRANSITION_KEYS
        if unknown:
            raise ConfigError(f"{field}.{sorted(unknown)[0]}", f"unknown key (known: {', '.join(sorted(_TRANSITION_KEYS))})")
        trigger = t.get("trigger")
        if not isinstance(trigger, str) or not trigger.isidentifier():
            raise ConfigError(f"{field}.trigger", f"expected an identifier, got {trigger!r}")
        if trigger in LIFECYCLE:
            raise ConfigError(f"{field}.trigger", f"{trigger!r} is a lifecycle trigger; pick another name")
        source = t.get("source")
        sources = tuple(stage_names) if source == "*" else tuple(source if isinstance(source, (list, tuple)) else [source])
        for s in sources + (t.get("dest"),):
            if s not in known:
                raise ConfigError(f"{field}", f"unknown stage {s!r} (stages: {', '.join(stage_names)})")
        out.append(
            StageTransition(
                trigger,
                sources,
                t["dest"],
                tuple(_callables(t.get("conditions"), f"{field}.conditions")),
                tuple(_callables(t.get("unless"), f"{field}.unless")),
                tuple(_callables(t.get("before"), f"{field}.before")),
                tuple(_callables(t.get("after"), f"{field}.after")),
            )
        )
    return out


def state_name(stage: str) -> str:
    """The FSM state of a stage: ``running/<stage>``."""
    return f"running{SEP}{stage}"


def machine_states(stages: Sequence[Stage]) -> list:
    """The nested state list for ``transitions``."""
    return [
        "pending",
        {"name": "running", "children": [s.name for s in stages], "initial": stages[0].name},
        "paused",
        "complete",
        "failed",
    ]


def machine_transitions(
    stages: Sequence[Stage],
    stage_transitions: Sequence[StageTransition],
    *,
    start_conditions: Sequence[Callable] = (),
    write_ahead: Callable[[str, str], Callable] | None = None,
    stage_is: Callable[[str], Callable] | None = None,
) -> list[dict]:
    """The lifecycle and stage transitions as ``transitions`` dicts.

    ``write_ahead(trigger, dest)`` returns a ``before`` callback that records
    the change before it happens; ``stage_is(name)`` returns a guard that is
    true when the session's current stage is ``name`` (used by ``resume``).
    """

    def wa(trigger: str, dest: str) -> list[Callable]:
        return [write_ahead(trigger, dest)] if write_ahead is not None else []

    active = ["pending", "running", "paused"]
    out: list[dict] = [
        {"trigger": "start", "source": "pending", "dest": "running", "conditions": list(start_conditions),
         "before": wa("start", state_name(stages[0].name))},
        {"trigger": "pause", "source": "running", "dest": "paused", "before": wa("pause", "paused")},
        {"trigger": "complete", "source": "running", "dest": "complete", "before": wa("complete", "complete")},
        {"trigger": "stop", "source": active, "dest": "complete", "before": wa("stop", "complete")},
        {"trigger": "fail", "source": active, "dest": "failed", "before": wa("fail", "failed")},
        {"trigger": "restart", "source": ["complete", "failed"], "dest": "pending", "before": wa("restart", "pending")},
    ]
    for stage in stages:
        out.append({
            "trigger": "resume", "source": "paused", "dest": state_name(stage.name),
            "conditions": [stage_is(stage.name)] if stage_is is not None else [],
            "before": wa("resume", state_name(stage.name)),
        })
    for t in stage_transitions:
        out.append({
            "trigger": t.trigger,
            "source": [state_name(s) for s in t.sources],
            "dest": state_name(t.dest),
            "conditions": list(t.conditions),
            "unless": list(t.unless),
            "before": wa(t.trigger, state_name(t.dest)) + list(t.before),
            "after": list(t.after),
        })
    return out
