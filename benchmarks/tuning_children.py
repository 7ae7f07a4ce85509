"""The children of ``tuning_scaling.py``: a CPU-bound MLP on synthetic data, built from import-path specs.

A tuning session stores its children's configs and every worker (a spawned
pool process, a Ray task) rebuilds them from those, so the model and the data
must be importable by name there: this module, found through ``sys.path``
(spawned workers inherit the parent's; the Ray executor passes it on as
``PYTHONPATH``).  ``config(steps, width)`` is the base config the benchmark tunes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from ptutils.data import DatasetProvider

FEATURES = 64
CLASSES = 10
BATCH = 64
STEPS_PER_EPOCH = 25
VAL = 256


def mlp(width: int = 256) -> torch.nn.Module:
    """Two hidden layers of ``width``: the step's cost grows with ``width ** 2``."""
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, width), torch.nn.ReLU(),
        torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, CLASSES),
    )


def provider(seed: int = 0) -> DatasetProvider:
    """A fixed synthetic task (labels from a random linear teacher), shuffled with ``seed``."""
    g = torch.Generator().manual_seed(1234)
    n = STEPS_PER_EPOCH * BATCH + VAL
    x = torch.randn(n, FEATURES, generator=g)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)
    y = (x @ teacher).argmax(dim=1)
    split = n - VAL
    return DatasetProvider(
        {"train": TensorDataset(x[:split], y[:split]), "val": TensorDataset(x[split:], y[split:])},
        default={"batch_size": BATCH, "shuffle": True, "seed": seed},
    )


def config(steps: int, width: int, checkpoint_every: int | None = None) -> dict[str, Any]:
    """The base config: SGD on the MLP for ``steps`` steps, evaluated every epoch, checkpointed at the end
    (and every ``checkpoint_every`` steps, which PBT's perturbation interval needs)."""
    checkpoint: dict[str, Any] = {"keep": 1, "every_epochs": None}
    checkpoint["every_steps"] = checkpoint_every or steps
    return {
        "name": "scaling",
        "seed": 0,
        "model": {
            "module": {"cls": "tuning_children.mlp", "width": width},
            "criterion": {"cls": "torch.nn.CrossEntropyLoss"},
            "optimizer": {"cls": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9},
            "device": "cpu",
        },
        "data": {"cls": "tuning_children.provider"},
        "stages": [{"name": "train", "data": "train", "max_steps": steps}],
        "updates": [{"cls": "ptutils.update.Evaluate", "data": "val"}],
        "checkpoint": checkpoint,
        "status_interval": 1.0,
    }
