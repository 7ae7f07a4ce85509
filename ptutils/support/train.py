"""TFUtils' ``train_from_params`` on ptutils' Session: each model one Session, TFUtils' records from one update.

``train_from_params(**params)`` normalises the params (:func:`ptutils.support.normalize`),
then for each model builds a :class:`~ptutils.model.Model` whose ``step_fn`` computes
TFUtils' loss (``module(inputs)`` on the batch dict, ``loss_func``/``agg_func`` as
:func:`~ptutils.support.losses.compute_loss` calls them), the optimizer of the optimizer
group (``clip`` → gradient values clamped by a hook on every parameter), the learning
rate ``func(global_step=step, **kw)`` as a ``LambdaLR`` stepped every step, and a
:class:`~ptutils.session.Session` (id: the exp_id) whose one update,
:class:`TFUtilsRecorder`, writes TFUtils' records on TFUtils' schedule
(:mod:`ptutils.support.schedule`), runs the validation sets, and fails the session
when the loss passes ``thres_loss``.  The session runs with ``until_step=num_steps`` and
so ends *paused* at num_steps, with a checkpoint: the same exp_id continues from there.

Differences from TFUtils, on purpose (the README's "Coming from TFUtils" lists them):

* Continuing an exp_id resumes exactly where its Session stopped (its newest ptutils
  checkpoint, the pause checkpoint at num_steps after a clean end), not from the newest
  ``saved_filters`` checkpoint; after a crash it is the newest checkpoint, as in TFUtils,
  and records after it are written again (duplicate steps, as TFUtils').
* The train results accumulated since the last record are part of the checkpoint, so a
  continued run writes them with its first record instead of dropping them.
* Several models train one after the other, each over model 0's data (the same batches
  in the same order), not in lockstep in one ``sess.run``.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..checkpoint import CheckpointStore, seed_everything
from ..data import DataProvider, LoaderSettings, make_dataloader
from ..errors import ConfigError, DataError, PtutilsError, SessionError
from ..model import Model
from ..session import Session
from .groups import FuncSpec, LoadGroup, LossGroup, ModelGroup, SaveGroup, TrainGroup, ValidationSet
from .losses import compute_loss
from .params import Params, model_kwargs, normalize
from .records import RecordStore, location, open_records, plain_result, sonify
from .schedule import last_step

log = logging.getLogger("ptutils")

__all__ = ["HiLossError", "NanLossError", "TFUtilsRecorder", "build_module", "train_from_params"]

RESERVED_TARGETS = ("loss", "__grads__", "optimizer", "learning_rate")


class HiLossError(PtutilsError):
    """The training loss went above ``train_params['thres_loss']`` (TFUtils' HiLossError)."""


class NanLossError(PtutilsError):
    """The training loss is not finite (TFUtils E3's NanLossError)."""


# ---------------------------------------------------------------------------------------------- data


class _OneShot:
    """An iterator of batch dicts as a loader: read once; an epoch that yields nothing means the data ran out."""

    def __init__(self, iterator: Iterable[Any]):
        self.iterator = iter(iterator)

    def __iter__(self):
        empty = True
        for batch in self.iterator:
            empty = False
            yield batch
        if empty:
            raise DataError("the training data ran out (an iterator of batches yields each batch once)")


LOADER_KEYS = ("batch_size", "shuffle", "num_workers", "seed", "shuffle_seed")
"""``data_params`` keys that configure the DataLoader; ``func`` gets them only if it takes them by name."""


def _data_kwargs(func: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` for a data ``func``: a TensorFlow provider took ``batch_size`` and such; a Dataset need not."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k not in LOADER_KEYS or k in parameters}


class FuncProvider(DataProvider):
    """``data_params``: ``func(**kwargs)`` gives a Dataset of dict items, a DataProvider, or an iterable of batches.

    A Dataset is read by a ptutils DataLoader (resumable sampler) with ``batch_size``,
    ``shuffle`` and ``num_workers`` (and ``seed``/``shuffle_seed``) from the kwargs.
    """

    def __init__(self, spec: FuncSpec, *, batch_multiple: int = 1, seed: int = 0, field: str = "data_params"):
        made = spec.func(**_data_kwargs(spec.func, spec.kwargs))
        kw = spec.kwargs
        self.inner: DataProvider | None = made if isinstance(made, DataProvider) else None
        self.dataset = made if isinstance(made, torch.utils.data.Dataset) else None
        self.iterable = None
        if self.inner is None and self.dataset is None:
            if not isinstance(made, Iterable):
                raise ConfigError(f"{field}.func", f"must return a torch Dataset, a DataProvider or an iterable of "
                                                   f"batch dicts, got {type(made).__name__}")
            self.iterable = made
        data_seed = kw.get("shuffle_seed", kw.get("seed", seed))
        self.settings = LoaderSettings(
            batch_size=int(kw.get("batch_size", 1)) * batch_multiple, shuffle=bool(kw.get("shuffle", False)),
            num_workers=int(kw.get("num_workers", 0)), seed=int(data_seed or 0))

    def get_dataloader(self, request: Any) -> Any:
        if self.inner is not None:
            return self.inner.get_dataloader(request if request is not None else "train")
        if self.dataset is not None:
            return make_dataloader(self.dataset, self.settings)
        if iter(self.iterable) is self.iterable:
            return _OneShot(self.iterable)
        return self.iterable


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _split(batch: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
    """A batch dict in ``n`` minibatches along the first dimension (non-tensors repeated)."""
    parts: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in batch.items():
        pieces = value.chunk(n) if isinstance(value, torch.Tensor) else [value] * n
        if len(pieces) != n:
            raise DataError(f"batch key {key!r} of {len(value)} rows cannot make {n} minibatches")
        for part, piece in zip(parts, pieces):
            part[key] = piece
    return parts


# ---------------------------------------------------------------------------------------------- validation


def _batches(loader: Any, num_steps: int | None) -> Iterable[Any]:
    """``num_steps`` batches of the loader (going round again if it is shorter, as TFUtils' queues did), or one pass."""
    if num_steps is None:
        yield from loader
        return
    done = 0
    while done < num_steps:
        any_batch = False
        for batch in loader:
            any_batch = True
            yield batch
            done += 1
            if done >= num_steps:
                return
        if not any_batch:
            raise DataError("a validation set yielded no batch")


def run_validation(module: nn.Module, sets: Mapping[str, ValidationSet], device: torch.device, *, seed: int = 0,
                   save_intermediate: Any = None) -> dict[str, Any]:
    """Each validation set's aggregated result: per batch ``targets.func(inputs, outputs, **kw)``,
    folded by ``online_agg_func(agg, res, i)``, finished by ``agg_func(agg)``.

    Draws no global randomness (the RNG is restored) and puts the module back in its mode.
    ``save_intermediate(name, i, res)`` is called per batch when given (test mode).
    """
    results: dict[str, Any] = {}
    was_training = module.training
    module.train(False)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for name, vset in sets.items():
                provider = FuncProvider(vset.data_params, seed=seed, field=f"validation_params.{name}.data_params")
                agg = None
                for i, batch in enumerate(_batches(provider.get_dataloader(name), vset.num_steps)):
                    batch = _to_device(batch, device)
                    outputs = module(batch)
                    res = vset.targets.func(batch, outputs, **vset.targets.kwargs)
                    if save_intermediate is not None:
                        save_intermediate(name, i, res)
                    agg = vset.online_agg_func(agg, res, i)
                results[name] = vset.agg_func(agg)
    finally:
        module.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------- the model


def build_module(model: ModelGroup) -> nn.Module:
    """``model_params['func'](**kwargs)`` seeded with the model's seed; a ``(module, cfg)`` pair gives its module."""
    seed_everything(model.seed)
    built = model.func(**model_kwargs(model))
    if isinstance(built, tuple):
        built = built[0]
    if not isinstance(built, nn.Module):
        raise ConfigError("model_params.func", f"must return a torch.nn.Module, got {type(built).__name__}")
    return built


class _Clock:
    """What the step function, the learning rate and the recorder share of one model's run."""

    def __init__(self, start: int):
        self.session: Session | None = None
        self.start = start
        self.lr: float | None = None
        self.loss: torch.Tensor | None = None
        self.targets: dict[str, Any] = {}
        self.step_started = time.perf_counter()

    @property
    def step(self) -> int:
        return self.session.step if self.session is not None else self.start


def _loss_kwargs(loss: LossGroup) -> dict[str, Any]:
    return loss.to_dict()


def make_model(params: Params, i: int, module: nn.Module, clock: _Clock) -> Model:
    """Model ``i``'s ptutils Model: TFUtils' loss as its step_fn, its optimizer, its learning rate per step."""
    train, loss, opt, lr = params.train[i], params.loss[i], params.optimizer[i], params.learning_rate[i]
    prefix = params.model[i].prefix
    n = train.num_minibatches
    loss_kwargs = _loss_kwargs(loss)
    targets = train.targets

    def step_fn(model: Model, batch: Any) -> tuple[Any, Any, Any]:
        clock.step_started = time.perf_counter()
        clock.lr = float(model.optimizer.param_groups[0]["lr"])
        parts = _split(batch, n) if n > 1 else [batch]
        total = None
        for j, part in enumerate(parts):
            outputs = model.module(part)
            value = compute_loss(part, outputs, **loss_kwargs, model_prefix=prefix)
            if j < n - 1:
                (value / n).backward()
            total = value.detach() if total is None else total + value.detach()
        clock.loss = total / n
        clock.targets = {}
        if targets is not None:
            with torch.no_grad():
                found = targets.func(parts[-1], outputs, **targets.kwargs)
            if not isinstance(found, Mapping):
                raise ConfigError("train_params.targets.func", f"must return a dict, got {type(found).__name__}")
            clash = [k for k in found if k in RESERVED_TARGETS]
            if clash:
                raise ConfigError("train_params.targets", f"{clash[0]!r} is a reserved name (loss, __grads__, "
                                                          f"optimizer and learning_rate are TFUtils')")
            clock.targets = dict(found)
        return (value / n if n > 1 else value), outputs, None

    def optimizer(parameters: Any) -> torch.optim.Optimizer:
        return opt.optimizer_class(parameters, *opt.optimizer_args, lr=1.0, **opt.optimizer_kwargs)

    def factor(_epoch: int) -> float:
        return float(lr.func(global_step=clock.step, **lr.kwargs))

    grad_clip = None
    if opt.clip and opt.clipping_method == "value":
        bound = float(opt.clipping_value)
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(lambda g, b=bound: g.clamp(-b, b))
    elif opt.clip:
        grad_clip = float(opt.clipping_value)  # 'norm': the global norm, as tf.clip_by_global_norm
    return Model(module, optimizer=optimizer, scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, factor),
                 scheduler_interval="step", step_fn=step_fn, grad_clip=grad_clip)


# ---------------------------------------------------------------------------------------------- records


def _split_gfs(results: dict[str, Any], keys: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    kept = {k: v for k, v in results.items() if k not in keys}
    moved = {k: v for k, v in results.items() if k in keys}
    return kept, moved


class TFUtilsRecorder:
    """The update that writes one model's TFUtils records (spec §4.3) after each training step.

    ``write_at(session, step)`` is TFUtils' ``DBInterface.save``: it decides from the
    step whether a record, a permanent checkpoint (``saved_filters: True``, a pinned
    ptutils checkpoint) or a cached one (``__RECENT``, at most ``cache_max_num``) is
    written, and runs the validation sets at ``save_valid_freq``.
    """

    def __init__(self, store: RecordStore, save: SaveGroup, exp_id: str, params_doc: dict[str, Any], *,
                 validation: Mapping[str, ValidationSet], thres_loss: float, restored: bool, clock: _Clock,
                 seed: int = 0):
        self.store, self.save, self.exp_id, self.params_doc = store, save, exp_id, params_doc
        self.validation, self.thres_loss, self.restored, self.clock = validation, thres_loss, restored, clock
        self.seed = seed
        self.pending: list[dict[str, Any]] = []
        self.duration: float | None = None
        self.inserted: list[Any] = []

    # checkpointed with the session: a continued run writes what was accumulated
    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending, "duration": self.duration, "restored": self.restored}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pending = list(state.get("pending") or [])
        self.duration = state.get("duration")
        self.restored = bool(state.get("restored", self.restored))

    def __call__(self, session: Session) -> Session:
        if session.event != "step" or session.current_stage.mode != "train":
            return session
        clock = self.clock
        loss = float(clock.loss)
        if not math.isfinite(loss):
            raise NanLossError(f"{self.exp_id}: the loss is {loss} at step {session.step}")
        if loss > self.thres_loss:
            raise HiLossError(f"{self.exp_id}: loss {loss} exceeded the threshold thres_loss={self.thres_loss} "
                              f"at step {session.step}")
        entry = {"loss": loss, "learning_rate": clock.lr}
        entry.update({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in clock.targets.items()})
        if self.duration is None:
            self.duration = time.perf_counter() - clock.step_started
        self.pending.append(entry)
        self.write_at(session, session.step)
        return session

    def write_at(self, session: Session, step: int, *, train: bool = True) -> None:
        s = self.save
        validation = None
        if self.validation and (step % s.save_valid_freq == 0 or not train):
            validation = run_validation(session.model.module, self.validation, session.model.device, seed=self.seed)
        initial_ok = step > 0 or (s.save_initial_filters and not self.restored)
        perm = step % s.save_filters_freq == 0 and initial_ok
        cache = step % s.cache_filters_freq == 0 and initial_ok
        due = perm or cache or step % s.save_metrics_freq == 0 or step % s.save_valid_freq == 0
        if not (s.do_save and due):
            if validation is not None:
                log.info("%s: validation at step %d not recorded (do_save is False)", self.exp_id, step)
            return
        if self.duration is None:
            self.duration = 0.0
        record: dict[str, Any] = {
            "exp_id": self.exp_id, "step": step, "saved_filters": False, "duration": self.duration,
            "params": self.params_doc, "uploadDate": self.store.now(), "session_id": session.id,
        }
        gfs: dict[str, Any] = {}
        if self.pending:
            keys = s.save_to_gfs
            rows = []
            for entry in self.pending:
                kept, moved = _split_gfs(entry, keys)
                rows.append(plain_result(kept))
                for k, v in moved.items():
                    gfs.setdefault("train_results", {}).setdefault(k, []).append(v)
            record["train_results"] = rows
        if validation is not None:
            results = {}
            for name, value in validation.items():
                if isinstance(value, Mapping):
                    kept, moved = _split_gfs(dict(value), s.save_to_gfs)
                    if moved:
                        gfs.setdefault("validation_results", {})[name] = moved
                    results[name] = plain_result(kept)
                else:
                    results[name] = plain_result(value)
            record["validation_results"] = results
        if perm or cache:
            ckpt = session.save_checkpoint(reason="tfutils_filters" if perm else "tfutils_cache", pinned=True)
            record["checkpoint"] = {"session_id": session.id, "id": ckpt["_id"], "step": step,
                                    "sha256": ckpt["sha256"], "format": "ptutils-checkpoint/1"}
        if perm:
            record["saved_filters"] = True
        elif cache:
            self.store.insert_recent(self.exp_id, {**record, "saved_filters": True})
            self._prune_recent(session)
        oid = self.store.insert(record)
        if gfs:
            self.store.put_items(oid, gfs)
        self.inserted.append(oid)
        self.pending, self.duration = [], None

    def _prune_recent(self, session: Session) -> None:
        recent = self.store.recent(self.exp_id)
        keep = self.save.cache_max_num
        for old in recent[: max(0, len(recent) - keep)]:
            self.store.delete_recent(self.exp_id, old["_id"])
            ref = old.get("checkpoint") or {}
            if ref.get("session_id") == session.id:
                store = session.checkpoints
                found = store.db.load({"_id": ref["id"]})
                if found:
                    store.delete(found[0])


# ---------------------------------------------------------------------------------------------- restore


def _newest_session(store: RecordStore, exp_id: str) -> str | None:
    found = store.find({"exp_id": exp_id}, limit=1)
    return found[0].get("session_id") if found else None


def _session_exists(store: RecordStore, session_id: str) -> bool:
    return store.ckpt_db.collection("sessions").exists(session_id)


def load_checkpoint_record(store: RecordStore, record: Mapping[str, Any]) -> dict[str, Any]:
    """The ptutils checkpoint state a ``saved_filters`` record points to (verified by its SHA-256)."""
    ref = record.get("checkpoint")
    if not ref:
        raise SessionError(f"record {record.get('_id')!r} of {record.get('exp_id')!r} names no ptutils checkpoint")
    checkpoints = CheckpointStore(store.ckpt_db, ref["session_id"])
    found = checkpoints.db.load({"_id": ref["id"]})
    if not found:
        raise SessionError(f"checkpoint {ref['id']!r} of record {record.get('_id')!r} is gone")
    return checkpoints.read(found[0])


def find_load_record(load: LoadGroup, load_where: Mapping[str, Any], store: RecordStore) -> dict | None:
    """§5.2: ``query`` (or ``{}``) with the load exp_id and ``saved_filters: True``, newest by uploadDate."""
    query = dict(load.query or {})
    query.setdefault("exp_id", load_where["exp_id"])
    with_recent = query["exp_id"] if "step" not in query else None
    return store.newest_checkpoint(query, with_recent)


def _load_weights(module_model: Model, state: Mapping[str, Any]) -> None:
    """A checkpoint's module weights (and optimizer slots when they fit) into a fresh Model."""
    module_model.module.load_state_dict(state["model"]["module"])
    optimizer = state["model"].get("optimizer")
    current = module_model.optimizer
    if optimizer is not None and current is not None:
        saved_keys = set((optimizer.get("param_groups") or [{}])[0]) - {"params"}
        if saved_keys != set(current.param_groups[0]) - {"params"}:
            log.info("optimizer state of the loaded checkpoint not restored: another optimizer made it")
            return
        try:
            module_model.optimizer.load_state_dict(optimizer)
        except (ValueError, KeyError, RuntimeError) as exc:
            log.info("optimizer state of the loaded checkpoint not restored: %s", exc)


# ---------------------------------------------------------------------------------------------- entry point


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("host", "port", "dbname", "collname", "exp_id", "db"))


def _prepare(params: Params, i: int, data_spec: FuncSpec, seed0: int) -> dict[str, Any]:
    """Model ``i``'s store, session, recorder and restore decision (before any step)."""
    save, load, train = params.save[i], params.load[i], params.train[i]
    save_where, load_where = location(save, load), location(load, save)
    exp_id = save_where["exp_id"]
    if not exp_id:
        raise ConfigError("save_params.exp_id", "required (or in load_params)")
    sameloc = _same(save_where, load_where) and (not load.query or load.query.get("exp_id", exp_id) == exp_id)
    if load.query and sameloc:
        raise ConfigError("load_params.query", "Loading pointlessly! The load location is the save location: "
                                               "an exp_id continues from its own newest checkpoint")
    store = open_records(save_where)
    try:
        session_id, state, start, restored, loaded = exp_id, None, 0, False, None
        if load.do_restore and load.from_ckpt is None:
            session_id = _newest_session(store, exp_id) or exp_id
            if not _session_exists(store, session_id) and not sameloc:
                load_store = store if _same({**load_where, "exp_id": None}, {**save_where, "exp_id": None}) \
                    else open_records(load_where, "load_params")
                try:
                    loaded = find_load_record(load, load_where, load_store)
                    if loaded is None:
                        raise SessionError("You specified load parameters but no record was found with the given "
                                           f"spec: {load.query or {'exp_id': load_where['exp_id']}}")
                    state = load_checkpoint_record(load_store, loaded)
                finally:
                    if load_store is not store:
                        load_store.close()
                restored = True
                start = int(loaded["step"]) if load.restore_global_step else 0
        elif not load.do_restore and _session_exists(store, exp_id):
            session_id = f"{exp_id}.{uuid.uuid4().hex[:8]}"  # a fresh start appends to the same exp_id
        module = build_module(params.model[i])
        clock = _Clock(start)
        model = make_model(params, i, module, clock)
        if load.from_ckpt:
            module.load_state_dict(safetensors.torch.load_file(load.from_ckpt))
        provider = FuncProvider(data_spec, batch_multiple=train.num_minibatches, seed=seed0)
        params_doc = sonify(params.as_tfutils(i), params.skip_check)
        recorder = TFUtilsRecorder(store, save, exp_id, params_doc, validation=params.validation[i],
                                   thres_loss=train.thres_loss, restored=restored, clock=clock,
                                   seed=params.model[i].seed)
        session = Session(model, provider, updates=[recorder], db=store.ckpt_db, session_id=session_id,
                          name=exp_id, seed=params.model[i].seed, checkpoint_every_steps=None,
                          checkpoint_every_epochs=None, keep_checkpoints=2,
                          metadata={"tfutils": {"exp_id": exp_id, "prefix": params.model[i].prefix}})
        clock.session = session
        fresh = session.state == "pending" and session.step == 0
        if not fresh:
            recorder.restored = True  # §5.3a: continuing its own checkpoint is "restored from the database"
        elif state is not None:
            _load_weights(model, state)
            session.position.step = start
            for group in model.optimizer.param_groups:
                group["lr"] = float(params.learning_rate[i].func(global_step=start, **params.learning_rate[i].kwargs))
        return {"store": store, "session": session, "recorder": recorder, "fresh": fresh, "start": session.step,
                "clock": clock, "loaded": loaded, "exp_id": exp_id}
    except BaseException:
        store.close()
        raise


def _close(prepared: list[dict[str, Any]]) -> None:
    for item in prepared:
        try:
            item["session"].close()
        finally:
            item["store"].close()


def train_from_params(save_params: Any, model_params: Any, train_params: Any, loss_params: Any = None,
                      learning_rate_params: Any = None, optimizer_params: Any = None, validation_params: Any = None,
                      load_params: Any = None, log_device_placement: bool = False, dont_run: bool = False,
                      skip_check: bool = False, **era_keys: Any) -> Any:
    """Train as TFUtils' ``train_from_params(**params)`` did, on ptutils Sessions (see the module docstring).

    Returns, per model, the ids of the records written (None for a model whose restored
    step is already ``>= num_steps``: "Training cancelled"); a single model's cancelled
    run returns None, as TFUtils.  With ``dont_run`` nothing is trained and a dict of
    per-model lists comes back, after restore: ``session``, ``model`` (the ptutils Model),
    ``dbinterface`` (the record store), ``validation_targets``, ``global_step``,
    ``train_targets``, ``num_steps``, ``thres_loss``, ``train_loop``, ``validate_first``,
    ``num_minibatches``; the caller closes the sessions (``session.close()``).
    """
    params = normalize("train", save_params=save_params, model_params=model_params, train_params=train_params,
                       loss_params=loss_params, learning_rate_params=learning_rate_params,
                       optimizer_params=optimizer_params, validation_params=validation_params,
                       load_params=load_params, log_device_placement=log_device_placement, dont_run=dont_run,
                       skip_check=skip_check, **era_keys)
    for note in params.ignored:
        log.warning("train_from_params: ignored %s", note)
    for i, train in enumerate(params.train):
        if train.train_loop is not None:
            log.warning("train_from_params: model %d: train_params.train_loop (a TensorFlow sess.run loop) is not "
                        "used; the Session's loop runs the steps", i)
    data_spec = params.train[0].data_params  # §2.6: model 0's data feeds every model
    prepared: list[dict[str, Any]] = []
    try:
        for i in range(params.num_models):
            prepared.append(_prepare(params, i, data_spec, params.model[0].seed))
    except BaseException:
        _close(prepared)
        raise
    if params.dont_run:
        return {
            "session": [p["session"] for p in prepared],
            "model": [p["session"].model for p in prepared],
            "dbinterface": [p["store"] for p in prepared],
            "validation_targets": list(params.validation),
            "global_step": [p["start"] for p in prepared],
            "train_targets": [t.targets for t in params.train],
            "num_steps": [t.num_steps for t in params.train],
            "thres_loss": [t.thres_loss for t in params.train],
            "train_loop": [t.train_loop for t in params.train],
            "validate_first": [t.validate_first for t in params.train],
            "num_minibatches": [t.num_minibatches for t in params.train],
        }
    out: list[Any] = []
    try:
        for i, item in enumerate(prepared):
            out.append(_train_one(params.train[i], item))
    finally:
        _close(prepared)
    if params.num_models == 1 and out[0] is None:
        return None
    return out


def _train_one(train: TrainGroup, item: dict[str, Any]) -> list[Any] | None:
    session: Session = item["session"]
    recorder: TFUtilsRecorder = item["recorder"]
    bounded = not math.isinf(train.num_steps)
    end = last_step(train.num_steps) if bounded else None
    if session.state in ("failed", "complete"):
        raise SessionError(f"{item['exp_id']}: its session {session.id!r} is {session.state} "
                           f"({(session.error or {}).get('message', session.outcome)}); start afresh with "
                           f"load_params={{'do_restore': False}} or a new exp_id")
    if bounded and session.step >= end:
        log.info("Training cancelled since step (%d) is >= num_steps (%s)", session.step, train.num_steps)
        return None
    if item["fresh"] and session.step == 0 and train.validate_first:
        recorder.write_at(session, 0, train=False)
    session.run(until_step=end)
    return recorder.inserted
