"""The normalised parameter groups: one typed, frozen class per TFUtils params group, with its keys and defaults.

Each ``build_*`` function takes one model's raw group dict (already defaulted by
``normalize`` when falsy, and a private deep copy) and returns the group with
TFUtils' per-key defaults (``tfutils/defaults.py``, ``DBInterface.__init__``) filled in.
Keys that only meant something to TensorFlow, and keys TFUtils itself ignores, are
kept out of the typed fields and reported through ``ignored`` ("group.key: why").
``to_dict()`` gives the group back in TFUtils' shape, as a record's ``params`` holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from ..errors import ConfigError
from .aggregation import append_and_return, identity_func
from .defaults import ClipOptimizer, cross_entropy_per_case, exponential_decay, get_loss_dict, mean_loss

__all__ = [
    "FuncSpec", "LearningRateGroup", "LoadGroup", "LossGroup", "ModelGroup", "OptimizerGroup", "SaveGroup",
    "TrainGroup", "ValidationSet", "build_learning_rate", "build_load", "build_loss", "build_optimizer",
    "build_save", "build_train", "build_validation",
]

Ignored = list[str]

LOCATION_KEYS = ("host", "port", "dbname", "collname", "exp_id")
TPU_MODEL_KEYS = ("gcp_project", "tpu_zone", "num_shards", "iterations_per_loop")
MODEL_OWN_KEYS = ("func", "seed", "prefix", "devices", "num_gpus", "train", "trainable_scopes")


@attrs.frozen(kw_only=True)
class FuncSpec:
    """A TFUtils ``{'func': f, **kwargs}`` dict (data_params, targets, train_loop, valid_loop), split in two."""

    func: Callable[..., Any]
    kwargs: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The TFUtils shape ``{'func': f, **kwargs}``."""
        return {"func": self.func, **self.kwargs}


def _spec(field: str, value: Any) -> FuncSpec:
    if not isinstance(value, Mapping):
        raise ConfigError(field, f"expected a dict with a 'func' key, got {type(value).__name__}")
    if not callable(value.get("func")):
        raise ConfigError(f"{field}.func", f"a callable is required, got {value.get('func')!r}")
    return FuncSpec(func=value["func"], kwargs={k: v for k, v in value.items() if k != "func"})


def _freq(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, f"expected a positive whole number of steps, got {value!r}")
    return value


def _unknown(group: str, raw: Mapping[str, Any], known: set[str], ignored: Ignored, why: str) -> dict[str, Any]:
    extra = {k: v for k, v in raw.items() if k not in known}
    ignored.extend(f"{group}.{k}: {why}" for k in extra)
    return extra


# save_params --------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SaveGroup:
    """Where and when a model's records and checkpoints are written (TFUtils' ``save_params``, §3 defaults).

    A location key left out (None) falls back to load_params' value at run time (§5.1).
    ``db`` is ptutils' own: a backend URL for stores other than MongoDB.
    """

    host: str | None = None
    port: int | None = None
    dbname: str | None = None
    collname: str | None = None
    exp_id: str | None = None
    db: str | None = None
    do_save: bool = True
    save_metrics_freq: int = 100
    save_valid_freq: int = 3000
    save_filters_freq: int = 30000
    cache_filters_freq: int = 3000
    cache_max_num: int = 6
    save_initial_filters: bool = True
    save_to_gfs: tuple[str, ...] = ()
    cache_dir: str | None = None
    save_intermediate_freq: int | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The group as TFUtils' ``save_params`` dict (unset location keys left out)."""
        return _as_dict(self, omit_none=LOCATION_KEYS + ("db",))


_SAVE_FREQS = ("save_metrics_freq", "save_valid_freq", "save_filters_freq", "cache_filters_freq")


