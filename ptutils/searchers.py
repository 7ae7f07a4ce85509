"""Tuning decisions as pure functions of the population: random and grid search, early stopping, PBT.

Nothing here runs a child or touches a database: the orchestrator hands in
what each child reported (:class:`Member`) and a seeded ``numpy.random.Generator``
and writes the returned :class:`Decision` rows before acting on them.  Same
inputs and the same generator state give the same rows.

PBT reproduces Ray Tune's ``PopulationBasedTraining`` (quantiles, donor choice,
explore) with its documented deviations: time is the step count, ``synch=True``
and ``clip=True`` by default, and every draw comes from the given generator.
Draw order in :meth:`PBT.decide`: lower-quantile members in rank order (best
first); for each, one ``rng.integers(len(upper))`` for the donor, then the
explore draws of :meth:`PBT.explore` (per mutated path in sorted order, as
:meth:`ptutils.spaces.Space.perturb` documents).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from .config import import_object
from .errors import ConfigError, SessionError
from .spaces import Grid, SearchSpace, _integral, _real

ACTIONS = ("continue", "exploit", "skip", "stop", "done")
QUANTILES = ("upper", "middle", "lower")


@attrs.frozen
class Member:
    """One child as the searcher sees it at a decision."""

    id: str
    t: int
    """Training steps done (the time attribute)."""
    score: float | None
    """The metric's raw value; None when not reported."""
    values: dict = attrs.field(converter=dict)
    """Current hyperparameter values by path."""
    done: bool = False
    """Finished its budget (or stopped): not ranked."""


def _in(allowed: tuple, optional: bool = False) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if not (value in allowed or (optional and value is None)):
            raise ConfigError(f"decision.{attr.name}", f"expected one of {allowed}, got {value!r}")
    return check


