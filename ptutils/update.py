"""Update functions: ``update(session) -> session``, called by the run loop after every step.

An update is any callable taking the session and returning it (``None`` is
read as "unchanged").  The loop calls the configured updates in order after
each training/eval step (``session.event == "step"``) and once more at the end
of each epoch (``session.event == "epoch"``).  A :class:`Monitor` watches one
quantity and fires an *action* when its *condition* holds: the action is a
trigger name (``"pause"``, ``"stop"``, a stage trigger) or a callable
``action(session, value)``.

Updates that keep state between steps (a plateau counter, a remedy index)
expose ``state_dict()``/``load_state_dict()``; the checkpoint stores it so a
resumed session makes the same decisions.  Updates that ask the DataProvider for
loaders (:class:`Evaluate`) name their requests in ``data_requests()``, which the
session checks against the provider when it is built.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union

if TYPE_CHECKING:
    import torch

    from .model import Model
    from .stages import Stage


class SessionLike(Protocol):
    """What updates, monitors and remedies use of a session (:class:`ptutils.session.Session` is one)."""

    event: str
    """``"step"`` after each step, ``"epoch"`` at the end of each epoch."""
    model: Model
    metrics: dict[str, float]
    loss: torch.Tensor | None

    @property
    def stage(self) -> str: ...
    @property
    def stage_step(self) -> int: ...
    @property
    def current_stage(self) -> Stage: ...
    @property
    def is_running(self) -> bool: ...
    def stage_total(self, stage: Stage) -> int | None: ...
    def trigger(self, name: str) -> bool: ...
    def value(self, quantity: Any) -> Any: ...
    def log_event(self, kind: str, **data: Any) -> None: ...
    def restore_checkpoint(self, *, with_updates: bool = False) -> dict: ...
    def evaluate(self, request: Any, *, prefix: str = "val") -> Mapping[str, float]: ...


Update = Callable[[SessionLike], Union[SessionLike, None]]
Quantity = Union[str, Callable[[SessionLike], Any], None]
Action = Union[str, Callable[[SessionLike, Any], Any]]

__all__ = [
    "Monitor", "Threshold", "Plateau", "NonFinite", "Always", "Evaluate", "Remedies",
    "every_n_steps", "compose", "gap", "lower_lr", "clip_gradients", "run_updates", "SessionLike",
]


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)


# ---------------------------------------------------------------------- conditions
class Always:
    """A condition that always holds (use with ``every=`` for periodic actions)."""

    def __call__(self, value: Any) -> bool:
        return True


class Threshold:
    """Holds when the value is above ``above`` and/or below ``below``."""

    def __init__(self, *, above: float | None = None, below: float | None = None):
        if above is None and below is None:
            raise ValueError("Threshold needs above= or below=")
        self.above, self.below = above, below

    def __call__(self, value: Any) -> bool:
        v = _as_float(value)
        if v is None:
            return False
        return (self.above is not None and v > self.above) or (self.below is not None and v < self.below)

    def __repr__(self) -> str:
        return f"Threshold(above={self.above}, below={self.below})"


class NonFinite:
    """Holds when the value is NaN or infinite (an exploded loss or gradient)."""

    def __call__(self, value: Any) -> bool:
        v = _as_float(value)
        return v is not None and not math.isfinite(v)


class Plateau:
    """Holds once the value has not improved by ``min_delta`` for ``patience`` observations."""

    def __init__(self, *, patience: int = 5, min_delta: float = 0.0, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best: float | None = None
        self.bad = 0

    def __call__(self, value: Any) -> bool:
        v = _as_float(value)
        if v is None or math.isnan(v):
            return False
        better = self.best is None or (
            v < self.best - self.min_delta if self.mode == "min" else v > self.best + self.min_delta
        )
        if better:
            self.best, self.bad = v, 0
            return False
        self.bad += 1
        return self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = state["best"], state["bad"]


# ---------------------------------------------------------------------- quantities
def gap(smaller: str, larger: str) -> Callable[[SessionLike], float | None]:
    """The quantity ``metrics[larger] - metrics[smaller]`` (e.g. val error minus train error)."""

    def quantity(session: SessionLike) -> float | None:
        a, b = session.metrics.get(smaller), session.metrics.get(larger)
        return None if a is None or b is None else float(b) - float(a)

    quantity.__name__ = f"gap({smaller},{larger})"
    return quantity


# ---------------------------------------------------------------------- monitor
class Monitor:
    """Watch ``quantity`` every ``every`` events; when ``when(value)`` holds, run ``then``.

    ``quantity`` is a metric name (``"loss"``, ``"grad_norm"``, ``"val_loss"`` ...),
    a callable ``session -> value``, or None (the action just runs on schedule).
    ``on`` is ``"step"`` or ``"epoch"``.  ``once`` disarms the monitor after it fires.
    ``stages`` limits it to those stages (default: every stage).
    """

    def __init__(
        self,
        quantity: Quantity,
        when: Callable[[Any], bool] | None = None,
        then: Action | Sequence[Action] = "pause",
        *,
        every: int = 1,
        on: str = "step",
        once: bool = False,
        stages: Iterable[str] | None = None,
        name: str | None = None,
    ):
        if on not in ("step", "epoch"):
            raise ValueError(f"on must be 'step' or 'epoch', got {on!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.quantity = quantity
        self.when = when if when is not None else Always()
        self.actions = list(then) if isinstance(then, (list, tuple)) else [then]
        self.every, self.on, self.once = every, on, once
        self.stages = None if stages is None else frozenset(stages)
        self.name = name or f"Monitor({quantity if isinstance(quantity, str) else getattr(quantity, '__name__', 'f')})"
        self.count = 0
        self.fired = 0
        self.armed = True
        self.needs_grad_norm = quantity == "grad_norm"

    def __call__(self, session: SessionLike) -> SessionLike:
        if session.event != self.on or not self.armed or (self.stages is not None and session.stage not in self.stages):
            return session
        self.count += 1
        if self.count % self.every:
            return session
        value = session.value(self.quantity) if self.quantity is not None else None
        if self.quantity is not None and value is None:
            return session
        if self.when(value):
            self.fired += 1
            if self.once:
                self.armed = False
            session.log_event("monitor", monitor=self.name, value=_as_float(value) if value is not None else None)
            for action in self.actions:
                if isinstance(action, str):
                    session.trigger(action)
                else:
                    action(session, value)
        return session

    def state_dict(self) -> dict:
        state = {"count": self.count, "fired": self.fired, "armed": self.armed}
        if hasattr(self.when, "state_dict"):
            state["when"] = self.when.state_dict()
        for i, action in enumerate(self.actions):
            if hasattr(action, "state_dict"):
                state[f"action{i}"] = action.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.count, self.fired, self.armed = state["count"], state["fired"], state["armed"]
        if "when" in state:
            self.when.load_state_dict(state["when"])
        for i, action in enumerate(self.actions):
            if f"action{i}" in state:
                action.load_state_dict(state[f"action{i}"])

    def __repr__(self) -> str:
        return f"<{self.name} when={self.when!r} every={self.every} on={self.on}>"


def every_n_steps(n: int, then: Action | Sequence[Action]) -> Monitor:
    """Run ``then`` every ``n`` steps."""
    return Monitor(None, Always(), then, every=n, name=f"every_{n}_steps")


class Evaluate:
    """Evaluate on a data request every ``every`` epochs (or steps) and store ``{prefix}_*`` metrics.

    ``stages`` limits it to those stages (default: the training stages).
    """

    def __init__(
        self, data: Any, *, prefix: str = "val", every: int = 1, on: str = "epoch", stages: Iterable[str] | None = None
    ):
        self.data, self.prefix, self.every, self.on = data, prefix, every, on
        self.stages = None if stages is None else frozenset(stages)
        self.count = 0

    def __call__(self, session: SessionLike) -> SessionLike:
        wanted = session.current_stage.mode == "train" if self.stages is None else session.stage in self.stages
        if session.event == self.on and wanted:
            self.count += 1
            if self.count % self.every == 0:
                session.evaluate(self.data, prefix=self.prefix)
        return session

    def data_requests(self) -> list[Any]:
        """The request it will make of the session's DataProvider (checked when the session is built)."""
        return [self.data]

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