def build_save(raw: Mapping[str, Any], ignored: Ignored) -> SaveGroup:
    """One model's save_params with TFUtils' defaults; frequencies must be positive integers."""
    known = {a.name for a in attrs.fields(SaveGroup)} - {"extra"}
    fields: dict[str, Any] = {k: raw[k] for k in known if k in raw}
    for key in _SAVE_FREQS:
        if key in fields:
            fields[key] = _freq(f"save_params.{key}", fields[key])
    if "cache_max_num" in fields:
        keep = fields["cache_max_num"]
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ConfigError("save_params.cache_max_num", f"expected a number of checkpoints >= 0, got {keep!r}")
    if fields.get("save_intermediate_freq") is not None:
        fields["save_intermediate_freq"] = _freq("save_params.save_intermediate_freq", fields["save_intermediate_freq"])
    if "save_to_gfs" in fields:
        gfs = fields["save_to_gfs"] or ()
        if isinstance(gfs, str) or not all(isinstance(k, str) for k in gfs):
            raise ConfigError("save_params.save_to_gfs", f"expected a list of result keys, got {gfs!r}")
        fields["save_to_gfs"] = tuple(gfs)
    for key in ("do_save", "save_initial_filters"):
        if key in fields:
            fields[key] = bool(fields[key])
    rest = {k: v for k, v in raw.items() if k not in known}
    if "checkpoint_max" in rest:
        ignored.append("save_params.checkpoint_max: TPU estimator only")
        rest.pop("checkpoint_max")
    extra = _unknown("save_params", rest, set(), ignored, "not a TFUtils key; TFUtils ignores it")
    return SaveGroup(**fields, extra=extra)


# load_params --------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LoadGroup:
    """Where a model's weights come from (TFUtils' ``load_params``); ``query`` is a MongoDB filter, ``from_ckpt`` a file."""

    host: str | None = None
    port: int | None = None
    dbname: str | None = None
    collname: str | None = None
    exp_id: str | None = None
    db: str | None = None
    do_restore: bool = True
    query: dict[str, Any] | None = None
    from_ckpt: str | None = None
    to_restore: list[str] | str | None = None
    load_param_dict: dict[str, str] | None = None
    restore_global_step: bool = True
    cache_dir: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The group as TFUtils' ``load_params`` dict (unset location keys left out)."""
        return _as_dict(self, omit_none=LOCATION_KEYS + ("db",))


def build_load(raw: Mapping[str, Any], ignored: Ignored) -> LoadGroup:
    """One model's load_params with TFUtils' defaults; ``load_query`` is ignored, as TFUtils ignores it."""
    known = {a.name for a in attrs.fields(LoadGroup)} - {"extra"}
    fields: dict[str, Any] = {k: raw[k] for k in known if k in raw}
    if fields.get("query") is not None and not isinstance(fields["query"], Mapping):
        raise ConfigError("load_params.query", f"expected a MongoDB filter dict or None, got {fields['query']!r}")
    for key in ("do_restore", "restore_global_step"):
        if key in fields:
            fields[key] = bool(fields[key])
    rest = {k: v for k, v in raw.items() if k not in known}
    if "load_query" in rest:
        rest.pop("load_query")
        ignored.append("load_params.load_query: not a TFUtils key (TFUtils reads 'query'); ignored as TFUtils ignores it")
    extra = _unknown("load_params", rest, set(), ignored, "not a TFUtils key; TFUtils ignores it")
    return LoadGroup(**fields, extra=extra)


# model_params -------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ModelGroup:
    """One model: ``func(**kwargs)`` builds it; the rest are TFUtils' own keys (§2.3 defaults)."""

    func: Callable[..., Any]
    seed: int = 0
    prefix: str
    train: bool
    trainable_scopes: Any = None
    devices: tuple[str, ...]
    num_gpus: int | list[int]
    kwargs: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The group as TFUtils' ``model_params`` dict (user kwargs flattened back in)."""
        out = {k: getattr(self, k) for k in MODEL_OWN_KEYS}
        out["devices"] = list(self.devices)
        return {**self.kwargs, **out}