@attrs.frozen
class Decision:
    """One row of the population table, written before it takes effect."""

    child: str
    t: int
    score: float | None
    rank: int | None
    """1 = best among ranked members; None when not ranked."""
    quantile: str | None = attrs.field(validator=_in(QUANTILES, optional=True))
    action: str = attrs.field(validator=_in(ACTIONS))
    donor: str | None
    old_values: dict = attrs.field(converter=dict)
    new_values: dict = attrs.field(converter=dict)
    ops: dict = attrs.field(converter=dict)
    """path -> op label, e.g. ``{"model.optimizer.lr": "* 1.2"}``."""

    def to_dict(self) -> dict:
        """A plain dict (copies of the value dicts) for the population table."""
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v)
                for f in attrs.fields(Decision)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Rebuild a row from :meth:`to_dict`; a missing or unknown key raises ConfigError."""
        names = {f.name for f in attrs.fields(cls)}
        if set(data) != names:
            raise ConfigError("decision", f"missing {sorted(names - set(data))}, unknown {sorted(set(data) - names)}")
        return cls(**data)


def _signed(score: float, mode: str) -> float:
    """Higher is better; NaN (a diverged run) ranks worst."""
    if math.isnan(score):
        return -math.inf
    return score if mode == "max" else -score


def _ranked(members: Sequence[Member], mode: str) -> list[Member]:
    """Members not done and with a score, best first; ties by id (stable, so deterministic)."""
    ids = [m.id for m in members]
    if len(set(ids)) != len(ids):
        raise SessionError(f"two members share an id: {sorted({i for i in ids if ids.count(i) > 1})}")
    eligible = sorted((m for m in members if not m.done and m.score is not None), key=lambda m: m.id)
    return sorted(eligible, key=lambda m: -_signed(m.score, mode))  # type: ignore[arg-type]


def _row(m: Member, action: str, rank: int | None = None, quantile: str | None = None, donor: Member | None = None,
         new_values: Mapping | None = None, ops: Mapping | None = None) -> Decision:
    return Decision(child=m.id, t=m.t, score=m.score, rank=rank, quantile=quantile, action=action,
                    donor=donor.id if donor else None, old_values=m.values,
                    new_values=m.values if new_values is None else new_values, ops=ops or {})


def _check_mode(field: str, metric: Any, mode: Any) -> None:
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{field}.metric", f"expected the name of a reported metric, got {metric!r}")
    if mode not in ("max", "min"):
        raise ConfigError(f"{field}.mode", f"expected 'max' or 'min', got {mode!r}")


def _check_int(field: str, value: Any, minimum: int) -> None:
    if not _integral(value) or value < minimum:
        raise ConfigError(field, f"expected an integer >= {minimum}, got {value!r}")


def _stopper_rows(members: Sequence[Member], mode: str, stop: Callable[[Member], bool]) -> list[Decision]:
    ranked = _ranked(members, mode)
    rank = {m.id: i + 1 for i, m in enumerate(ranked)}
    rows = [_row(m, "stop" if stop(m) else "continue", rank[m.id]) for m in ranked]
    rest = sorted((m for m in members if m.id not in rank), key=lambda m: m.id)
    return rows + [_row(m, "done" if m.done else "continue") for m in rest]


@attrs.frozen
class MedianStopping:
    """Stop a child whose score at t is worse than the median of the others' scores at t (Optuna's MedianPruner).

    Applies once ``t >= grace_period`` and at least ``min_samples_required``
    other children reported at that same t.
    """

    metric: str
    mode: str
    grace_period: int = 0
    min_samples_required: int = 3

    def __attrs_post_init__(self) -> None:
        _check_mode("median_stopping", self.metric, self.mode)
        _check_int("median_stopping.grace_period", self.grace_period, 0)
        _check_int("median_stopping.min_samples_required", self.min_samples_required, 1)

    def decide(self, members: Sequence[Member], history: Mapping[str, Mapping[int, float]]) -> list[Decision]:
        """"stop" / "continue" rows ("done" for finished members), best first; history: child -> {t: score}."""
        def stop(m: Member) -> bool:
            others = [_signed(h[m.t], self.mode) for c, h in history.items() if c != m.id and m.t in h]
            if m.t < self.grace_period or len(others) < self.min_samples_required:
                return False
            return _signed(m.score, self.mode) < float(np.median(others))  # type: ignore[arg-type]
        return _stopper_rows(members, self.mode, stop)

    def to_dict(self) -> dict:
        """Plain parameters with ``"algo": "median_stopping"``."""
        return {"algo": "median_stopping", **attrs.asdict(self)}


@attrs.frozen
class SuccessiveHalving:
    """At rungs t = min_steps * reduction_factor**k keep the top 1/reduction_factor of the children there.

    A child is judged when its t is a rung, against every child with a score at
    that rung in ``history`` (at least one is kept, as in Optuna; ties go to the
    smaller id).  Stop children at :meth:`next_boundary` for the rule to see them.
    """

    metric: str
    mode: str
    min_steps: int
    reduction_factor: int = 4

    def __attrs_post_init__(self) -> None:
        _check_mode("successive_halving", self.metric, self.mode)
        _check_int("successive_halving.min_steps", self.min_steps, 1)
        _check_int("successive_halving.reduction_factor", self.reduction_factor, 2)

    def is_rung(self, t: int) -> bool:
        """Whether a decision happens at ``t``."""
        rung = self.min_steps
        while rung < t:
            rung *= self.reduction_factor
        return rung == t

    def next_boundary(self, t: int) -> int:
        """The first rung after ``t``."""
        rung = self.min_steps
        while rung <= t:
            rung *= self.reduction_factor
        return rung

    def decide(self, members: Sequence[Member], history: Mapping[str, Mapping[int, float]]) -> list[Decision]:
        """"stop" / "continue" rows ("done" for finished members), best first; history: child -> {t: score}."""
        def stop(m: Member) -> bool:
            if not self.is_rung(m.t):
                return False
            scores = {c: h[m.t] for c, h in history.items() if m.t in h}
            scores[m.id] = m.score  # type: ignore[assignment]
            order = sorted(sorted(scores), key=lambda c: -_signed(scores[c], self.mode))
            keep = max(1, len(order) // self.reduction_factor)
            return m.id not in order[:keep]
        return _stopper_rows(members, self.mode, stop)

    def to_dict(self) -> dict:
        """Plain parameters with ``"algo": "successive_halving"``."""
        return {"algo": "successive_halving", **attrs.asdict(self)}


Stopper = MedianStopping | SuccessiveHalving


def _check_stopper(_inst: Any, _attr: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, (MedianStopping, SuccessiveHalving)):
        raise ConfigError("stopper", f"expected MedianStopping, SuccessiveHalving or None, got {value!r}")


def _stopper_from_dict(data: Mapping | None) -> Stopper | None:
    if data is None:
        return None
    kinds = {"median_stopping": MedianStopping, "successive_halving": SuccessiveHalving}
    args = dict(data)
    cls = kinds.get(args.pop("algo", None))  # type: ignore[arg-type]
    if cls is None:
        raise ConfigError("stopper.algo", f"expected one of {sorted(kinds)}, got {data.get('algo')!r}")
    try:
        return cls(**args)
    except TypeError as exc:
        raise ConfigError("stopper", str(exc)) from None


class _Independent:
    """Shared by the searchers whose children never exchange weights: decisions come from the stopper only."""

    stopper: Stopper | None

    def decide(self, members: Sequence[Member], history: Mapping[str, Mapping[int, float]]) -> list[Decision]:
        """The stopper's rows, or "continue" ("done" when finished) for each member, by id, without one."""
        if self.stopper is not None:
            return self.stopper.decide(members, history)
        return [_row(m, "done" if m.done else "continue") for m in sorted(members, key=lambda m: m.id)]


