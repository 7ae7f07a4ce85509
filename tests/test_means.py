"""ptutils.means: per-step values averaged over an epoch, folded on the device, resumable mid-epoch."""

from __future__ import annotations

import torch

from ptutils.checkpoint import deserialize, serialize
from ptutils.means import FOLD, EpochMeans


def steps(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"loss": torch.rand((), generator=g), "accuracy": torch.rand((), generator=g)} for _ in range(n)]


def feed(means: EpochMeans, values: list[dict[str, torch.Tensor]]) -> None:
    """What the loop does: append the loss itself, add the metrics, fold every FOLD values."""
    for step in values:
        means.values["loss"].append(step["loss"])
        means.add({"accuracy": step["accuracy"]})
        if len(means.values["loss"]) >= FOLD:
            means.fold()


def test_take_gives_the_epoch_means_with_the_prefix_and_starts_afresh() -> None:
    values = steps(FOLD + 5)
    means = EpochMeans()
    feed(means, values)
    assert len(means.values["loss"]) == 5 and means.counts == {"loss": FOLD, "accuracy": FOLD}  # folded once
    taken = means.take("train")
    expected = torch.stack([v["loss"] for v in values]).double().mean().item()
    assert taken.keys() == {"train_loss", "train_accuracy"}
    assert abs(taken["train_loss"] - expected) < 1e-12
    assert means.take("train") == {} and means.values["loss"] == []


def test_an_epoch_checkpointed_half_way_ends_with_bitwise_the_same_means() -> None:
    values = steps(FOLD + 300, seed=1)
    whole = EpochMeans()
    feed(whole, values)
    expected = whole.take("train")
    for cut in (7, FOLD, FOLD + 1, FOLD + 299):
        first = EpochMeans()
        feed(first, values[:cut])
        resumed = EpochMeans()
        resumed.load_state_dict(deserialize(serialize(first.state_dict())))
        feed(resumed, values[cut:])
        assert resumed.take("train") == expected, cut  # the floats, compared exactly
