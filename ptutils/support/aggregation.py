"""TFUtils' validation aggregation helpers (``tfutils/utils.py:185-231``) for torch values.

``online_agg_func(agg, res, step)`` folds each batch's result into ``agg``; ``agg_func(agg)``
turns the fold into what the record stores.  TFUtils saw numpy arrays from ``sess.run``
and its records show them as numbers and lists; these take torch tensors (or numpy,
or numbers) and give plain Python numbers and lists, so a record looks the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["append_and_return", "identity_func", "mean_dict", "reduce_mean_dict", "to_plain"]


def to_plain(value: Any) -> Any:
    """Tensors and arrays as Python numbers (0-d) or nested lists; dicts, lists and tuples converted inside."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def identity_func(x: Any) -> dict[str, Any]:
    """``x`` itself when it is a dict, else ``{'result': x}`` (TFUtils' default ``agg_func``)."""
    x = to_plain(x)
    return x if isinstance(x, dict) else {"result": x}


def append_and_return(x: list[Any] | None, y: Any, step: int) -> list[Any]:
    """Append this batch's result to the list (TFUtils' default ``online_agg_func``); starts one when ``x`` is None."""
    if x is None:
        x = []
    x.append(to_plain(y))
    return x


def mean_dict(y: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per key, the mean over the batches' dicts (``np.mean``, so arrays are flattened); ``validation_step`` gives ``[min, max]``."""
    out: dict[str, Any] = {}
    for key in y[0]:
        pluck = [to_plain(d[key]) for d in y]
        out[key] = [min(pluck), max(pluck)] if key == "validation_step" else float(np.mean(pluck))
    return out


def reduce_mean_dict(x: dict[str, Any] | None, y: Mapping[str, Any], step: int) -> dict[str, Any]:
    """Running mean per key, batch ``step`` (0-based) weighted 1/(step+1); ``validation_step`` keeps ``[min, max]``.

    TFUtils raises KeyError on the first ``validation_step`` (it reads ``x[k]`` before setting
    it); here the first value starts the range.
    """
    x = {} if x is None else x
    for key, value in y.items():
        if key == "validation_step":
            value = to_plain(value)
            seen = x.get(key, [value, value])
            x[key] = [min(min(seen), value), max(max(seen), value)]
        elif key not in x:
            x[key] = to_plain(_array(value))
        else:
            f = step / (step + 1.0)
            x[key] = to_plain(f * _array(x[key]) + (1 - f) * _array(value))
    return x
