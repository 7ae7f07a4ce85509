"""TFUtils' default callables in PyTorch form, the values ``normalize`` fills in.

TFUtils' defaults (``tfutils/defaults.py``) are TensorFlow ops; these are their
PyTorch stand-ins: per-case cross-entropy for ``tf.nn.sparse_softmax_cross_entropy_with_logits``,
a plain mean for ``mean_and_reg_loss`` (PyTorch has no regularisation-loss
collection: weight decay lives in the optimizer), ``exponential_decay`` exactly
as ``tf.train.exponential_decay`` computes it, ``torch.optim.SGD`` for
``tf.train.MomentumOptimizer`` and a :class:`ClipOptimizer` marker for
``tfutils.optimizer.ClipOptimizer``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ClipOptimizer", "cross_entropy_per_case", "exponential_decay", "get_loss_dict", "mean_loss",
]


def cross_entropy_per_case(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One cross-entropy value per example (TFUtils' default ``loss_func``, sparse softmax xent)."""
    return F.cross_entropy(outputs, labels, reduction="none")


def mean_loss(loss: torch.Tensor) -> torch.Tensor:
    """The mean of the per-case losses (TFUtils' default ``agg_func``, without TF's regularisation collection)."""
    return loss.mean()


def exponential_decay(
    global_step: int, learning_rate: float, decay_steps: int, decay_rate: float, staircase: bool = False,
) -> float:
    """``learning_rate * decay_rate ** (global_step / decay_steps)``, floored exponent when ``staircase`` (as TF)."""
    exponent = global_step / decay_steps
    if staircase:
        exponent = math.floor(exponent)
    return learning_rate * decay_rate**exponent


class ClipOptimizer:
    """Names TFUtils' ``ClipOptimizer`` in ``optimizer_params``; ``normalize`` turns it into ``clip=True`` and is never instantiated."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        raise TypeError(
            "ptutils.support.ClipOptimizer only marks optimizer_params as TFUtils' clipping optimizer; "
            "normalize() reads it, nothing builds it")


def get_loss_dict(inputs: Any, outputs: Any, **loss_params: Any) -> dict[str, Any]:
    """``{'loss': ...}`` for a validation batch, from loss_params (TFUtils' default validation ``targets`` func)."""
    from .losses import compute_loss

    return {"loss": compute_loss(inputs, outputs, **loss_params)}
