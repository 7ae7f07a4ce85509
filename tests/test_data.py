"""ptutils.data: the readers' base, datasets over readers, and providers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import RandomSampler, SequentialSampler

from ptutils.data import (
    ArrayReader,
    DataIndexError,
    DataProvider,
    Dataset,
    DatasetProvider,
    LoaderSettings,
    ResumableSampler,
    check_index,
    check_requests,
    coalesce_runs,
    make_dataloader,
    set_loader_position,
)
from ptutils.errors import ConfigError, DataError

from .support.loaders import toy_dataset


@pytest.fixture
def toy() -> Dataset:
    """60 records: image[i] (2x3) is filled with i, label[i] is i % 7."""
    return toy_dataset()


# ----------------------------------------------------------------------------- readers and datasets


def test_check_index_normalises_and_names_the_source() -> None:
    assert check_index(-1, 5) == 4
    assert check_index(slice(1, None), 5) == slice(1, 5)
    assert check_index(np.array([0, 3]), 5).tolist() == [0, 3]
    with pytest.raises(DataIndexError, match=r"file 'data.h5', index 5") as err:
        check_index(5, 5, "data.h5")
    assert isinstance(err.value, IndexError) and err.value.index == 5 and err.value.file == "data.h5"
    with pytest.raises(DataError, match="strictly increasing"):
        check_index(np.array([3, 1]), 5, "x")
    with pytest.raises(DataError, match="step 1"):
        check_index(slice(0, 4, 2), 5, "x")
    with pytest.raises(DataError, match="index 9"):
        check_index(np.array([1, 9]), 5, "x")


@given(st.lists(st.integers(0, 200), unique=True), st.integers(0, 5))
def test_coalesce_runs_cover_exactly_the_indices(values: list[int], gap: int) -> None:
    idx = np.array(sorted(values), dtype=np.int64)
    spans = coalesce_runs(idx, gap)
    covered = [i for start, stop in spans for i in idx.tolist() if start <= i < stop]
    assert covered == idx.tolist()
    for (_, stop), (start, _) in itertools.pairwise(spans):
        assert start - stop > gap  # spans closer than the gap would have merged
    for start, stop in spans:
        inside = idx[(idx >= start) & (idx < stop)]
        assert inside[0] == start and inside[-1] == stop - 1
        assert np.all(np.diff(inside) <= gap + 1)


def test_array_reader_rejects_mismatched_lengths_and_scalars() -> None:
    with pytest.raises(DataError, match="different lengths"):
        ArrayReader(images=np.zeros((3, 2)), labels=np.zeros(4))
    with pytest.raises(DataError, match="scalar"):
        ArrayReader(x=np.float32(1))


def test_dataset_samples_are_tensors_and_python_labels(toy: Dataset) -> None:
    image, label = toy[8]
    assert isinstance(image, torch.Tensor) and image.shape == (2, 3) and float(image[0, 0]) == 8.0
    assert label == 8 % 7 and isinstance(label, int)
    assert toy[-1][1] == 59 % 7
    assert len(list(iter(toy))) == 60  # plain iteration stops at the IndexError
    single = Dataset(ArrayReader(x=np.arange(4)))
    assert single[2] == 2  # one field: the value itself, not a 1-tuple


def test_getitems_returns_the_requested_order_with_duplicates(toy: Dataset) -> None:
    samples = toy.__getitems__([5, 1, 5, 59, 0])
    assert [int(img[0, 0]) for img, _ in samples] == [5, 1, 5, 59, 0]
    assert [label for _, label in samples] == [5 % 7, 1, 5 % 7, 59 % 7, 0]


def test_transforms_apply_to_input_and_target(toy: Dataset) -> None:
    ds = Dataset(toy.reader, transform=lambda x: x * 2, target_transform=lambda y: y + 100)
    image, label = ds[3]
    assert float(image[0, 0]) == 6.0 and label == 103
    batch = ds.__getitems__([3, 4])
    assert [lab for _, lab in batch] == [103, 104]


# ----------------------------------------------------------------------------- providers


def test_provider_answers_names_and_dict_requests(toy: Dataset) -> None:
    provider = DatasetProvider(
        {"train": toy, "test": toy},
        {"train": {"batch_size": 8, "shuffle": True, "seed": 2}},
        default=LoaderSettings(batch_size=16),
    )
    assert isinstance(provider, DataProvider)
    test = provider.get_dataloader("test")
    assert test.batch_sampler.batch_size == 16 and isinstance(test.batch_sampler.sampler, ResumableSampler)
    assert next(iter(test))[1].tolist() == [i % 7 for i in range(16)]
    train = provider.get_dataloader({"dataset": "train", "stage": "train", "epoch": 3, "metrics": {"loss": 1.0}})
    assert train.batch_sampler.batch_size == 8
    assert train.batch_sampler.sampler.state_dict()["epoch"] == 3
    bigger = provider.get_dataloader({"stage": "train", "batch_size": 30, "drop_last": True})
    assert [len(b[1]) for b in bigger] == [30, 30]


def test_provider_rejects_bad_requests_and_settings(toy: Dataset) -> None:
    provider = DatasetProvider({"train": toy})
    with pytest.raises(ConfigError, match="no dataset 'val'; known: train$"):
        provider.get_dataloader("val")
    with pytest.raises(ConfigError, match="request.dataset"):
        provider.get_dataloader({"epoch": 1})
    with pytest.raises(ConfigError, match="loaders.train.batchsize"):
        DatasetProvider({"train": toy}, {"train": {"batchsize": 3}})
    with pytest.raises(ConfigError, match="loaders.nope"):
        DatasetProvider({"train": toy}, {"nope": {}})
    with pytest.raises(ConfigError, match="batch_size"):
        LoaderSettings(batch_size=0)
    with pytest.raises(ConfigError, match="shuffle"):
        LoaderSettings(shuffle=True, sampler=SequentialSampler(range(3)))


def test_provider_takes_custom_samplers_and_iterable_datasets(toy: Dataset) -> None:
    class Numbers(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(10))

    provider = DatasetProvider(
        {"train": toy, "stream": Numbers()},
        {"train": {"sampler": lambda ds: RandomSampler(ds, generator=torch.Generator().manual_seed(0))}},
        default={"batch_size": 4},
    )
    loader = provider.get_dataloader("train")
    assert isinstance(loader.sampler, RandomSampler)
    assert not set_loader_position(loader, 0, 1)  # the caller must skip batches itself
    assert [b.tolist() for b in provider.get_dataloader("stream")] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_subclass_can_route_requests_on_session_state(toy: Dataset) -> None:
    class Curriculum(DatasetProvider):
        """Small batches until the loss is low, then large ones."""

        def resolve(self, request):
            name, options = super().resolve(request)
            if request.get("metrics", {}).get("loss", 1.0) < 0.1:
                options = options.replace(batch_size=options.batch_size * 4)
            return name, options

    provider = Curriculum({"train": toy}, default={"batch_size": 5})
    assert provider.get_dataloader({"dataset": "train", "metrics": {"loss": 0.5}}).batch_sampler.batch_size == 5
    assert provider.get_dataloader({"dataset": "train", "metrics": {"loss": 0.01}}).batch_sampler.batch_size == 20


def test_requests_are_checked_without_building_a_loader_and_errors_name_who_asked(toy: Dataset) -> None:
    provider = DatasetProvider({"train": toy, "val": toy})
    provider.check_request({"dataset": "val", "batch_size": 8})
    with pytest.raises(ConfigError, match="'request.dataset': no dataset 'vall'; known: train, val$"):
        provider.check_request("vall")
    with pytest.raises(ConfigError, match=r"'updates\[0\]': no dataset 'vall'; known: train, val$"):
        check_requests(provider, [("stages.train.data", "train"), ("updates[0]", "vall")])
    with pytest.raises(ConfigError, match=r"'stages.a.data.batch_size': expected an int >= 1"):
        check_requests(provider, [("stages.a.data", {"dataset": "train", "batch_size": 0})])

    class Anything(DataProvider):
        """A provider that cannot tell a request it answers from one it does not before it is asked."""

        def get_dataloader(self, request):
            return make_dataloader(toy)

    check_requests(Anything(), [("updates[0]", "vall")])
    check_requests(provider, [("stages.a.data", None), ("stages.b.data", lambda session: "vall")])  # made at run time
