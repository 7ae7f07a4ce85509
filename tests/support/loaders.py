"""A small dataset and loader passes, for the tests of ptutils.data, ptutils.sampling and ptutils.batches."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ptutils.data import ArrayReader, Dataset


def toy_dataset() -> Dataset:
    """60 records of a 2x3 float image and an int label: image[i] is filled with i."""
    images = np.repeat(np.arange(60, dtype=np.float32), 6).reshape(60, 2, 3)
    return Dataset(ArrayReader(images=images, labels=np.arange(60) % 7))


def run_epoch(loader: DataLoader, limit: int | None = None) -> list[list[torch.Tensor]]:
    """The batches of one pass over ``loader`` (the first ``limit`` only, if given)."""
    out = []
    for k, batch in enumerate(loader):
        if limit is not None and k == limit:
            break
        out.append([t.clone() for t in batch])
    return out


def same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    """Whether two lists of batches hold equal tensors, batch by batch."""
    return len(a) == len(b) and all(
        len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y)) for x, y in zip(a, b)
    )
