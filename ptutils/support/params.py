"""TFUtils' ``parse_params`` for PyTorch: a params dict in any era's shape → one explicit :class:`Params`.

``normalize('train', **params)`` does what ``train_from_params(**params)`` did first in
TFUtils (spec §2, ``tfutils/helper.py:417-622``): it checks the top-level argument names
against the entry point's signature (an unknown one is a ``TypeError``, as splatting it
into TFUtils' function was), replaces falsy groups by their defaults, gives every group
one entry per model, fills in each group's defaults (§3) and applies the multi-model
exp_id rule.  The engine reads only the typed result.

On purpose, unlike TFUtils: a missing ``train_params.num_steps`` is a ``ConfigError``
(E3 raised NameError); bad values raise ``ConfigError`` naming ``group.key`` instead of
``AssertionError``; every model gets its own deep copy of a length-1 list (TFUtils shared
one copy among models 1..n-1); devices go on past ``/gpu:3`` (TFUtils' pool of four ran
out with IndexError); the caller's dicts are never modified.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import torch

from ..errors import ConfigError
from .groups import (
    MODEL_OWN_KEYS, TPU_MODEL_KEYS, LearningRateGroup, LoadGroup, LossGroup, ModelGroup, OptimizerGroup,
    SaveGroup, TrainGroup, ValidationSet, build_learning_rate, build_load, build_loss, build_optimizer,
    build_save, build_train, build_validation,
)

__all__ = ["Params", "check_arguments", "model_kwargs", "normalize"]

Mode = Literal["train", "test"]


def _train_from_params(save_params, model_params, train_params, loss_params=None,
                      learning_rate_params=None, optimizer_params=None, validation_params=None,
                      load_params=None, log_device_placement=False, dont_run=False, skip_check=False,
                      use_estimator=False, inter_op_parallelism_threads=None):
    """The union of TFUtils' three eras' ``train_from_params`` signatures (spec §1.1), for :func:`check_arguments`."""


def _test_from_params(load_params, model_params, validation_params, log_device_placement=False,
                     save_params=None, dont_run=False, skip_check=False, use_estimator=False,
                     inter_op_parallelism_threads=None):
    """The union of TFUtils' three eras' ``test_from_params`` signatures (spec §1.2), for :func:`check_arguments`."""


_SIGNATURES: dict[str, inspect.Signature] = {
    "train": inspect.signature(_train_from_params),
    "test": inspect.signature(_test_from_params),
}


def check_arguments(mode: Mode, params: Mapping[str, Any]) -> dict[str, Any]:
    """Bind a params dict to ``<mode>_from_params``' signature, defaults filled in; ``TypeError`` names a bad key."""
    if mode not in _SIGNATURES:
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    name = f"{mode}_from_params"
    signature = _SIGNATURES[mode]
    unknown = [k for k in params if k not in signature.parameters]
    if unknown:
        raise TypeError(f"{name}() got an unexpected keyword argument {unknown[0]!r}")
    try:
        bound = signature.bind(**params)
    except TypeError as error:
        raise TypeError(f"{name}(): {error}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


@attrs.frozen(kw_only=True)
class Params:
    """A normalised params dict: each group is a tuple with one entry per model (``num_models`` long).

    In test mode ``train``, ``loss``, ``learning_rate`` and ``optimizer`` are None.
    ``ignored`` lists, as ``"group.key: why"``, every key accepted but not acted on
    (TensorFlow-only keys, keys TFUtils itself ignored), for the engine to log.
    """

    mode: Mode
    num_models: int
    save: tuple[SaveGroup, ...]
    load: tuple[LoadGroup, ...]
    model: tuple[ModelGroup, ...]
    validation: tuple[dict[str, ValidationSet], ...]
    train: tuple[TrainGroup, ...] | None = None
    loss: tuple[LossGroup, ...] | None = None
    learning_rate: tuple[LearningRateGroup, ...] | None = None
    optimizer: tuple[OptimizerGroup, ...] | None = None
    dont_run: bool = False
    skip_check: bool = False
    log_device_placement: bool = False
    ignored: tuple[str, ...] = ()

    def as_tfutils(self, index: int = 0) -> dict[str, Any]:
        """Model ``index``'s parsed params in TFUtils' shape (what a record's ``params`` holds, before sonifying)."""
        out: dict[str, Any] = {
            "dont_run": self.dont_run,
            "skip_check": self.skip_check,
            "log_device_placement": self.log_device_placement,
            "save_params": self.save[index].to_dict(),
            "load_params": self.load[index].to_dict(),
            "model_params": self.model[index].to_dict(),
            "validation_params": {k: v.to_dict() for k, v in self.validation[index].items()},
        }
        if self.mode == "train":
            assert self.train and self.loss and self.learning_rate and self.optimizer
            out["train_params"] = self.train[index].to_dict()
            out["loss_params"] = self.loss[index].to_dict()
            out["learning_rate_params"] = self.learning_rate[index].to_dict()
            out["optimizer_params"] = self.optimizer[index].to_dict()
        return out


def model_kwargs(model: ModelGroup) -> dict[str, Any]:
    """The keyword arguments for ``model.func``: model_params without TFUtils' own keys."""
    return dict(model.kwargs)


_DEFAULT_GROUPS: dict[str, Callable[[], Any]] = {
    "save_params": dict,
    "load_params": dict,
    "model_params": dict,
    "validation_params": dict,
    "train_params": dict,
    "loss_params": dict,
    "learning_rate_params": dict,
    "optimizer_params": lambda: {"optimizer_class": torch.optim.SGD, "optimizer_kwargs": {"momentum": 0.9}},
}


def _per_model(name: str, value: Any, num_models: int) -> list[dict[str, Any]]:
    """TFUtils' list rule: falsy → default, non-list → one deep copy per model, length 1 → repeated."""
    if not value and not isinstance(value, bool):
        value = _DEFAULT_GROUPS[name]()
    items = value if isinstance(value, list) else [value]
    if len(items) == 1:
        items = items * num_models
    if len(items) != num_models:
        raise ConfigError(name, f"has {len(items)} entries but model_params has {num_models}; "
                                f"give one per model, or a single one for all")
    out = []
    for i, item in enumerate(items):
        item = item or {}
        if not isinstance(item, Mapping):
            raise ConfigError(name if len(items) == 1 else f"{name}[{i}]",
                              f"expected a dict, got {type(item).__name__}")
        try:
            out.append(copy.deepcopy(dict(item)))
        except Exception as error:
            raise ConfigError(name, f"cannot be deep-copied per model, as TFUtils does: {error}") from error
    return out


def _device(value: Any) -> str:
    """TFUtils' ``format_devices`` for one entry: ``3`` or ``'/gpu:3'`` or ``'gpu3'`` → ``'/gpu:3'``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"/gpu:{value}"
    if isinstance(value, str):
        found = re.search(r"/gpu:\d+$", value) or re.search(r"\d+", value)
        if found is not None:
            return found.group() if found.group().startswith("/gpu:") else f"/gpu:{found.group()}"
    raise ConfigError("model_params.devices", f"invalid device specification {value!r} (expected an int or '/gpu:N')")


def _build_model(raw: dict[str, Any], index: int, mode: Mode, free: list[int], ignored: list[str]) -> ModelGroup:
    """One model's model_params with §2.3 defaults; models without ``devices`` take the next free GPU in turn."""
    if not callable(raw.get("func")):
        raise ConfigError("model_params.func", f"a callable returning an nn.Module is required, got {raw.get('func')!r}")
    if raw.get("tpu_name"):
        raise ConfigError("model_params.tpu_name", "the TPU/estimator path of TFUtils is not supported")
    raw.pop("tpu_name", None)
    for key in TPU_MODEL_KEYS:
        if key in raw:
            raw.pop(key)
            ignored.append(f"model_params.{key}: TPU estimator only")
    if "devices" in raw:
        devices = raw["devices"] if isinstance(raw["devices"], list) else [raw["devices"]]
    else:
        devices = [free.pop(0)]
    formatted = tuple(sorted({_device(d) for d in devices}))
    num_gpus = raw.get("num_gpus", len(formatted))
    count = len(num_gpus) if isinstance(num_gpus, list) else num_gpus
    if count != len(formatted):
        raise ConfigError("model_params.num_gpus", f"{num_gpus!r} does not match the devices {list(formatted)}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("model_params.seed", f"expected an integer, got {seed!r}")
    return ModelGroup(
        func=raw["func"],
        seed=seed,
        prefix=str(raw.get("prefix", f"model_{index}")),
        train=bool(raw.get("train", mode == "train")),
        trainable_scopes=raw.get("trainable_scopes"),
        devices=formatted,
        num_gpus=num_gpus,
        kwargs={k: v for k, v in raw.items() if k not in MODEL_OWN_KEYS},
    )


def _suffix_exp_ids(group: str, groups: list[Any], models: list[ModelGroup]) -> list[Any]:
    """§2.5: one shared exp_id over several models gets ``_<prefix>`` appended; then exp_ids must differ."""
    ids = [g.exp_id for g in groups]
    if None in ids:
        return groups
    if len(set(ids)) == 1 and len(groups) > 1:
        groups = [attrs.evolve(g, exp_id=f"{g.exp_id}_{m.prefix}") for g, m in zip(groups, models)]
        ids = [g.exp_id for g in groups]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{group}.exp_id", f"each model needs its own exp_id, got {ids}")
    return groups


_BUILDERS: dict[str, Callable[[dict[str, Any], list[str]], Any]] = {
    "save_params": build_save,
    "load_params": build_load,
    "validation_params": build_validation,
    "train_params": build_train,
    "loss_params": build_loss,
    "learning_rate_params": build_learning_rate,
    "optimizer_params": build_optimizer,
}


def normalize(mode: Mode, **params: Any) -> Params:
    """Normalise the keyword arguments of TFUtils' ``train_from_params``/``test_from_params`` into :class:`Params`."""
    args = check_arguments(mode, params)
    ignored: list[str] = []
    if args["use_estimator"]:
        raise ConfigError("use_estimator", "the TPU/estimator path of TFUtils is not supported")
    if args["inter_op_parallelism_threads"] is not None:
        ignored.append("inter_op_parallelism_threads: a TensorFlow thread-pool size (E1/E2)")
    if args["log_device_placement"]:
        ignored.append("log_device_placement: TensorFlow device-placement logging")

    model_list = args["model_params"] if isinstance(args["model_params"], list) else [args["model_params"]]
    if not model_list:
        raise ConfigError("model_params", "an empty list names no model")
    num_models = len(model_list)
    raw_models = _per_model("model_params", model_list, num_models)
    free = list(range(sum("devices" not in m for m in raw_models)))
    models = [_build_model(raw, i, mode, free, ignored) for i, raw in enumerate(raw_models)]

    names = ["save_params", "load_params", "validation_params"]
    if mode == "train":
        names += ["train_params", "loss_params", "learning_rate_params", "optimizer_params"]
    built: dict[str, list[Any]] = {}
    for name in names:
        per_model: list[Any] = []
        for raw in _per_model(name, args[name], num_models):
            notes: list[str] = []
            per_model.append(_BUILDERS[name](raw, notes))
            ignored.extend(n for n in notes if n not in ignored)
        built[name] = per_model
    built["save_params"] = _suffix_exp_ids("save_params", built["save_params"], models)
    built["load_params"] = _suffix_exp_ids("load_params", built["load_params"], models)

    def tupled(name: str) -> tuple[Any, ...] | None:
        return tuple(built[name]) if name in built else None

    return Params(
        mode=mode,
        num_models=num_models,
        save=tuple(built["save_params"]),
        load=tuple(built["load_params"]),
        model=tuple(models),
        validation=tuple(built["validation_params"]),
        train=tupled("train_params"),
        loss=tupled("loss_params"),
        learning_rate=tupled("learning_rate_params"),
        optimizer=tupled("optimizer_params"),
        dont_run=bool(args["dont_run"]),
        skip_check=bool(args["skip_check"]),
        log_device_placement=bool(args["log_device_placement"]),
        ignored=tuple(dict.fromkeys(ignored)),
    )
