"""Config: the validated, serialisable description of an experiment (TFUtils' ``params``).

A :class:`Config` is built from a dict, a TOML file or Python objects.  It is
validated on construction: a wrong type or an unknown key raises
:class:`~ptutils.errors.ConfigError` naming the field path (``model.optimizer.lr``).
Models, criteria, optimizers, schedulers, data providers and updates are given
as *specs*: ``{"cls": "torch.optim.SGD", "lr": 0.1}`` (an import path plus
keyword arguments) or as ready Python objects.  ``to_dict()`` gives the plain
dict stored with the session; ``Config.from_dict(cfg.to_dict())`` rebuilds it.
``cfg.with_overrides({"model.optimizer.lr": 0.3})`` varies fields by dotted path
(``stages[0].max_epochs`` or ``stages.train.max_epochs`` for a stage), validated
as the config itself is: the one way to vary a field (``Session.from_config``
and the tuner use the same paths).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]


def import_object(path: str, field: str = "cls") -> Any:
    """Import ``package.module.Name`` or ``package.module:Name``; errors name ``field``."""
    if not isinstance(path, str) or not path:
        raise ConfigError(field, f"expected an import path such as 'torch.optim.SGD', got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(field, f"{path!r} is not a dotted import path")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as exc:
        raise ConfigError(field, f"cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(field, f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def build(spec: Any, field: str, *args: Any, **extra: Any) -> Any:
    """Instantiate a spec: a mapping with ``cls`` (+ kwargs) is imported and called.

    Anything else (a module, an optimizer factory, a provider object) is
    returned as is, so Python objects and specs mix freely.
    """
    if not isinstance(spec, Mapping):
        return spec
    if "cls" not in spec:
        raise ConfigError(field, f"a spec needs a 'cls' import path, got keys {sorted(spec)}")
    target = import_object(spec["cls"], f"{field}.cls")
    kwargs = {k: v for k, v in spec.items() if k != "cls"}
    check_kwargs(target, kwargs, field, skip=len(args), extra=extra)
    try:
        return target(*args, **kwargs, **extra)
    except ConfigError:
        raise
    except Exception as exc:  # a constructor refusing its arguments is a config problem; the cause is chained
        raise ConfigError(field, f"cannot build {spec['cls']}: {type(exc).__name__}: {exc}") from exc


def check_kwargs(target: Any, kwargs: Mapping[str, Any], field: str, *, skip: int = 0, extra: Mapping = {}) -> None:
    """Check spec kwargs against ``target``'s signature: unknown names and plain type mismatches.

    A parameter whose default is a number, bool or string must get a value of
    that kind, so ``{"cls": "torch.optim.SGD", "lr": "fast"}`` fails as
    ``optimizer.lr`` before anything is built.
    """
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return
    params = params[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        named = {p.name: p for p in params}
    else:
        named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for key in kwargs:
            if key not in named:
                raise ConfigError(f"{field}.{key}", f"unknown argument of {getattr(target, '__qualname__', target)}")
    for key, value in kwargs.items():
        param = named.get(key)
        if param is None or param.default is inspect.Parameter.empty or param.default is None:
            continue
        default = param.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise ConfigError(f"{field}.{key}", f"expected {type(default).__name__}, got {type(value).__name__} {value!r}")


Spec = Any
"""A ``{"cls": "import.path", **kwargs}`` mapping or a ready Python object."""


def _spec(field_path: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, _attr: attrs.Attribute, value: Any) -> None:
        if isinstance(value, Mapping):
            if "cls" not in value:
                raise ConfigError(field_path, f"a spec needs a 'cls' import path, got keys {sorted(value)}")
            if not isinstance(value["cls"], str):
                raise ConfigError(f"{field_path}.cls", f"expected an import path string, got {value['cls']!r}")

    return check


def _plain_data(value: Any, path: str) -> None:
    """Raise ConfigError unless ``value`` is JSON-like data a record can hold (no '$' keys)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("$"):
                raise ConfigError(path, f"keys must be strings not starting with '$', got {key!r}")
            _plain_data(item, f"{path}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _plain_data(item, f"{path}[{i}]")
        return
    raise ConfigError(path, f"expected plain data (dicts, lists, strings, numbers), got {type(value).__name__}")


def _plain(field_path: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, _attr: attrs.Attribute, value: Any) -> None:
        if callable(value) and not isinstance(value, Mapping):
            return
        try:
            _plain_data(value, field_path)
        except ConfigError as exc:
            raise ConfigError(field_path, str(exc).split(": ", 1)[1]) from None

    return check


def _typed(field_path: str, *types: type, optional: bool = False, positive: bool = False):
    names = " or ".join(t.__name__ for t in types) + (" or None" if optional else "")

    def check(_inst: Any, _attr: attrs.Attribute, value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) and bool not in types:
            raise ConfigError(field_path, f"expected {names}, got {value!r}")
        if not isinstance(value, types):
            raise ConfigError(field_path, f"expected {names}, got {type(value).__name__} {value!r}")
        if positive and isinstance(value, (int, float)) and not (value > 0 and math.isfinite(value)):
            raise ConfigError(field_path, f"must be a positive number, got {value!r}")

    return check


@attrs.define(kw_only=True)
class ModelConfig:
    """What to train: the module, its loss, optimizer and optional LR scheduler."""

    module: Spec = attrs.field(validator=_spec("model.module"))

    @module.validator
    def _check_module(self, _attr: attrs.Attribute, value: Any) -> None:
        import torch

        if not isinstance(value, (Mapping, torch.nn.Module)):
            raise ConfigError("model.module", f"expected a spec or a torch.nn.Module, got {value!r}")
    criterion: Spec = attrs.field(default=None, validator=_spec("model.criterion"))
    optimizer: Spec = attrs.field(default=None, validator=_spec("model.optimizer"))
    scheduler: Spec = attrs.field(default=None, validator=_spec("model.scheduler"))
    device: str | None = attrs.field(default=None, validator=_typed("model.device", str, optional=True))

    @device.validator
    def _check_device(self, _attr: attrs.Attribute, value: Any) -> None:
        import torch

        if value is not None:
            try:
                torch.device(value)
            except RuntimeError as exc:
                raise ConfigError("model.device", f"not a device: {exc}") from None
    grad_clip: float | None = attrs.field(
        default=None, validator=_typed("model.grad_clip", int, float, optional=True, positive=True)
    )
    scheduler_interval: str = attrs.field(default="epoch", validator=_typed("model.scheduler_interval", str))
    scheduler_metric: str | None = attrs.field(
        default=None, validator=_typed("model.scheduler_metric", str, optional=True)
    )
    metrics: dict[str, Any] = attrs.field(factory=dict)
    """Metric name -> an import path (``"ptutils.model.accuracy"``), a spec or a callable ``(outputs, targets)``."""

    @metrics.validator
    def _check_metrics(self, _attr: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, Mapping):
            raise ConfigError("model.metrics", f"expected a table of name -> metric, got {type(value).__name__}")
        for name, metric in value.items():
            field = f"model.metrics.{name}"
            if not isinstance(name, str) or not name:
                raise ConfigError("model.metrics", f"metric names are non-empty strings, got {name!r}")
            if isinstance(metric, Mapping):
                _spec(field)(None, _attr, metric)
            elif not (isinstance(metric, str) or callable(metric)):
                raise ConfigError(field, f"expected an import path such as 'ptutils.model.accuracy', a spec or a "
                                         f"callable, got {metric!r}")


@attrs.define(kw_only=True)
class StageConfig:
    """One stage of the run: its data request, train or eval mode, and budget."""

    name: str = attrs.field(validator=_typed("stages[].name", str))
    data: Any = attrs.field(default=None, validator=_plain("stages[].data"))

    @name.validator
    def _check_name(self, _attr: attrs.Attribute, value: Any) -> None:
        if not value or "/" in value:
            raise ConfigError("stages[].name", f"a stage name is a non-empty string without '/', got {value!r}")
    mode: str = attrs.field(default="train")
    max_epochs: int | None = attrs.field(
        default=None, validator=_typed("stages[].max_epochs", int, optional=True, positive=True)
    )
    max_steps: int | None = attrs.field(
        default=None, validator=_typed("stages[].max_steps", int, optional=True, positive=True)
    )
    setup: Any = None

    @mode.validator
    def _check_mode(self, _attr: attrs.Attribute, value: Any) -> None:
        if value not in ("train", "eval"):
            raise ConfigError("stages[].mode", f"expected 'train' or 'eval', got {value!r}")


@attrs.define(kw_only=True)
class CheckpointConfig:
    """When to checkpoint, how many to keep, and optionally where (a separate DB URL)."""

    every_steps: int | None = attrs.field(
        default=None, validator=_typed("checkpoint.every_steps", int, optional=True, positive=True)
    )
    every_epochs: int | None = attrs.field(
        default=1, validator=_typed("checkpoint.every_epochs", int, optional=True, positive=True)
    )
    keep: int = attrs.field(default=3, validator=_typed("checkpoint.keep", int, positive=True))
    keep_best: str | None = attrs.field(default=None, validator=_typed("checkpoint.keep_best", str, optional=True))
    """A metric (e.g. ``val_loss``) whose best checkpoint is kept beside the last ``keep``."""
    best_mode: str = attrs.field(default="min", validator=_typed("checkpoint.best_mode", str))
    """``"min"`` (the lowest ``keep_best`` value is best) or ``"max"``."""

    @best_mode.validator
    def _check_best_mode(self, _attr: attrs.Attribute, value: str) -> None:
        if value not in ("min", "max"):
            raise ConfigError("checkpoint.best_mode", f"expected 'min' or 'max', got {value!r}")
    db: str | None = attrs.field(default=None, validator=_typed("checkpoint.db", str, optional=True))


@attrs.define(kw_only=True)
class Config:
    """A whole experiment: everything :meth:`ptutils.session.Session.from_config` needs."""

    name: str = attrs.field(default="session", validator=_typed("name", str))
    seed: int = attrs.field(default=0, validator=_typed("seed", int))
    db: str | None = attrs.field(default=None, validator=_typed("db", str, optional=True))
    """None: the filesystem database ./ptutils-runs of the current directory."""
    model: ModelConfig = attrs.field()
    data: Spec = attrs.field(default=None, validator=_spec("data"))
    stages: list[StageConfig] = attrs.field(factory=list)
    transitions: list[dict] = attrs.field(factory=list)
    updates: list[Spec] = attrs.field(factory=list)
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)
    status_interval: float = attrs.field(default=2.0, validator=_typed("status_interval", int, float, positive=True))
    metadata: dict = attrs.field(factory=dict, validator=[_typed("metadata", dict), _plain("metadata")])

    @seed.validator
    def _check_seed(self, _attr: attrs.Attribute, value: Any) -> None:
        if not 0 <= value < 2**63:
            raise ConfigError("seed", f"expected 0 <= seed < 2**63, got {value}")

    @updates.validator
    def _check_updates(self, _attr: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, list):
            raise ConfigError("updates", f"expected a list, got {type(value).__name__}")
        for i, spec in enumerate(value):
            if not (isinstance(spec, Mapping) or callable(spec)):
                raise ConfigError(f"updates[{i}]", f"expected a spec or a callable, got {spec!r}")
            _spec(f"updates[{i}]")(None, _attr, spec)

    @model.validator
    def _check_model(self, _attr: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, ModelConfig):
            raise ConfigError("model", f"expected a ModelConfig or a mapping, got {type(value).__name__}")

    @stages.validator
    def _check_stages(self, _attr: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, list):
            raise ConfigError("stages", f"expected a list, got {type(value).__name__}")
        names = [s.name for s in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError("stages", f"duplicate stage names {dupes}")

    @transitions.validator
    def _check_transitions(self, _attr: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, list):
            raise ConfigError("transitions", f"expected a list, got {type(value).__name__}")
        for i, t in enumerate(value):
            if not isinstance(t, Mapping):
                raise ConfigError(f"transitions[{i}]", f"expected a mapping, got {type(t).__name__}")
            for key in ("trigger", "source", "dest"):
                if key not in t:
                    raise ConfigError(f"transitions[{i}].{key}", "is required")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build and validate a Config from plain data; errors name the field path."""
        return _structure(cls, data, "")

    @classmethod
    def from_toml(cls, path: str | Path) -> Config:
        """Load a Config from a TOML file (same layout as :meth:`to_dict`)."""
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("<file>", f"{path}: invalid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError("<file>", f"cannot read {path}: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        """A plain, JSON-friendly dict; Python objects are recorded by type and repr."""
        return _unstructure(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A new Config with fields set by dotted path (``{"model.optimizer.lr": 0.3}``), validated.

        A path may go into a spec (``model.optimizer.lr``) and into a stage by
        index or name (``stages[0].max_epochs``, ``stages.train.max_epochs``).  A
        path that names nothing, or a value the field refuses, raises
        ConfigError naming the path.  Python objects in the config are kept.
        """
        data = _tree(self)
        for key, value in overrides.items():
            parts = _override_parts(data, key)
            parent = data
            for depth, part in enumerate(parts[:-1]):
                child = parent.get(part) if isinstance(parent, Mapping) else parent[part]
                if child is None:
                    raise ConfigError(key, f"{_join(parts[:depth + 1])} is not set: override it whole, e.g. "
                                           f"{{{_join(parts[:depth + 1])!r}: {{'cls': ..., ...}}}}")
                parent = child
            parent[parts[-1]] = value
        try:
            config = Config.from_dict(data)
            for key in overrides:
                _check_spec_argument(data, _override_parts(data, key))
        except ConfigError as exc:
            named = [k for k in overrides if _within(exc.field, canonical_path(self, k))]
            if named and named[0] != exc.field:
                raise ConfigError(exc.field, f"{str(exc).split(': ', 1)[1]} (from overrides[{named[0]!r}])") from None
            raise
        return config

    @property
    def rebuildable(self) -> bool:
        """Whether every part is a spec or plain value (so the dict fully rebuilds the run)."""
        return not object_paths(self.to_dict())


def canonical_path(config: Config, key: str) -> str:
    """The path ``key`` names in ``config`` as errors and differences spell it (``stages[0].max_epochs``)."""
    return _join(_override_parts(_tree(config), key))


def paths_named(config: Config, name: str) -> list[str]:
    """Every dotted path of ``config`` whose last part is ``name`` (``lr`` -> ``model.optimizer.lr``)."""
    found: list[str] = []

    def walk(value: Any, parts: list[str | int]) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if key == name:
                    found.append(_join([*parts, key]))
                walk(item, [*parts, key])
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, [*parts, i])

    walk(_tree(config), [])
    return found


