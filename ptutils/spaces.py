"""Search spaces over dotted Config paths (``"model.optimizer.lr"``): what a tuner samples and PBT perturbs.

A space is a small immutable value (``Uniform``, ``LogUniform``, ``IntUniform``,
``Choice``, ``Grid``) that samples from a ``numpy.random.Generator`` given by the
caller, perturbs a current value the way Ray Tune's PBT does, and round-trips
through a plain dict (``to_dict`` / :func:`space_from_dict`) so it can be stored
with the tuning session.  :class:`SearchSpace` maps paths to spaces.

Draw-order contract (a seeded run replays exactly): ``sample`` makes one draw
(``rng.uniform`` for the float spaces and log ints, ``rng.integers`` for the
others).  ``perturb`` always draws the resample coin first (one
``rng.random()``, even when ``resample_probability`` is 0); then either what
``sample`` draws (op ``"resample"``) or one ``rng.integers(len(factors))`` for
the factor (numeric spaces) or one ``rng.integers(2)`` for the direction
(categoricals: 0 is left, 1 is right).  ``SearchSpace.sample`` visits paths in
sorted order.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

DEFAULT_FACTORS: tuple[float, ...] = (1.2, 0.8)
"""Ray Tune's ``perturbation_factors``."""


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integral(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _message(exc: ConfigError) -> str:
    """The text of a ConfigError without its ``config field '...':`` prefix."""
    return str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)


def _check_perturb_args(factors: Sequence[float], resample_probability: float) -> None:
    if not factors or not all(_real(f) and math.isfinite(f) and f > 0 for f in factors):
        raise ConfigError("perturbation_factors", f"expected positive finite numbers, got {factors!r}")
    if not (_real(resample_probability) and 0 <= resample_probability <= 1):
        raise ConfigError("resample_probability", f"expected a number in [0, 1], got {resample_probability!r}")


