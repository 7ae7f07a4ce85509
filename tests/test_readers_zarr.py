"""ZarrReader: exact values from arrays, groups and store URLs; workers; bad stores."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import zarr

from ptutils.data import Dataset, make_dataloader
from ptutils.errors import DataError
from ptutils.readers import ZarrReader

from .support.datagen import write_zarr


@pytest.fixture
def store(tmp_path):
    """A local zarr v3 group with 100 images in chunks of 16, and labels."""
    path = tmp_path / "images.zarr"
    images, labels = write_zarr(path, 100)
    return path, images, labels


def check_reads(reader: ZarrReader, images: np.ndarray, labels: np.ndarray) -> None:
    image, label = reader.read(9)
    assert np.array_equal(image, images[9]) and label == labels[9]
    got = reader.read(slice(5, 70))
    assert np.array_equal(got[0], images[5:70]) and np.array_equal(got[1], labels[5:70])
    rng = np.random.default_rng(0)
    for _ in range(10):
        idx = np.unique(rng.choice(len(images), rng.integers(1, len(images)), replace=False))
        got = reader.read(idx)
        assert np.array_equal(got[0], images[idx]) and np.array_equal(got[1], labels[idx])


@pytest.mark.parametrize("preload_bytes", [0, 1 << 20])
def test_group_reads_match_the_store_exactly(store, preload_bytes) -> None:
    path, images, labels = store
    reader = ZarrReader(path, preload_bytes=preload_bytes)
    assert len(reader) == 100 and reader.fields == ("images", "labels") and reader.chunk_size == 16
    assert reader.shapes == {"images": (100, 3, 8, 8), "labels": (100,)}
    check_reads(reader, images, labels)


def test_single_arrays_and_open_objects(store) -> None:
    path, images, labels = store
    array = ZarrReader(path / "images")
    assert array.fields == ("images",)
    assert np.array_equal(array.read(np.array([3, 4, 50]))[0], images[[3, 4, 50]])
    renamed = ZarrReader(path / "labels", keys="y")
    assert renamed.fields == ("y",) and renamed.read(4)[0] == labels[4]
    check_reads(ZarrReader(zarr.open_group(path, mode="r")), images, labels)


def test_store_urls(store) -> None:
    pytest.importorskip("fsspec", reason="zarr opens URLs through fsspec")
    path, images, labels = store
    check_reads(ZarrReader(f"file://{os.path.abspath(path)}"), images, labels)
    url = "memory://ptutils-test/images.zarr"
    images, labels = write_zarr(url, 40, chunk=8)
    check_reads(ZarrReader(url), images, labels)


def test_pickles_and_reads_in_two_workers(store) -> None:
    path, images, labels = store
    dataset = Dataset(ZarrReader(path))
    dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.reader._columns == [] and torch.equal(clone[5][0], torch.from_numpy(images[5]))
    loader = make_dataloader(dataset, batch_size=16, shuffle=True, seed=3, num_workers=2, chunk_size="auto")
    order = loader.batch_sampler.sampler.order(0)
    got = list(loader)
    assert torch.equal(torch.cat([x for x, _ in got]), torch.from_numpy(images)[order])
    assert torch.equal(torch.cat([y for _, y in got]), torch.from_numpy(labels)[order])


def test_bad_stores_name_the_source(tmp_path, store) -> None:
    path, _, _ = store
    with pytest.raises(DataError, match="no zarr array or group") as err:
        ZarrReader(tmp_path / "missing.zarr")
    assert err.value.file == str(tmp_path / "missing.zarr")
    with pytest.raises(DataError, match=r"no array 'pixels' \(arrays in the group: \['images', 'labels'\]\)"):
        ZarrReader(path, keys=("pixels", "labels"))
    group = zarr.open_group(path, mode="a")
    group.create_array("short", shape=(99,), dtype="f4")
    group.create_group("sub")
    with pytest.raises(DataError, match=r"different lengths: \{'images': 100, 'short': 99\}"):
        ZarrReader(path, keys=("images", "short"))
    with pytest.raises(DataError, match="not an array"):
        ZarrReader(path, keys=("images", "sub"))
    with pytest.raises(DataError, match="one field"):
        ZarrReader(path / "images", keys=("a", "b"))
    with pytest.raises(DataError, match="index -101"):
        ZarrReader(path).read(-101)


def test_corrupt_chunk_names_the_record(tmp_path) -> None:
    path = tmp_path / "corrupt.zarr"
    images, _ = write_zarr(path, 64, chunk=16)
    chunk = path / "images" / "c" / "2" / "0" / "0" / "0"  # records 32..47
    assert chunk.exists()
    chunk.write_bytes(b"\x00garbage, not zstd")
    reader = ZarrReader(path)
    assert np.array_equal(reader.read(slice(0, 32))[0], images[:32])
    with pytest.raises(DataError, match="index 32") as err:
        reader.read(np.arange(20, 40))
    assert err.value.index == 32 and err.value.file == str(path)
