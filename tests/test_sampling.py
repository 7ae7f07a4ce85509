"""ptutils.sampling: resumable sampling, and exact resume through the loaders it positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from ptutils.data import Dataset, LoaderSettings, make_dataloader
from ptutils.sampling import ResumableSampler, set_loader_position

from .support.loaders import run_epoch, same, toy_dataset


def add_noise(image: torch.Tensor) -> torch.Tensor:
    """A random augmentation (module level, so workers can use it)."""
    return image.float() + torch.rand(image.shape)


@pytest.fixture
def toy() -> Dataset:
    """60 records: image[i] (2x3) is filled with i, label[i] is i % 7."""
    return toy_dataset()


# ----------------------------------------------------------------------------- ResumableSampler


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(0, 300),
    chunk=st.one_of(st.none(), st.integers(1, 40)),
    window=st.integers(1, 4),
    seed=st.integers(0, 2**40),
    epoch=st.integers(0, 1000),
    shuffle=st.booleans(),
)
def test_every_index_exactly_once_per_epoch(
    length: int, chunk: int | None, window: int, seed: int, epoch: int, shuffle: bool
) -> None:
    sampler = ResumableSampler(length, shuffle=shuffle, seed=seed, chunk_size=chunk, window=window)
    order = sampler.order(epoch).tolist()
    assert sorted(order) == list(range(length))
    again = ResumableSampler(length, shuffle=shuffle, seed=seed, chunk_size=chunk, window=window)
    assert order == again.order(epoch).tolist()
    start = length // 3
    sampler.set_position(epoch, start)
    assert list(sampler) == order[start:]


def test_order_depends_on_seed_and_epoch_only_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = ResumableSampler(100, seed=1)
    assert a.order(0).tolist() != a.order(1).tolist()
    assert a.order(0).tolist() != ResumableSampler(100, seed=2).order(0).tolist()
    assert ResumableSampler(100, shuffle=False).order(5).tolist() == list(range(100))
    list(a)
    assert torch.equal(torch.get_rng_state(), state)


def test_chunk_aware_shuffle_mixes_whole_chunks_within_windows() -> None:
    sampler = ResumableSampler(96, seed=0, chunk_size=8, window=3)
    order = np.array(sampler.order(0).tolist())
    for w in range(0, 96, 24):
        chunks = set((order[w : w + 24] // 8).tolist())
        assert len(chunks) == 3  # each window is exactly three whole chunks
        assert sorted(order[w : w + 24].tolist()) == sorted(i for c in chunks for i in range(c * 8, c * 8 + 8))
    assert order.tolist() != sorted(order.tolist())


def test_passes_advance_the_epoch_and_positions_apply_once() -> None:
    sampler = ResumableSampler(10, seed=4)
    first, second = list(sampler), list(sampler)
    assert first == sampler.order(0).tolist() and second == sampler.order(1).tolist()
    sampler.set_position(0, 7)
    assert list(sampler) == sampler.order(0).tolist()[7:]
    assert list(sampler) == sampler.order(1).tolist()  # the skip held for one pass only
    sampler.set_epoch(9)
    assert list(sampler) == sampler.order(9).tolist()
    with pytest.raises(ValueError):
        sampler.set_position(0, 11)


def test_state_dict_round_trip_mid_pass() -> None:
    sampler = ResumableSampler(20, seed=8)
    sampler.set_epoch(3)
    it = iter(sampler)
    taken = [next(it) for _ in range(6)]
    state = sampler.state_dict()
    assert state == {"length": 20, "seed": 8, "epoch": 3, "start": 6}
    assert all(type(v) is int for v in state.values())
    other = ResumableSampler(20, seed=0)
    other.load_state_dict(state)
    assert taken + list(other) == sampler.order(3).tolist()
    assert other.state_dict()["epoch"] == 4 and other.state_dict()["start"] == 0
    with pytest.raises(ValueError, match="20 samples"):
        ResumableSampler(21).load_state_dict(state)


# ----------------------------------------------------------------------------- exact resume through loaders


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_sees_exactly_the_same_batches(toy: Dataset, workers: int) -> None:
    augmented = Dataset(toy.reader, transform=add_noise)
    options = LoaderSettings(batch_size=7, shuffle=True, seed=11, num_workers=workers)
    reference = make_dataloader(augmented, options)
    assert set_loader_position(reference, 0, 0)
    epoch0 = run_epoch(reference)
    assert set_loader_position(reference, 1, 0)
    epoch1 = run_epoch(reference)
    assert not same(epoch0, epoch1)

    interrupted = make_dataloader(augmented, options)
    set_loader_position(interrupted, 0, 0)
    done = run_epoch(interrupted, limit=3)
    restarted = make_dataloader(Dataset(toy.reader, transform=add_noise), options)  # as after a restart
    assert set_loader_position(restarted, 0, len(done))
    assert same(done + run_epoch(restarted), epoch0)
    assert same(run_epoch(restarted), epoch1)  # the next pass is epoch 1, unprompted
    assert set_loader_position(restarted, 1, 0)
    assert same(run_epoch(restarted), epoch1)


def test_resume_at_the_end_of_an_epoch_and_bad_positions(toy: Dataset) -> None:
    loader = make_dataloader(toy, batch_size=7, shuffle=True, drop_last=True)
    batches = len(loader)
    assert batches == 60 // 7
    assert set_loader_position(loader, 2, batches)
    assert run_epoch(loader) == []
    with pytest.raises(ValueError, match="exceeds"):
        set_loader_position(loader, 2, batches + 1)
    last = make_dataloader(toy, batch_size=7)  # 9 batches, the last one of 4
    assert set_loader_position(last, 0, 8)
    assert [len(b[1]) for b in run_epoch(last)] == [4]


def test_loader_iteration_leaves_the_global_rng_alone(toy: Dataset) -> None:
    loader = make_dataloader(Dataset(toy.reader, transform=add_noise), batch_size=8, shuffle=True)
    state = torch.get_rng_state()
    run_epoch(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_set_loader_position_reports_loaders_it_cannot_position(toy: Dataset) -> None:
    assert not set_loader_position(DataLoader(toy, batch_size=4, shuffle=True), 1, 2)
    assert not set_loader_position(DataLoader(toy, batch_sampler=[[0, 1], [2, 3]]), 0, 1)
    own = ResumableSampler(len(toy), seed=5)
    plain = DataLoader(toy, batch_size=4, sampler=own)  # torch's own BatchSampler around ours
    assert set_loader_position(plain, 2, 3)
    assert [i for b in plain for i in b[1].tolist()] == [i % 7 for i in own.order(2).tolist()[12:]]
    unbatched = DataLoader(toy, batch_size=None, sampler=ResumableSampler(len(toy), shuffle=False))
    assert set_loader_position(unbatched, 0, 58)
    assert [int(lab) for _, lab in unbatched] == [58 % 7, 59 % 7]
