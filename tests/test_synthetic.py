"""Generated datasets: the same arguments give the same data anywhere; bad ones name the field."""

from __future__ import annotations

import pytest
import torch

from ptutils.errors import ConfigError
from ptutils.synthetic import classification


def test_the_same_arguments_give_the_same_splits_and_labels_follow_a_teacher():
    a, b = classification(n=400, features=5, classes=3, seed=1), classification(n=400, features=5, classes=3, seed=1)
    for split, size in (("train", 200), ("val", 100), ("test", 100)):
        xa, ya = a.datasets[split].tensors
        xb, yb = b.datasets[split].tensors
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and len(ya) == size
    labels = torch.cat([a.datasets[s].tensors[1] for s in ("train", "val", "test")])
    assert set(labels.tolist()) == {0, 1, 2}
    other = classification(n=400, features=5, classes=3, seed=2)
    assert not torch.equal(other.datasets["train"].tensors[0], a.datasets["train"].tensors[0])
    batch = next(iter(a.get_dataloader("train")))
    assert batch[0].shape == (32, 5)


@pytest.mark.parametrize("kwargs, field", [
    ({"n": 0}, "data.n"), ({"classes": 1}, "data.classes"), ({"noise": 1.5}, "data.noise"),
    ({"split": (0.5, 0.5, 0.5)}, "data.split"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        classification(**kwargs)
