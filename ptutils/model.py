"""Model: a module with its criterion, optimizer and scheduler, and their state in one place.

The run loop only ever calls :meth:`Model.train_step` / :meth:`Model.eval_step`;
updates swap the criterion, optimizer or scheduler between steps
(:meth:`set_optimizer` and friends) without the loop knowing.  The loss comes
back as a tensor, so nothing forces a device synchronisation unless someone
reads its value.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .conditions import cuda_free  # noqa: F401  (imported from here before conditions.py)
from .config import ModelConfig, build, check_kwargs, import_object
from .errors import ConfigError

Batch = Any
OptimizerSpec = Any
"""An Optimizer, a callable ``params -> Optimizer`` or a ``{"cls": ..., **kwargs}`` spec."""


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def split_batch(batch: Batch) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch given as a pair or as a dict with input/target keys."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for x, y in (("input", "target"), ("inputs", "targets"), ("image", "label"), ("x", "y")):
            if x in batch and y in batch:
                return batch[x], batch[y]
    raise TypeError(
        "a batch must be an (inputs, targets) pair or a dict with 'input'/'target' keys; "
        f"got {type(batch).__name__} (pass Model(step_fn=...) for other layouts)"
    )


class Model:
    """Module + criterion + optimizer (+ scheduler) on one device.

    ``optimizer`` and ``scheduler`` may be objects, factories (``params -> opt``,
    ``opt -> scheduler``) or specs; ``step_fn(model, batch) -> (loss, outputs,
    targets)`` replaces the default ``criterion(module(x), y)`` for other batch
    layouts (``(loss, outputs)`` will do for a model without metrics).

    ``metrics`` (``name -> fn(outputs, targets)``) are computed on evaluation
    batches, and, unless ``train_metrics=False``, on training batches too (under
    ``no_grad``, on the outputs the step computed anyway): a session records their
    epoch means as ``train_<name>``.  That costs their ops on every training step
    (a few µs each on the CPU, a kernel launch each on CUDA), never a sync.
    """

    def __init__(
        self,
        module: nn.Module,
        criterion: Callable[..., torch.Tensor] | Mapping | None = None,
        optimizer: OptimizerSpec = None,
        scheduler: Any = None,
        *,
        device: str | torch.device | None = None,
        grad_clip: float | None = None,
        step_fn: Callable[[Model, Batch], tuple[Any, ...]] | None = None,
        metrics: Mapping[str, Callable[[Any, Any], torch.Tensor]] | None = None,
        train_metrics: bool = True,
        scheduler_interval: str = "epoch",
        scheduler_metric: str | None = None,
    ):
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError("model.scheduler_interval", f"expected 'epoch' or 'step', got {scheduler_interval!r}")
        try:
            self.device = torch.device(device) if device is not None else default_device()
        except RuntimeError as exc:
            raise ConfigError("model.device", f"not a device: {exc}") from None
        built = build(module, "model.module")
        if not isinstance(built, nn.Module):
            raise ConfigError("model.module", f"expected a torch.nn.Module, got {type(built).__name__}")
        self.module = built.to(self.device)
        self.criterion = build(criterion, "model.criterion") if criterion is not None else nn.CrossEntropyLoss()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.grad_clip = grad_clip
        self.track_grad_norm = False
        self.grad_norm: torch.Tensor | None = None
        self.step_fn = step_fn
        self.metrics = dict(metrics or {})
        self.train_metrics = train_metrics
        """Whether training steps compute the metrics too (into :attr:`step_metrics`)."""
        self.step_metrics: dict[str, torch.Tensor] = {}
        """The metrics of the latest training step (0-d tensors on the device), when :attr:`train_metrics`."""
        self.scheduler_interval = scheduler_interval
        self.scheduler_metric = scheduler_metric
        if optimizer is not None:
            self.set_optimizer(optimizer)
        if scheduler is not None:
            self.set_scheduler(scheduler)

    @classmethod
    def from_config(cls, config: ModelConfig) -> Model:
        """Build from a :class:`~ptutils.config.ModelConfig`."""
        return cls(
            config.module,
            config.criterion,
            config.optimizer,
            config.scheduler,
            device=config.device,
            grad_clip=config.grad_clip,
            scheduler_interval=config.scheduler_interval,
            scheduler_metric=config.scheduler_metric,
            metrics={name: build_metric(spec, f"model.metrics.{name}") for name, spec in config.metrics.items()},
        )

    # ------------------------------------------------------------------ swapping parts
    def set_optimizer(self, optimizer: OptimizerSpec) -> torch.optim.Optimizer:
        """Replace the optimizer (fresh state); any scheduler is dropped with the old one."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if isinstance(optimizer, torch.optim.Optimizer):
            opt = optimizer
        elif isinstance(optimizer, Mapping):
            opt = build(optimizer, "model.optimizer", params)
        elif callable(optimizer):
            opt = optimizer(params)
        else:
            raise ConfigError("model.optimizer", f"expected an optimizer, factory or spec, got {optimizer!r}")
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError("model.optimizer", f"did not produce a torch.optim.Optimizer but {type(opt).__name__}")
        self.optimizer = opt
        self.scheduler = None
        return opt

    def set_scheduler(self, scheduler: Any) -> Any:
        """Attach an LR scheduler (object, ``optimizer -> scheduler`` factory, or spec)."""
        if self.optimizer is None:
            raise ConfigError("model.scheduler", "needs an optimizer")
        if isinstance(scheduler, Mapping):
            scheduler = build(scheduler, "model.scheduler", self.optimizer)
        elif callable(scheduler) and not hasattr(scheduler, "step"):
            scheduler = scheduler(self.optimizer)
        self.scheduler = scheduler
        return scheduler

    def steps_scheduler_every(self, interval: str) -> bool:
        """Whether the LR scheduler is stepped every ``interval`` (``"step"`` or ``"epoch"``)."""
        return self.scheduler is not None and self.scheduler_interval == interval

    def step_scheduler(self, metrics: Mapping[str, float]) -> None:
        """Advance the LR scheduler; the loop calls this after each step or epoch, as ``scheduler_interval`` says.

        A scheduler that needs a value (ReduceLROnPlateau) gets ``metrics[scheduler_metric]``
        and is skipped until that metric exists (per step too).
        """
        if self.scheduler is None:
            return
        if self.scheduler_metric is None:
            self.scheduler.step()
        elif self.scheduler_metric in metrics:
            self.scheduler.step(metrics[self.scheduler_metric])

    def set_criterion(self, criterion: Callable[..., torch.Tensor] | Mapping) -> None:
        """Replace the loss function."""
        self.criterion = build(criterion, "model.criterion")

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""
        for group in self._require_optimizer().param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group."""
        return float(self._require_optimizer().param_groups[0]["lr"])

    def _require_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise ConfigError("model.optimizer", "this model has no optimizer (needed to train)")
        return self.optimizer

    # ------------------------------------------------------------------ steps
    def forward_loss(self, batch: Batch) -> tuple[torch.Tensor, Any, Any]:
        """Loss, outputs and targets of one batch (already on the device); targets are None
        when a ``step_fn`` returns only ``(loss, outputs)``."""
        if self.step_fn is not None:
            returned = self.step_fn(self, batch)
            if not isinstance(returned, tuple) or len(returned) not in (2, 3):
                raise TypeError(f"step_fn must return (loss, outputs, targets) or (loss, outputs), got {returned!r:.80}")
            return returned if len(returned) == 3 else (*returned, None)
        inputs, targets = split_batch(batch)
        outputs = self.module(inputs)
        return self.criterion(outputs, targets), outputs, targets

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One optimisation step; returns the loss tensor (detached)."""
        opt = self._require_optimizer()
        if not self.module.training:
            self.module.train(True)
        if self.device.type != "cpu":
            batch = _to_device(batch, self.device)
        opt.zero_grad(set_to_none=True)
        loss, outputs, targets = self.forward_loss(batch)
        loss.backward()
        if self.grad_clip is not None:
            self.grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        elif self.track_grad_norm:
            self.grad_norm = nn.utils.get_total_norm(
                [p.grad for p in self.module.parameters() if p.grad is not None]
            )
        opt.step()
        if self.train_metrics and self.metrics:
            with torch.no_grad():
                self.step_metrics = self.metric_values(outputs, targets)
        return loss.detach()

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metric values of one batch, without gradients."""
        if self.module.training:
            self.module.train(False)
        if self.device.type != "cpu":
            batch = _to_device(batch, self.device)
        loss, outputs, targets = self.forward_loss(batch)
        return loss.detach(), self.metric_values(outputs, targets)

    def metric_values(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        """Each metric of one batch's outputs and targets (call under ``no_grad``)."""
        if targets is None and self.metrics:
            raise ConfigError(
                "model.metrics",
                f"metrics {', '.join(self.metrics)} need targets, but step_fn returned (loss, outputs): "
                "return (loss, outputs, targets) from it",
            )
        if isinstance(outputs, torch.Tensor):
            outputs = outputs.detach()
        return {name: fn(outputs, targets) for name, fn in self.metrics.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Module, optimizer and scheduler state (and criterion state when it has any)."""
        state: dict[str, Any] = {"module": self.module.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None and hasattr(self.scheduler, "state_dict"):
            state["scheduler"] = self.scheduler.state_dict()
        if isinstance(self.criterion, nn.Module) and self.criterion.state_dict():
            state["criterion"] = self.criterion.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors moved to this model's device)."""
        self.module.load_state_dict(state["module"])
        if "optimizer" in state and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            for param_state in self.optimizer.state.values():
                # On the CPU torch keeps the given tensors: a loaded checkpoint's would pin its whole
                # buffer (the model's copy too) in memory, and be shared by every optimizer given them.
                for key, value in param_state.items():
                    if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                        param_state[key] = value.clone()
        if "scheduler" in state and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if "criterion" in state and isinstance(self.criterion, nn.Module):
            self.criterion.load_state_dict(state["criterion"])


def build_metric(spec: Any, field: str) -> Callable[[Any, Any], torch.Tensor]:
    """A metric ``(outputs, targets) -> tensor`` from an import path, a spec or a callable; errors name ``field``.

    In a spec ``{"cls": path, **kwargs}`` a class is built with the kwargs and
    a function gets them bound (``functools.partial``), so both kinds of metric
    take options from a config.
    """
    if isinstance(spec, str):
        metric = import_object(spec, field)
    elif isinstance(spec, Mapping) and "cls" in spec:
        target = import_object(spec["cls"], f"{field}.cls")
        if inspect.isclass(target):
            metric = build(spec, field)
        else:
            kwargs = {k: v for k, v in spec.items() if k != "cls"}
            check_kwargs(target, kwargs, field, skip=2)
            metric = functools.partial(target, **kwargs)
    else:
        metric = spec
    if not callable(metric):
        raise ConfigError(field, f"expected a metric (outputs, targets) -> tensor, got {metric!r}")
    return metric


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max equals the target class."""
    return (outputs.argmax(dim=-1) == targets).float().mean()
