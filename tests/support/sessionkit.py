"""Tiny, fast sessions for the session tests: a linear classifier on separable data."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from ptutils.data import DatasetProvider
from ptutils.model import Model, accuracy
from ptutils.session import Session


def provider(n: int = 96, features: int = 8, batch_size: int = 16, seed: int = 0) -> DatasetProvider:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    split = n * 3 // 4
    return DatasetProvider(
        {"train": TensorDataset(x[:split], y[:split]), "val": TensorDataset(x[split:], y[split:])},
        default={"batch_size": batch_size, "shuffle": True, "seed": seed},
    )


def model(seed: int = 0, lr: float = 0.1, dropout: float = 0.0) -> Model:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 2))
    return Model(module, torch.nn.CrossEntropyLoss(), {"cls": "torch.optim.SGD", "lr": lr, "momentum": 0.9},
                 metrics={"accuracy": accuracy}, device="cpu")


def session(db: Any, **kwargs: Any) -> Session:
    kwargs.setdefault("stages", [{"name": "train", "data": "train", "max_epochs": 3}])
    kwargs.setdefault("name", "tiny")
    kwargs.setdefault("status_interval", 0.05)
    dropout = kwargs.pop("dropout", 0.0)
    m = kwargs.pop("model", None) or model(dropout=dropout)
    return Session(m, kwargs.pop("data", None) or provider(), db=db, **kwargs)


def weights(s: Session) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in s.model.module.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