class Space:
    """A set of values for one config field: sampled, perturbed, clipped and stored as a dict."""

    type_name: ClassVar[str] = ""

    def sample(self, rng: np.random.Generator) -> Any:
        """A value drawn from the space with ``rng``."""
        raise NotImplementedError

    def perturb(self, value: Any, rng: np.random.Generator, factors: Sequence[float] = DEFAULT_FACTORS,
                resample_probability: float = 0.25, clip: bool = True) -> tuple[Any, str]:
        """A neighbour of ``value`` and the op that made it (``"* 1.2"``, ``"shift left"``, ``"resample"``)."""
        raise NotImplementedError

    def clip(self, value: Any) -> Any:
        """``value`` brought into the space's bounds (a value it cannot place is returned as it is)."""
        raise NotImplementedError

    def contains(self, value: Any) -> bool:
        """Whether ``value`` belongs to the space."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """The plain-dict form that :func:`space_from_dict` rebuilds."""
        raise NotImplementedError

    def representatives(self) -> tuple[Any, ...]:
        """The values :meth:`SearchSpace.check` tries in a config: the bounds, or every choice."""
        raise NotImplementedError


@attrs.frozen
class _Range(Space):
    """A numeric interval [low, high]; perturbed by multiplying with a factor, as Ray does."""

    low: Any
    high: Any

    def __attrs_post_init__(self) -> None:
        kind = type(self).__name__
        ok = _integral if isinstance(self, IntUniform) else _real
        for name in ("low", "high"):
            value = getattr(self, name)
            if not ok(value) or not math.isfinite(value):
                want = "an integer" if ok is _integral else "a finite number"
                raise ConfigError("space", f"{kind} {name} must be {want}, got {value!r}")
        if not self.low < self.high:
            raise ConfigError("space", f"{kind} needs low < high, got low={self.low!r}, high={self.high!r}")

    def _cast(self, value: float) -> Any:
        return float(value)

    def perturb(self, value: Any, rng: np.random.Generator, factors: Sequence[float] = DEFAULT_FACTORS,
                resample_probability: float = 0.25, clip: bool = True) -> tuple[Any, str]:
        """Resample with ``resample_probability`` (or when ``value`` is no number), else ``value * factor``."""
        _check_perturb_args(factors, resample_probability)
        if rng.random() < resample_probability or not _real(value):
            return self.sample(rng), "resample"
        factor = factors[int(rng.integers(len(factors)))]
        new = self._cast(value * factor)
        op = f"* {factor}"
        if clip:
            clipped = self.clip(new)
            if clipped != new:
                new, op = clipped, f"{op} (clipped)"
        return new, op

    def clip(self, value: Any) -> Any:
        """``value`` clamped to [low, high], cast to the space's type; a non-number is returned unchanged."""
        if not _real(value):
            return value
        return self._cast(min(max(value, self.low), self.high))

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a number within [low, high]."""
        return _real(value) and self.low <= value <= self.high

    def representatives(self) -> tuple[Any, ...]:
        """Both bounds."""
        return (self._cast(self.low), self._cast(self.high))

    def to_dict(self) -> dict:
        """``{"type": ..., "low": ..., "high": ...}``."""
        return {"type": self.type_name, "low": self.low, "high": self.high}


@attrs.frozen
class Uniform(_Range):
    """Floats uniform in [low, high)."""

    type_name: ClassVar[str] = "uniform"

    def sample(self, rng: np.random.Generator) -> float:
        """One ``rng.uniform(low, high)``."""
        return float(rng.uniform(self.low, self.high))


@attrs.frozen
class LogUniform(_Range):
    """Floats whose logarithm is uniform (learning rates, weight decays); needs 0 < low."""

    type_name: ClassVar[str] = "log_uniform"

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.low <= 0:
            raise ConfigError("space", f"LogUniform needs 0 < low, got low={self.low!r}")

    def sample(self, rng: np.random.Generator) -> float:
        """``exp`` of one ``rng.uniform(log low, log high)``."""
        return min(float(math.exp(rng.uniform(math.log(self.low), math.log(self.high)))), float(self.high))


@attrs.frozen
class IntUniform(_Range):
    """Integers in [low, high], high included as in Optuna; ``log=True`` for log-uniform (needs 1 <= low)."""

    type_name: ClassVar[str] = "int_uniform"
    log: bool = False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not isinstance(self.log, bool):
            raise ConfigError("space", f"IntUniform log must be True or False, got {self.log!r}")
        if self.log and self.low < 1:
            raise ConfigError("space", f"IntUniform(log=True) needs 1 <= low, got low={self.low!r}")

    def _cast(self, value: float) -> int:
        return int(math.floor(value + 0.5))  # half up: Python's round() would send 2.5 to 2

    def sample(self, rng: np.random.Generator) -> int:
        """One ``rng.integers(low, high, endpoint=True)``; with ``log``, floor of ``exp(rng.uniform(log low, log(high+1)))``."""
        if self.log:
            return min(int(math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))), self.high)
        return int(rng.integers(self.low, self.high, endpoint=True))

    def to_dict(self) -> dict:
        """``{"type": "int_uniform", "low": ..., "high": ..., "log": ...}``."""
        return {**super().to_dict(), "log": self.log}


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps ``True`` apart from ``1``."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _as_tuple(values: Any) -> Any:
    return tuple(values) if isinstance(values, (list, tuple)) else values


@attrs.frozen
class _Categorical(Space):
    """An ordered list of JSON-plain values; PBT shifts to a neighbour, as Ray does with a list."""

    values: tuple = attrs.field(converter=_as_tuple)

    def __attrs_post_init__(self) -> None:
        kind = type(self).__name__
        if not isinstance(self.values, tuple) or not self.values:
            raise ConfigError("space", f"{kind} needs a non-empty list of values, got {self.values!r}")
        for i, value in enumerate(self.values):
            if not _plain(value):
                raise ConfigError("space", f"{kind} values must be JSON-plain, got {value!r} at [{i}]")
            if any(_same(value, other) for other in self.values[:i]):
                raise ConfigError("space", f"{kind} lists {value!r} twice")

    def index(self, value: Any) -> int | None:
        """The position of ``value`` in the list, None if absent."""
        return next((i for i, v in enumerate(self.values) if _same(v, value)), None)

    def sample(self, rng: np.random.Generator) -> Any:
        """``values[rng.integers(len(values))]``."""
        return self.values[int(rng.integers(len(self.values)))]

    def perturb(self, value: Any, rng: np.random.Generator, factors: Sequence[float] = DEFAULT_FACTORS,
                resample_probability: float = 0.25, clip: bool = True) -> tuple[Any, str]:
        """Resample with ``resample_probability`` (or when ``value`` is not listed), else shift one place, clamped."""
        _check_perturb_args(factors, resample_probability)
        old = self.index(value)
        if rng.random() < resample_probability or old is None:
            return self.sample(rng), "resample"
        shift = (-1, 1)[int(rng.integers(2))]
        new = min(max(old + shift, 0), len(self.values) - 1)
        op = f"shift {'left' if shift == -1 else 'right'}{' (noop)' if new == old else ''}"
        return self.values[new], op

    def clip(self, value: Any) -> Any:
        """``value`` unchanged: a list has no bounds to clamp to."""
        return value

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one of the listed values."""
        return self.index(value) is not None

    def representatives(self) -> tuple[Any, ...]:
        """Every listed value."""
        return self.values

    def to_dict(self) -> dict:
        """``{"type": ..., "values": [...]}``."""
        return {"type": self.type_name, "values": list(self.values)}


@attrs.frozen
class Choice(_Categorical):
    """One of an ordered list of values, sampled at random."""

    type_name: ClassVar[str] = "choice"


@attrs.frozen
class Grid(_Categorical):
    """A list enumerated by grid search (every value, in order); under PBT it behaves like :class:`Choice`."""

    type_name: ClassVar[str] = "grid"


SPACE_TYPES: dict[str, type[Space]] = {cls.type_name: cls for cls in (Uniform, LogUniform, IntUniform, Choice, Grid)}
"""The space classes by their ``to_dict`` type name."""