def _join(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _within(field: str, path: str) -> bool:
    return field == path or field.startswith((path + ".", path + "["))


def _override_parts(data: dict, key: Any) -> list[str | int]:
    """The keys and list indexes an override path walks through ``data``; ConfigError when it names nothing."""
    if not isinstance(key, str) or not key:
        raise ConfigError(str(key), "an override is a dotted path such as 'model.optimizer.lr'")
    raw = key.replace("[", ".").replace("]", "").split(".")
    if "" in raw:
        raise ConfigError(key, "not a dotted path such as 'model.optimizer.lr' or 'stages[0].max_epochs'")
    parts: list[str | int] = []
    value: Any = data
    for i, part in enumerate(raw):
        here = _join(parts) or "the config"
        if isinstance(value, list):
            index = _list_index(value, part, here, key)
            parts.append(index)
            value = value[index]
        elif isinstance(value, Mapping):
            if part not in value and _fixed_table(parts):
                known = ", ".join(sorted(value))
                raise ConfigError(key, f"{here} has no field {part!r} (known: {known})")
            parts.append(part)
            value = value.get(part)
        elif value is None and i < len(raw):
            return parts + raw[i:]  # reported by with_overrides, which names the unset part
        else:
            raise ConfigError(key, f"{here} is {type(value).__name__} {value!r}, not a table: nothing inside it to set")
    return parts


_SPEC_LEADING_ARGS = {"model.optimizer": 1, "model.scheduler": 1}
"""Positional arguments a spec's class gets before its keyword arguments (the parameters, the optimizer)."""


def _check_spec_argument(data: dict, parts: list[str | int]) -> None:
    """Check an override of a spec's keyword argument against the spec's signature, as building it would."""
    if len(parts) < 2 or parts[-1] == "cls":
        return
    spec: Any = data
    for part in parts[:-1]:
        spec = spec[part]
    if isinstance(spec, Mapping) and isinstance(spec.get("cls"), str):
        where = _join(parts[:-1])
        target = import_object(spec["cls"], f"{where}.cls")
        argument = {parts[-1]: spec[parts[-1]]}
        check_kwargs(target, argument, where, skip=_SPEC_LEADING_ARGS.get(where, 0))


def _fixed_table(parts: list[str | int]) -> bool:
    """Whether the table at ``parts`` has fixed fields (the config, its model, checkpoint, a stage), not a spec's."""
    return parts in ([], ["model"], ["checkpoint"]) or (len(parts) == 2 and parts[0] == "stages")


def _list_index(items: list, part: str, where: str, key: str) -> int:
    if part.isdigit():
        if int(part) >= len(items):
            raise ConfigError(key, f"{where} has {len(items)} entries, no [{part}]")
        return int(part)
    names = [item.get("name") for item in items if isinstance(item, Mapping)]
    if part in names:
        return names.index(part)
    raise ConfigError(key, f"{where} has no entry named {part!r} (names: {', '.join(map(str, names))})")


def _tree(value: Any) -> Any:
    """The config as nested dicts and lists (copies), Python objects kept as they are."""
    if isinstance(value, (Config, ModelConfig, StageConfig, CheckpointConfig)):
        return {f.name: _tree(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, Mapping):
        return {k: _tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tree(v) for v in value]
    return value


_NESTED: dict[tuple[type, str], type] = {
    (Config, "model"): ModelConfig,
    (Config, "checkpoint"): CheckpointConfig,
}


def _structure(cls: type, data: Any, prefix: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in attrs.fields(cls)}
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(prefix or "<root>", f"keys must be strings, got {key!r}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        path = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(path, f"unknown key (known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        nested = _NESTED.get((cls, name))
        if nested is not None:
            value = _structure(nested, value, path)
        elif cls is Config and name == "stages":
            if not isinstance(value, list):
                raise ConfigError(path, f"expected a list, got {type(value).__name__}")
            value = [_structure(StageConfig, s, f"{path}[{i}]") for i, s in enumerate(value)]
        kwargs[name] = value
    missing = [f.name for f in fields.values() if f.default is attrs.NOTHING and f.name not in kwargs]
    if missing:
        path = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(path, "is required")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not exc.field.startswith(prefix):
            field = exc.field.replace("stages[]", prefix) if exc.field.startswith("stages[]") else exc.field
            raise ConfigError(field, str(exc).split(": ", 1)[1]) from None
        raise


def _unstructure(value: Any) -> Any:
    if attrs.has(type(value)):
        return {f.name: _unstructure(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, Mapping):
        return {str(k): _unstructure(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unstructure(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    kind = value if isinstance(value, type) else type(value)
    return {"object": f"{kind.__module__}.{kind.__qualname__}", "repr": repr(value)[:200]}


def object_paths(value: Any, path: str = "") -> list[str]:
    """The dotted paths of a config dict where ``to_dict`` recorded a Python object (which it cannot rebuild)."""
    if isinstance(value, Mapping):
        if "object" in value and "repr" in value:
            return [path]
        return [p for k, v in value.items() for p in object_paths(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in object_paths(v, f"{path}[{i}]")]
    return []
