"""ptutils.batches: batches a Dataset collates itself, and their shared-memory way out of workers."""

from __future__ import annotations

from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from ptutils.batches import Samples, _SharedBatch, collate
from ptutils.data import ArrayReader, Dataset, make_dataloader
from ptutils.errors import DataError
from ptutils.sampling import set_loader_position

from .support.loaders import run_epoch, same


def test_precollated_batches_equal_default_collate() -> None:
    n = 23
    rng = np.random.default_rng(0)
    reader = ArrayReader(
        image=rng.random((n, 2, 2), dtype=np.float32),
        label=rng.integers(0, 9, n).astype(np.int32),
        weight=rng.random(n, dtype=np.float32),
        flag=rng.random(n) > 0.5,
        vector=rng.integers(0, 5, (n, 4)).astype(np.uint8),
    )
    ds = Dataset(reader)
    ours = run_epoch(make_dataloader(ds, batch_size=5))
    plain = run_epoch(DataLoader(ds, batch_size=5, collate_fn=default_collate))
    assert same(ours, plain)
    assert [t.dtype for t in ours[0]] == [torch.float32, torch.int64, torch.float64, torch.bool, torch.uint8]


def test_shared_batches_pickle_as_plain_owned_tensors_and_free_their_block() -> None:
    value = [
        torch.arange(24, dtype=torch.uint8).view(2, 3, 4),
        torch.tensor([5, -1]),
        torch.tensor([True, False]),
        torch.zeros(0, 3),
        torch.ones(2, dtype=torch.bfloat16),
    ]
    packed = _SharedBatch(value)
    assert int(packed.block[0]) == 1  # busy until the receiver copied it out
    got = ForkingPickler.loads(bytes(ForkingPickler.dumps(packed)))
    assert type(got) is list and all(type(t) is torch.Tensor for t in got)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, value))
    assert int(packed.block[0]) == 0
    got[0] += 1  # the receiver's tensors are its own, not views of the reused block
    again = _SharedBatch(torch.full((5,), 7.0))
    assert again.block.data_ptr() == packed.block.data_ptr()  # the freed block is reused
    assert torch.equal(ForkingPickler.loads(bytes(ForkingPickler.dumps(again))), torch.full((5,), 7.0))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_batches_from_workers_stay_intact_while_their_blocks_are_reused(context: str) -> None:
    n = 203
    images = np.arange(n * 12, dtype=np.int16).reshape(n, 3, 4)
    ds = Dataset(ArrayReader(images=images, labels=np.arange(n) * 3))
    options = {"batch_size": 10, "shuffle": True, "seed": 4, "num_workers": 2, "multiprocessing_context": context}
    plain = make_dataloader(ds, **{**options, "num_workers": 0})
    loader = make_dataloader(ds, **options, persistent_workers=True)
    kept = []  # every batch stays referenced: a reused block must never overwrite one
    for epoch in range(3):
        set_loader_position(plain, epoch, 0)
        expected = list(plain)
        set_loader_position(loader, epoch, 0)
        for k, batch in enumerate(loader):
            if epoch == 1 and k == 4:
                break  # an abandoned pass leaves batches in flight
            kept.append((batch, expected[k]))
    set_loader_position(loader, 1, 0)
    set_loader_position(plain, 1, 0)
    kept += list(zip(loader, plain))
    assert len(kept) == 21 + 4 + 21 + 21
    for (x, y), (ex, ey) in kept:
        assert x.dtype == torch.int16 and y.dtype == torch.int64
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_samples_of_different_sizes_are_named_with_their_sizes_not_torchs_stack_error() -> None:
    batch = [(torch.zeros(3, 4, 4), 0), (torch.zeros(3, 4, 4), 1), (torch.zeros(3, 6, 5), 0)]
    with pytest.raises(DataError, match=r"different sizes in one batch \(field 0\).*3x4x4: sample 0 of the batch, "
                                        r"sample 1 of the batch; 3x6x5: sample 2 of the batch; .*v2.Resize"):
        collate(batch)
    named = Samples(batch, lambda j: f"index {10 + j}", "somewhere")
    with pytest.raises(DataError, match=r"^file 'somewhere': .*3x4x4: index 10, index 11; 3x6x5: index 12"):
        collate(named)