@attrs.frozen
class RandomSearch(_Independent):
    """``num_samples`` children, each with values sampled from the space."""

    num_samples: int
    seed: int = 0
    stopper: Stopper | None = attrs.field(default=None, validator=_check_stopper)

    def __attrs_post_init__(self) -> None:
        _check_int("random_search.num_samples", self.num_samples, 1)
        _check_int("random_search.seed", self.seed, 0)

    def initial(self, space: SearchSpace, rng: np.random.Generator | None = None) -> list[dict]:
        """Each child's starting values, drawn child by child (``rng`` defaults to one seeded with ``seed``)."""
        rng = np.random.default_rng(self.seed) if rng is None else rng
        return [space.sample(rng) for _ in range(self.num_samples)]

    def to_dict(self) -> dict:
        """Plain parameters with ``"algo": "random"``."""
        return {"algo": "random", "num_samples": self.num_samples, "seed": self.seed,
                "stopper": self.stopper.to_dict() if self.stopper else None}


@attrs.frozen
class GridSearch(_Independent):
    """Every point of the space's :class:`~ptutils.spaces.Grid` entries, ``repeats`` times."""

    repeats: int = 1
    seed: int = 0
    stopper: Stopper | None = attrs.field(default=None, validator=_check_stopper)

    def __attrs_post_init__(self) -> None:
        _check_int("grid_search.repeats", self.repeats, 1)
        _check_int("grid_search.seed", self.seed, 0)

    def initial(self, space: SearchSpace, rng: np.random.Generator | None = None) -> list[dict]:
        """The whole grid once per repeat (as Ray's ``num_samples`` does); other paths sampled per child, sorted."""
        rng = np.random.default_rng(self.seed) if rng is None else rng
        others = SearchSpace({p: s for p, s in space.items() if not isinstance(s, Grid)})
        children = []
        for _ in range(self.repeats):
            for point in space.grid():
                children.append(dict(sorted({**point, **others.sample(rng)}.items())))
        return children

    def to_dict(self) -> dict:
        """Plain parameters with ``"algo": "grid"``."""
        return {"algo": "grid", "repeats": self.repeats, "seed": self.seed,
                "stopper": self.stopper.to_dict() if self.stopper else None}


def _as_mutations(value: Any) -> SearchSpace | None:
    return None if value is None else SearchSpace(value)


def _function_path(fn: Callable) -> str:
    """The ``module:qualname`` that imports ``fn`` back; ConfigError when there is none (a lambda, a local)."""
    path = f"{getattr(fn, '__module__', None)}:{getattr(fn, '__qualname__', '')}"
    try:
        if "<" not in path and import_object(path, "pbt.custom_explore_fn") is fn:
            return path
    except ConfigError:
        pass
    raise ConfigError("pbt.custom_explore_fn", f"{fn!r} cannot be stored with the session: use an importable "
                                               "module-level function, or give its import path 'module:function'")


