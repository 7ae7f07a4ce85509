"""Small generated datasets, named in a config like any data spec: a run to try, a test or a doc needs no files.

``{"cls": "ptutils.synthetic.classification", "n": 1024, "features": 8, "classes": 2}``
gives a :class:`~ptutils.data.DatasetProvider` whose ``train``, ``val`` and
``test`` splits are labelled by a fixed random teacher network (with some
labels flipped), the same for the same arguments in every process: a pool
worker or a Ray task rebuilding a child from its stored config gets the very
same data.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from .data import DatasetProvider
from .errors import ConfigError

SPLITS = ("train", "val", "test")


def classification(n: int = 1024, features: int = 8, classes: int = 2, *, hidden: int = 16, noise: float = 0.1,
                   split: tuple[float, float, float] = (0.5, 0.25, 0.25), batch_size: int = 32,
                   seed: int = 0) -> DatasetProvider:
    """``n`` Gaussian inputs labelled by a random tanh network into ``classes``, ``noise`` of labels redrawn."""
    for field, value in (("n", n), ("features", features), ("classes", classes), ("hidden", hidden),
                         ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (2 if field == "classes" else 1):
            raise ConfigError(f"data.{field}", f"expected a positive number, got {value!r}")
    if not 0 <= noise <= 1:
        raise ConfigError("data.noise", f"expected a fraction in [0, 1], got {noise!r}")
    if len(split) != 3 or abs(sum(split) - 1) > 1e-9 or min(split) < 0:
        raise ConfigError("data.split", f"expected three fractions (train, val, test) adding up to 1, got {split!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w1 = torch.randn(features, hidden, generator=g) / features**0.5
    w2 = torch.randn(hidden, classes, generator=g) / hidden**0.5
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    y = torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)
    cut1 = int(n * split[0])
    cut2 = cut1 + int(n * split[1])
    parts = {"train": slice(0, cut1), "val": slice(cut1, cut2), "test": slice(cut2, n)}
    return DatasetProvider({name: TensorDataset(x[s], y[s]) for name, s in parts.items()},
                           default={"batch_size": batch_size, "shuffle": True, "seed": seed})