# ---------------------------------------------------------------------- remedies
def lower_lr(factor: float = 0.1) -> Callable[[SessionLike], str]:
    """A remedy: multiply the learning rate by ``factor``."""

    def remedy(session: SessionLike) -> str:
        session.model.set_lr(session.model.lr * factor)
        return f"lower_lr(x{factor}) -> lr={session.model.lr:g}"

    remedy.__name__ = f"lower_lr({factor})"
    return remedy


def clip_gradients(max_norm: float = 1.0) -> Callable[[SessionLike], str]:
    """A remedy: clip the gradient norm to ``max_norm`` from now on."""

    def remedy(session: SessionLike) -> str:
        session.model.grad_clip = max_norm
        return f"clip_gradients({max_norm})"

    remedy.__name__ = f"clip_gradients({max_norm})"
    return remedy


class Remedies:
    """An action: restore the last good checkpoint, then apply the next remedy of a list.

    Remedies accumulate: a lowered LR stays lowered after the next restore.  A
    remedy applied *after* the restored checkpoint was written is not in that
    checkpoint, so it is applied again; one applied before is already in it
    (the optimizer's LR and the gradient clipping are checkpointed).  When the
    list is exhausted the session fails with the quantity that kept exploding.
    """

    def __init__(self, remedies: Iterable[Callable[[SessionLike], str]], *, restore: bool = True):
        self.remedies = list(remedies)
        self.restore = restore
        self.applied: list[dict[str, Any]] = []

    def __call__(self, session: SessionLike, value: Any) -> None:
        if len(self.applied) >= len(self.remedies):
            done = [a["remedy"] for a in self.applied]
            raise FloatingPointError(f"still diverging ({value}) after remedies {done}")
        if self.restore:
            record = session.restore_checkpoint()
            for i, applied in enumerate(self.applied):
                if applied["time"] > record["created"]:
                    self.remedies[i](session)
        description = self.remedies[len(self.applied)](session)
        self.applied.append({"remedy": description, "time": time.time()})
        session.log_event("remedy", remedy=description, value=_as_float(value))

    def state_dict(self) -> dict:
        return {"applied": [dict(a) for a in self.applied]}

    def load_state_dict(self, state: dict) -> None:
        self.applied = [dict(a) for a in state["applied"]]


# ---------------------------------------------------------------------- composition
def run_updates(updates: Sequence[Update], session: SessionLike) -> SessionLike:
    """Apply updates in order; each must return the session (or None for unchanged)."""
    for update in updates:
        result = update(session)
        if result is not None and result is not session:
            raise TypeError(
                f"update {getattr(update, '__name__', update)!r} returned {type(result).__name__}; "
                "an update returns the session it was given (or None)"
            )
    return session


def compose(*updates: Update) -> Update:
    """One update that runs ``updates`` in order."""

    def composed(session: SessionLike) -> SessionLike:
        return run_updates(updates, session)

    composed.__name__ = "compose(" + ", ".join(getattr(u, "__name__", type(u).__name__) for u in updates) + ")"
    return composed