# train_params -------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TrainGroup:
    """How a model trains (TFUtils' ``train_params``).

    ``num_steps`` is a step count or ``float('inf')``; with ``minibatch_size`` given,
    ``data_params.kwargs['batch_size']`` already holds the minibatch size and
    ``num_minibatches`` minibatches make one step, as TFUtils rewrites them.
    """

    data_params: FuncSpec
    num_steps: int | float
    thres_loss: float = 100
    validate_first: bool = True
    targets: FuncSpec | None = None
    train_loop: FuncSpec | None = None
    minibatch_size: int | None = None
    num_minibatches: int = 1
    extra: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The group as TFUtils' ``train_params`` dict."""
        out = _as_dict(self)
        for key in ("data_params", "targets", "train_loop"):
            if out[key] is not None:
                out[key] = out[key].to_dict()
        return out


_TRAIN_TF_ONLY = {
    "queue_params": "TensorFlow input queues (E1/E2); the data func's loader replaces them",
    "include_global_step": "TensorFlow graph detail of MinibatchOptimizer",
    "hooks": "TPU estimator only",
    "tpu_validate_first": "TPU estimator only",
}


def build_train(raw: Mapping[str, Any], ignored: Ignored) -> TrainGroup:
    """One model's train_params with TFUtils' defaults; ``num_steps`` and ``data_params.func`` are required."""
    if raw.get("num_steps") is None:
        raise ConfigError(
            "train_params.num_steps",
            "required: a number of steps, or float('inf') to run until stopped "
            "(TFUtils E3 raised NameError here and E1/E2 cancelled training at once)")
    num_steps = raw["num_steps"]
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, float)) or num_steps < 0 or num_steps != num_steps:
        raise ConfigError("train_params.num_steps", f"expected a number of steps >= 0, got {num_steps!r}")
    data = _spec("train_params.data_params", raw.get("data_params"))
    fields: dict[str, Any] = {"data_params": data, "num_steps": num_steps}
    if "thres_loss" in raw:
        fields["thres_loss"] = raw["thres_loss"]
    if "validate_first" in raw:
        fields["validate_first"] = bool(raw["validate_first"])
    for key in ("targets", "train_loop"):
        if raw.get(key):
            fields[key] = _spec(f"train_params.{key}", raw[key])
    batch_size = data.kwargs.get("batch_size")
    if "minibatch_size" in raw:
        fields.update(_minibatches(raw["minibatch_size"], batch_size))
        fields["data_params"] = FuncSpec(func=data.func, kwargs={**data.kwargs, "batch_size": fields["minibatch_size"]})
    else:
        fields["minibatch_size"] = batch_size
    known = {"data_params", "num_steps", "thres_loss", "validate_first", "targets", "train_loop", "minibatch_size"}
    rest = {k: v for k, v in raw.items() if k not in known}
    for key, why in _TRAIN_TF_ONLY.items():
        if key in rest:
            value = rest.pop(key)
            if value:
                ignored.append(f"train_params.{key}: {why}")
    extra = _unknown("train_params", rest, set(), ignored, "not a TFUtils key; TFUtils ignores it")
    return TrainGroup(**fields, extra=extra)


