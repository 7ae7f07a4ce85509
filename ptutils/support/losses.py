"""TFUtils' loss call conventions: how ``loss_params`` turn a batch and the model's outputs into a loss.

E3 (``tfutils/helper.py:336-409``): ``loss_func(outputs, *[inputs[t] for t in pred_targets], **loss_func_kwargs)``,
or ``labels=[...]`` as a keyword (``labels_to_dict``), or ``loss_func(outputs, inputs, **kw)``
(``inputs_as_dict``); then ``agg_func(loss, **agg_func_kwargs)``, which also gets
``which_device``/``model_prefix`` when it names them.  E1's ``loss_per_case_func_params``
(``{'_outputs': name, '_targets_$all': name, '_targets_<key>': name}``) maps outputs and
targets onto named arguments instead (``E1:tfutils/utils.py:184-236``); it applies when given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["compute_loss"]


def _names(func: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return set()


def _e1_call(inputs: Mapping[str, Any], outputs: Any, targets: list[str], loss_func: Callable[..., Any],
             mapping: Mapping[str, str], kwargs: dict[str, Any]) -> Any:
    labels: Any = inputs[targets[0]] if len(targets) == 1 else [inputs[t] for t in targets]
    with_outputs = with_targets = True
    for key, name in mapping.items():
        if key == "_outputs":
            with_outputs = False
            kwargs[name] = outputs
        elif key == "_targets_$all":
            with_targets = False
            kwargs[name] = labels
        elif key.startswith("_targets_") and key[len("_targets_"):] in targets:
            targets.remove(key[len("_targets_"):])
            kwargs[name] = inputs[key[len("_targets_"):]]
    if not targets:
        with_targets = False
    args = [inputs[t] for t in targets] if with_targets else []
    if with_outputs:
        args.insert(0, outputs)
    return loss_func(*args, **kwargs)


def compute_loss(
    inputs: Mapping[str, Any],
    outputs: Any,
    *,
    pred_targets: Sequence[str] | str,
    loss_func: Callable[..., Any],
    agg_func: Callable[..., Any] | None = None,
    loss_func_kwargs: Mapping[str, Any] | None = None,
    agg_func_kwargs: Mapping[str, Any] | None = None,
    labels_to_dict: bool = False,
    inputs_as_dict: bool = False,
    loss_per_case_func_params: Mapping[str, str] | None = None,
    which_device: int = 0,
    model_prefix: str | None = None,
    **_ignored: Any,
) -> Any:
    """The aggregated loss of one batch, calling ``loss_func`` and ``agg_func`` the way TFUtils does."""
    kwargs = dict(loss_func_kwargs or {})
    targets = [pred_targets] if isinstance(pred_targets, str) else list(pred_targets)
    if inputs_as_dict:
        loss = loss_func(outputs, inputs, **kwargs)
    elif loss_per_case_func_params is not None:
        loss = _e1_call(inputs, outputs, targets, loss_func, loss_per_case_func_params, kwargs)
    elif labels_to_dict:
        kwargs["labels"] = [inputs[t] for t in targets]
        loss = loss_func(outputs, **kwargs)
    else:
        loss = loss_func(outputs, *[inputs[t] for t in targets], **kwargs)
    if agg_func is None:
        return loss
    agg_kwargs = dict(agg_func_kwargs or {})
    names = _names(agg_func)
    if "which_device" in names:
        agg_kwargs["which_device"] = which_device
    if "model_prefix" in names:
        agg_kwargs["model_prefix"] = model_prefix
    return agg_func(loss, **agg_kwargs)