def space_from_dict(data: Mapping[str, Any], field: str = "space") -> Space:
    """Rebuild a space from its ``to_dict`` form; errors name ``field`` (a path when known)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("type"), str):
        raise ConfigError(field, f"expected a dict with a 'type' such as 'uniform', got {data!r}")
    kind = data["type"]
    if kind not in SPACE_TYPES:
        raise ConfigError(field, f"unknown space type {kind!r} (known: {', '.join(sorted(SPACE_TYPES))})")
    cls = SPACE_TYPES[kind]
    args = {k: v for k, v in data.items() if k != "type"}
    known = {a.name for a in attrs.fields(cls)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(field, f"{kind} space has no argument(s) {unknown} (known: {sorted(known)})")
    try:
        return cls(**args)
    except TypeError as exc:
        raise ConfigError(field, f"{kind} space: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(field, _message(exc)) from None


def _as_space(value: Any, path: str) -> Space:
    if isinstance(value, Space):
        return value
    try:
        if isinstance(value, (list, tuple)):
            return Choice(value)
        if isinstance(value, Mapping):
            return space_from_dict(value, path)
    except ConfigError as exc:
        raise ConfigError(path, _message(exc)) from None
    hint = " (a callable cannot be stored with the session)" if callable(value) else ""
    raise ConfigError(path, f"expected a Space (Uniform, LogUniform, IntUniform, Choice, Grid), a list (a Choice) "
                            f"or a {{'type': ...}} dict, got {value!r}{hint}")


def _flatten(spaces: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted paths from keys, recursing into nested dicts that are not space dicts (Ray's nested mutations)."""
    for key, value in spaces.items():
        path = f"{prefix}.{key}" if prefix and isinstance(key, str) else key
        if not isinstance(key, str) or not key or "" in key.replace("[", ".").replace("]", "").split("."):
            raise ConfigError(str(path), "a search-space key is a dotted config path such as 'model.optimizer.lr'")
        if isinstance(value, Mapping) and not isinstance(value.get("type"), str):
            if not value:
                raise ConfigError(path, "an empty table names no field to search")
            yield from _flatten(value, path)
        else:
            yield path, value


class SearchSpace(Mapping[str, Space]):
    """An immutable mapping of dotted config paths to spaces; a plain list stands for a :class:`Choice`.

    Nested dicts are read as dotted paths (``{"model": {"optimizer": {"lr": ...}}}``
    is ``"model.optimizer.lr"``), as Ray's nested ``hyperparam_mutations`` are.
    Iteration is in sorted path order, which fixes the order of draws.
    """

    __slots__ = ("_spaces",)

    def __init__(self, spaces: Mapping[str, Any] | None = None):
        if spaces is not None and not isinstance(spaces, Mapping):
            raise ConfigError("space", f"expected a mapping of config paths to spaces, got {spaces!r}")
        flat: dict[str, Space] = {}
        for path, value in _flatten(spaces or {}):
            if path in flat:
                raise ConfigError(path, "is given twice")
            flat[path] = _as_space(value, path)
        self._spaces = dict(sorted(flat.items()))

    def __getitem__(self, path: str) -> Space:
        return self._spaces[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._spaces)

    def __len__(self) -> int:
        return len(self._spaces)

    def __repr__(self) -> str:
        return f"SearchSpace({self._spaces!r})"

    def check(self, config: Config) -> None:
        """Check that every path names a field of ``config`` that accepts the space's bounds (or each choice).

        Raises ConfigError naming the path: a misspelt path fails here, before any child runs.
        """
        from .config import canonical_path

        seen: dict[str, str] = {}
        for path, space in self.items():
            try:
                field = canonical_path(config, path)
            except ConfigError as exc:
                raise ConfigError(path, _message(exc)) from None
            if field in seen:
                raise ConfigError(path, f"names the same field ({field}) as {seen[field]!r}")
            seen[field] = path
            for value in space.representatives():
                try:
                    config.with_overrides({path: value})
                except ConfigError as exc:
                    where = "" if exc.field == path else f" (at {exc.field})"
                    raise ConfigError(path, f"the config refuses {value!r}{where}: {_message(exc)}") from None

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """One value per path, drawn in sorted path order."""
        return {path: space.sample(rng) for path, space in self.items()}

    def grid(self) -> list[dict[str, Any]]:
        """The cartesian product of the :class:`Grid` entries only (last sorted path varies fastest).

        Other paths are left out: the caller samples them per point.  With no
        Grid entry the result is one empty point, ``[{}]``.
        """
        paths = [path for path, space in self.items() if isinstance(space, Grid)]
        axes = [self[path].values for path in paths]  # type: ignore[attr-defined]
        return [dict(zip(paths, point)) for point in itertools.product(*axes)]

    def check_values(self, values: Mapping[str, Any]) -> None:
        """Raise ConfigError naming the path of the first value (sorted order) outside its space.

        Paths the space does not hold are not checked (fixed values given alongside).
        """
        for path in sorted(values):
            if path in self and not self[path].contains(values[path]):
                raise ConfigError(path, f"{values[path]!r} lies outside its search space {self[path]!r}")

    def to_dict(self) -> dict[str, dict]:
        """``{path: space.to_dict()}`` in sorted path order."""
        return {path: space.to_dict() for path, space in self.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """Rebuild from :meth:`to_dict`; errors name the path."""
        return cls(data)