def _minibatches(minibatch_size: Any, batch_size: Any) -> dict[str, int]:
    """TFUtils' minibatching: ``round(batch_size / minibatch_size)`` minibatches of equal size."""
    field = "train_params.minibatch_size"
    if isinstance(minibatch_size, bool) or not isinstance(minibatch_size, int) or minibatch_size < 1:
        raise ConfigError(field, f"expected a positive integer, got {minibatch_size!r}")
    if not isinstance(batch_size, int):
        raise ConfigError("train_params.data_params.batch_size", "required (an integer) when minibatch_size is given")
    if minibatch_size > batch_size:
        raise ConfigError(field, f"{minibatch_size} is larger than the batch size {batch_size}")
    count = round(batch_size / minibatch_size)
    if batch_size % count:
        raise ConfigError(field, f"batch size {batch_size} cannot be split into {count} equal minibatches "
                                 f"(TFUtils would have used a fractional size {batch_size / count})")
    return {"minibatch_size": batch_size // count, "num_minibatches": count}


# loss_params --------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LossGroup:
    """How a batch's loss is computed (TFUtils' ``loss_params``; see :func:`ptutils.support.losses.compute_loss`).

    The deprecated aliases are resolved: ``targets`` → ``pred_targets``, ``loss_per_case_func`` → ``loss_func``.
    ``loss_per_case_func_params`` (E1's named-argument mapping) is None unless given.
    """

    pred_targets: tuple[str, ...] = ("labels",)
    loss_func: Callable[..., Any] = cross_entropy_per_case
    agg_func: Callable[..., Any] | None = mean_loss
    loss_func_kwargs: dict[str, Any] = attrs.field(factory=dict)
    agg_func_kwargs: dict[str, Any] = attrs.field(factory=dict)
    labels_to_dict: bool = False
    inputs_as_dict: bool = False
    loss_per_case_func_params: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The group as TFUtils' E3 ``loss_params`` dict."""
        out = _as_dict(self)
        out["pred_targets"] = list(self.pred_targets)
        if out["loss_per_case_func_params"] is None:
            del out["loss_per_case_func_params"]
        return out


def build_loss(raw: Mapping[str, Any], ignored: Ignored) -> LossGroup:
    """One model's loss_params; the old names win over the new ones when both are given, as in TFUtils."""
    fields: dict[str, Any] = {}
    rest = dict(raw)
    targets = rest.pop("targets", None)
    per_case = rest.pop("loss_per_case_func", None)
    if targets is not None:
        if "pred_targets" in rest:
            ignored.append("loss_params.pred_targets: overridden by the deprecated alias 'targets', as in TFUtils")
        rest["pred_targets"] = targets
    if per_case:
        if "loss_func" in rest:
            ignored.append("loss_params.loss_func: overridden by the deprecated alias 'loss_per_case_func', as in TFUtils")
        rest["loss_func"] = per_case
    if "pred_targets" in rest:
        pred = rest.pop("pred_targets")
        pred = [pred] if isinstance(pred, str) else pred
        if not all(isinstance(t, str) for t in pred):
            raise ConfigError("loss_params.pred_targets", f"expected batch keys (strings), got {pred!r}")
        fields["pred_targets"] = tuple(pred)
    if "loss_func" in rest:
        fields["loss_func"] = rest.pop("loss_func")
        if not callable(fields["loss_func"]):
            raise ConfigError("loss_params.loss_func", f"a callable is required, got {fields['loss_func']!r}")
    if "agg_func" in rest:
        fields["agg_func"] = rest.pop("agg_func")
    for key in ("loss_func_kwargs", "agg_func_kwargs"):
        if key in rest:
            fields[key] = dict(rest.pop(key) or {})
    for key in ("labels_to_dict", "inputs_as_dict"):
        if key in rest:
            fields[key] = bool(rest.pop(key))
    if "loss_per_case_func_params" in rest:
        mapping = rest.pop("loss_per_case_func_params")
        fields["loss_per_case_func_params"] = None if mapping is None else dict(mapping)
    _unknown("loss_params", rest, set(), ignored, "not a TFUtils key; TFUtils ignores it")
    return LossGroup(**fields)


# learning_rate_params -----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LearningRateGroup:
    """The learning rate at each step: ``func(global_step=step, **kwargs)`` (TFUtils' ``learning_rate_params``)."""

    func: Callable[..., Any] = exponential_decay
    kwargs: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The TFUtils shape ``{'func': f, **kwargs}``."""
        return {"func": self.func, **self.kwargs}


def build_learning_rate(raw: Mapping[str, Any], ignored: Ignored) -> LearningRateGroup:
    """One model's learning_rate_params; the default exponential decay needs its three arguments, as TF's does."""
    func = raw.get("func") or exponential_decay
    if not callable(func):
        raise ConfigError("learning_rate_params.func", f"a callable is required, got {func!r}")
    kwargs = {k: v for k, v in raw.items() if k != "func"}
    if "global_step" in kwargs:
        raise ConfigError("learning_rate_params.global_step", "is passed by the training loop; remove it")
    if func is exponential_decay:
        for key in ("learning_rate", "decay_steps", "decay_rate"):
            if key not in kwargs:
                raise ConfigError(f"learning_rate_params.{key}",
                                  "required by the default exponential decay (or give a 'func')")
    return LearningRateGroup(func=func, kwargs=kwargs)


# optimizer_params ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class OptimizerGroup:
    """The optimizer in one shape: ``optimizer_class(params, lr=..., *optimizer_args, **optimizer_kwargs)``.

    ``clip`` is TFUtils' ClipOptimizer: gradients clipped by ``clipping_method`` ('value':
    each element to [-clipping_value, clipping_value]) before the update.
    """

    optimizer_class: type[torch.optim.Optimizer] | Callable[..., Any]
    optimizer_kwargs: dict[str, Any] = attrs.field(factory=dict)
    optimizer_args: tuple[Any, ...] = ()
    clip: bool = True
    clipping_method: str = "value"
    clipping_value: float = 1.0
    trainable_scope: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The group in TFUtils' E3 ClipOptimizer shape."""
        return {"optimizer": ClipOptimizer, **_as_dict(self), "optimizer_args": list(self.optimizer_args)}