@attrs.frozen(kw_only=True)
class PBT:
    """Population-based training (Jaderberg et al. 2017) with Ray Tune's parameters, defaults and algorithm.

    Deviations from Ray, each switchable: ``synch=True`` (rounds independent of
    arrival order), ``clip=True`` (Ray #5035), time is the step count; plus
    ``population_size`` and ``seed`` (every draw from one seeded generator).
    """

    metric: str
    mode: str
    perturbation_interval: int
    hyperparam_mutations: SearchSpace | None = attrs.field(default=None, converter=_as_mutations)
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    perturbation_factors: tuple = attrs.field(default=(1.2, 0.8), converter=tuple)
    burn_in_period: int = 0
    custom_explore_fn: Callable | str | None = None
    synch: bool = True
    clip: bool = True
    require_attrs: bool = True
    population_size: int = 4
    seed: int = 0
    _explore_fn: Callable | None = attrs.field(init=False, default=None, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        _check_mode("pbt", self.metric, self.mode)
        _check_int("pbt.perturbation_interval", self.perturbation_interval, 1)
        _check_int("pbt.burn_in_period", self.burn_in_period, 0)
        _check_int("pbt.population_size", self.population_size, 2)
        _check_int("pbt.seed", self.seed, 0)
        if not (_real(self.quantile_fraction) and 0 <= self.quantile_fraction <= 0.5):
            raise ConfigError("pbt.quantile_fraction", f"expected a number in [0, 0.5], got {self.quantile_fraction!r}")
        if not (_real(self.resample_probability) and 0 <= self.resample_probability <= 1):
            raise ConfigError("pbt.resample_probability",
                              f"expected a number in [0, 1], got {self.resample_probability!r}")
        if not self.perturbation_factors or not all(_real(f) and math.isfinite(f) and f > 0
                                                    for f in self.perturbation_factors):
            raise ConfigError("pbt.perturbation_factors",
                              f"expected positive numbers, got {self.perturbation_factors!r}")
        for name in ("synch", "clip", "require_attrs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"pbt.{name}", f"expected True or False, got {getattr(self, name)!r}")
        if not self.hyperparam_mutations and self.custom_explore_fn is None:
            raise ConfigError("pbt.hyperparam_mutations", "PBT needs hyperparam_mutations or custom_explore_fn "
                                                          "to explore with")
        fn = self.custom_explore_fn
        if isinstance(fn, str):
            fn = import_object(fn, "pbt.custom_explore_fn")
        if fn is not None and not callable(fn):
            raise ConfigError("pbt.custom_explore_fn", f"expected a function values -> values, got {fn!r}")
        object.__setattr__(self, "_explore_fn", fn)

    @property
    def mutations(self) -> SearchSpace:
        """``hyperparam_mutations``, empty when only ``custom_explore_fn`` explores."""
        return self.hyperparam_mutations or SearchSpace()

    def initial(self, space: SearchSpace | None, rng: np.random.Generator | None = None) -> list[dict]:
        """``population_size`` starting values: ``space`` sampled, mutated paths it lacks filled (as Ray does).

        Per child: ``space``'s paths in sorted order, then the missing mutated paths in sorted order.
        """
        rng = np.random.default_rng(self.seed) if rng is None else rng
        space = space or SearchSpace()
        fill = SearchSpace({p: s for p, s in self.mutations.items() if p not in space})
        return [dict(sorted({**space.sample(rng), **fill.sample(rng)}.items())) for _ in range(self.population_size)]

    def quantiles(self, members: Sequence[Member]) -> tuple[list[Member], list[Member]]:
        """(lower, upper), both worst first, as Ray's ``_quantiles``: ``n = ceil(N*q)``, at most ``floor(N/2)``.

        Only members not done and with a score count; N <= 1 gives ([], []).
        """
        ascending = _ranked(members, self.mode)[::-1]
        size = len(ascending)
        if size <= 1:
            return [], []
        n = math.ceil(round(size * self.quantile_fraction, 9))  # round: 10 * 0.3 is 3.0000000000000004
        if n > size / 2:
            n = size // 2
        return ascending[:n], ascending[size - n:]

    def explore(self, values: Mapping[str, Any], rng: np.random.Generator) -> tuple[dict, dict]:
        """(new values, ops): each mutated path perturbed in sorted order, then ``custom_explore_fn``, then clipped."""
        new, ops = dict(values), {}
        for path, space in self.mutations.items():
            if path not in new:
                raise ConfigError(path, "has no current value to perturb: give it an initial value")
            new[path], ops[path] = space.perturb(new[path], rng, self.perturbation_factors,
                                                 self.resample_probability, self.clip)
        if self._explore_fn is not None:
            before = dict(new)
            result = self._explore_fn(dict(new))
            if not isinstance(result, Mapping):
                raise ConfigError("pbt.custom_explore_fn", f"returned {result!r}, expected the new values as a dict")
            new = dict(result)
            for path in sorted(set(before) | set(new)):
                if path not in before or path not in new or not _same_value(before[path], new[path]):
                    ops[path] = "custom"
        if self.clip:
            for path, space in self.mutations.items():
                if path in new and not _same_value(clipped := space.clip(new[path]), new[path]):
                    new[path], ops[path] = clipped, f"{ops.get(path, 'custom')} (clipped)"
        return new, ops

    def due(self, t: int, last_perturbation_t: int) -> bool:
        """Whether a member at ``t`` is up for a decision (Ray's test: past burn-in, an interval since the last)."""
        return t >= self.burn_in_period and t - last_perturbation_t >= self.perturbation_interval

    def next_boundary(self, t: int) -> int:
        """The first decision time after ``t``: ``max(interval, burn_in_period)``, then every interval."""
        first = max(self.perturbation_interval, self.burn_in_period)
        if t < first:
            return first
        return first + ((t - first) // self.perturbation_interval + 1) * self.perturbation_interval

    def _unscored(self, m: Member) -> Decision:
        if self.require_attrs:
            raise SessionError(f"PBT: child {m.id!r} reported no {self.metric!r} at t={m.t} "
                               "(require_attrs=False skips such children)")
        return _row(m, "skip")

    def _exploit(self, m: Member, upper: list[Member], rng: np.random.Generator, rank: int) -> Decision:
        donor = upper[int(rng.integers(len(upper)))]
        new, ops = self.explore(donor.values, rng)
        return _row(m, "exploit", rank, "lower", donor, new, ops)

    def decide(self, members: Sequence[Member], rng: np.random.Generator) -> list[Decision]:
        """One synch round: lower quantile exploits a random upper member, the rest continue.

        Rows by rank (best first), then unranked members by id ("done", or
        "skip" for an unscored member when ``require_attrs`` is False).
        """
        unranked = sorted((m for m in members if m.done or m.score is None), key=lambda m: m.id)
        rest = [_row(m, "done") if m.done else self._unscored(m) for m in unranked]
        lower, upper = self.quantiles(members)
        labels = {m.id: "lower" for m in lower} | {m.id: "upper" for m in upper}
        rows = []
        for rank, m in enumerate(_ranked(members, self.mode), start=1):
            quantile = labels.get(m.id, "middle")
            rows.append(self._exploit(m, upper, rng, rank) if quantile == "lower"
                        else _row(m, "continue", rank, quantile))
        return rows + rest

    def decide_one(self, member: Member, members: Sequence[Member], rng: np.random.Generator) -> Decision:
        """Ray's asynchronous step: decide for ``member`` alone against the latest known ``members``.

        Call it when :meth:`due` holds for the member; ``members`` may or may
        not include it (its given state wins) and may hold unscored members.
        """
        if member.done:
            return _row(member, "done")
        if member.score is None:
            return self._unscored(member)
        known = [m for m in members if m.id != member.id] + [member]
        lower, upper = self.quantiles(known)
        rank = [m.id for m in _ranked(known, self.mode)].index(member.id) + 1
        if any(m.id == member.id for m in lower):
            return self._exploit(member, upper, rng, rank)
        quantile = "upper" if any(m.id == member.id for m in upper) else "middle"
        return _row(member, "continue", rank, quantile)

    def to_dict(self) -> dict:
        """Plain parameters with ``"algo": "pbt"``; a custom_explore_fn as its import path."""
        fn = self.custom_explore_fn
        data = {f.name: getattr(self, f.name) for f in attrs.fields(PBT) if f.init}
        data["hyperparam_mutations"] = None if self.hyperparam_mutations is None else self.hyperparam_mutations.to_dict()
        data["perturbation_factors"] = list(self.perturbation_factors)
        data["custom_explore_fn"] = fn if fn is None or isinstance(fn, str) else _function_path(fn)
        return {"algo": "pbt", **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PBT:
        """Rebuild from :meth:`to_dict`; unknown keys raise ConfigError."""
        args = {k: v for k, v in data.items() if k != "algo"}
        try:
            return cls(**args)
        except TypeError as exc:
            raise ConfigError("pbt", str(exc)) from None


def _same_value(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def searcher_from_dict(data: Mapping[str, Any]) -> RandomSearch | GridSearch | PBT:
    """Rebuild any searcher from its ``to_dict`` form (``"algo"`` says which)."""
    algo = data.get("algo") if isinstance(data, Mapping) else None
    if algo == "pbt":
        return PBT.from_dict(data)
    if algo in ("random", "grid"):
        args = {k: v for k, v in data.items() if k != "algo"}
        args["stopper"] = _stopper_from_dict(args.get("stopper"))
        try:
            return (RandomSearch if algo == "random" else GridSearch)(**args)
        except TypeError as exc:
            raise ConfigError(algo, str(exc)) from None
    raise ConfigError("algo", f"expected 'random', 'grid' or 'pbt', got {algo!r}")