_CLIP_KEYS = ("clip", "clipping_method", "clipping_value", "trainable_scope")


def build_optimizer(raw: Mapping[str, Any], ignored: Ignored) -> OptimizerGroup:
    """One model's optimizer_params, from any of the three shapes found in real params (§3).

    ``{'optimizer_class': C, 'optimizer_kwargs': {...}}`` (E3) and ``{'func': ClipOptimizer,
    'optimizer_class': C, 'clip': b, **flat}`` (E1) go through ClipOptimizer, so ``clip``
    defaults to True; ``{'optimizer': C, **kwargs}`` (E3, a plain optimizer class) does not clip.
    """
    rest = dict(raw)
    wrapper = rest.pop("optimizer", ClipOptimizer)
    func = rest.pop("func", None)
    if func:
        wrapper = func
    if not callable(wrapper):
        raise ConfigError("optimizer_params.optimizer", f"an optimizer class is required, got {wrapper!r}")
    if rest.pop("print_global_norm", None):
        ignored.append("optimizer_params.print_global_norm: TensorFlow logging of ClipOptimizer")
    if wrapper is ClipOptimizer:
        if "optimizer_class" not in rest:
            raise ConfigError("optimizer_params.optimizer_class", "required with ClipOptimizer (e.g. torch.optim.SGD)")
        cls = rest.pop("optimizer_class")
        extra_kwargs = dict(rest.pop("optimizer_kwargs", None) or {})
        clip_fields = {k: rest.pop(k) for k in _CLIP_KEYS if k in rest}
        if "clip" in clip_fields:
            clip_fields["clip"] = bool(clip_fields["clip"])
        args = tuple(rest.pop("optimizer_args", None) or ())
        clash = sorted(set(rest) & set(extra_kwargs))
        if clash:
            raise ConfigError(f"optimizer_params.{clash[0]}", "given both flat and in optimizer_kwargs")
        kwargs = {**rest, **extra_kwargs}
    else:
        cls, kwargs, args, clip_fields = wrapper, rest, (), {"clip": False}
    if not callable(cls):
        raise ConfigError("optimizer_params.optimizer_class", f"an optimizer class is required, got {cls!r}")
    for key in ("learning_rate", "lr"):
        if key in kwargs:
            raise ConfigError(f"optimizer_params.{key}", "the learning rate comes from learning_rate_params; remove it")
    return OptimizerGroup(optimizer_class=cls, optimizer_kwargs=kwargs, optimizer_args=args, **clip_fields)


# validation_params --------------------------------------------------------------------------------------


def _default_targets() -> FuncSpec:
    return FuncSpec(func=get_loss_dict, kwargs=LossGroup().to_dict())


@attrs.frozen(kw_only=True)
class ValidationSet:
    """One named validation set (an entry of TFUtils' ``validation_params``).

    Per batch ``targets.func(inputs, outputs, **targets.kwargs)``; ``online_agg_func(agg, res, i)``
    folds the batches, ``agg_func(agg)`` gives the record's value.  ``num_steps`` None means
    every batch of the data (TFUtils' ``total_batches``).
    """

    name: str
    data_params: FuncSpec
    targets: FuncSpec = attrs.field(factory=_default_targets)
    num_steps: int | None = None
    agg_func: Callable[[Any], Any] = identity_func
    online_agg_func: Callable[[Any, Any, int], Any] = append_and_return
    valid_loop: FuncSpec | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The set as TFUtils' ``validation_params[name]`` dict."""
        out = _as_dict(self)
        del out["name"]
        for key in ("data_params", "targets", "valid_loop"):
            if out[key] is not None:
                out[key] = out[key].to_dict()
        return out


def build_validation(raw: Any, ignored: Ignored) -> dict[str, ValidationSet]:
    """One model's validation_params: ``{name: ValidationSet}`` in the given order."""
    if not isinstance(raw, Mapping):
        raise ConfigError("validation_params", f"expected a dict of named sets, got {type(raw).__name__}")
    sets: dict[str, ValidationSet] = {}
    for name, spec in raw.items():
        group = f"validation_params.{name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(group, f"expected a dict, got {type(spec).__name__}")
        fields: dict[str, Any] = {"name": str(name), "data_params": _spec(f"{group}.data_params", spec.get("data_params"))}
        if spec.get("targets"):
            targets = dict(spec["targets"])
            targets.setdefault("func", get_loss_dict)
            fields["targets"] = _spec(f"{group}.targets", targets)
        if spec.get("num_steps") is not None:
            fields["num_steps"] = _freq(f"{group}.num_steps", spec["num_steps"])
        for key in ("agg_func", "online_agg_func"):
            if spec.get(key) is not None:
                if not callable(spec[key]):
                    raise ConfigError(f"{group}.{key}", f"a callable is required, got {spec[key]!r}")
                fields[key] = spec[key]
        loop = spec.get("valid_loop")
        if loop and not (isinstance(loop, Mapping) and loop.get("func") is None):
            fields["valid_loop"] = _spec(f"{group}.valid_loop", loop)
        known = {"data_params", "targets", "num_steps", "agg_func", "online_agg_func", "valid_loop"}
        rest = {k: v for k, v in spec.items() if k not in known}
        if rest.pop("queue_params", None):
            ignored.append(f"{group}.queue_params: TensorFlow input queues (E1/E2); the data func's loader replaces them")
        fields["extra"] = _unknown(group, rest, set(), ignored, "not a TFUtils key; TFUtils ignores it")
        sets[str(name)] = ValidationSet(**fields)
    return sets


def _as_dict(obj: Any, omit_none: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {a.name: getattr(obj, a.name) for a in attrs.fields(type(obj)) if a.name != "extra"}
    for key in omit_none:
        if out.get(key) is None:
            out.pop(key, None)
    if isinstance(out.get("save_to_gfs"), tuple):
        out["save_to_gfs"] = list(out["save_to_gfs"])
    return {**getattr(obj, "extra", {}), **out}
