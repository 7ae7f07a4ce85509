"""HDF5Reader: exact values, worker safety, bad files."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch

from ptutils.data import Dataset, ImageNet, make_dataloader, set_loader_position
from ptutils.errors import DataError
from ptutils.readers import HDF5Reader

from .support.datagen import write_hdf5


@pytest.fixture
def h5(tmp_path):
    """An HDF5 file of 100 NCHW images in chunks of 16, with labels."""
    path = tmp_path / "images.h5"
    images, labels = write_hdf5(path, 100)
    return path, images, labels


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_reads_match_the_file_exactly(tmp_path, compression) -> None:
    path = tmp_path / "images.h5"
    images, labels = write_hdf5(path, 100, compression=compression)
    reader = HDF5Reader(path)
    assert len(reader) == 100 and reader.fields == ("images", "labels") and reader.chunk_size == 16
    image, label = reader.read(7)
    assert np.array_equal(image, images[7]) and label == labels[7]
    got_images, got_labels = reader.read(slice(10, 50))
    assert np.array_equal(got_images, images[10:50]) and np.array_equal(got_labels, labels[10:50])
    rng = np.random.default_rng(0)
    for _ in range(20):  # scattered, clustered and contiguous index sets
        idx = np.unique(rng.choice(100, rng.integers(1, 60), replace=False))
        got_images, got_labels = reader.read(idx)
        assert np.array_equal(got_images, images[idx]) and np.array_equal(got_labels, labels[idx])
    empty_images, _ = reader.read(np.array([], dtype=np.int64))
    assert empty_images.shape == (0, 3, 8, 8)


def test_reads_unchunked_datasets_and_preloading_off(tmp_path) -> None:
    path = tmp_path / "contiguous.h5"
    images, labels = write_hdf5(path, 40, chunk=None)
    reader = HDF5Reader(path, preload_bytes=0, max_gap=0)
    idx = np.array([0, 1, 2, 9, 30, 31, 39])
    got_images, got_labels = reader.read(idx)
    assert np.array_equal(got_images, images[idx]) and np.array_equal(got_labels, labels[idx])
    assert reader.chunk_size is None


def test_dataset_batches_through_a_loader_equal_the_source(h5) -> None:
    path, images, labels = h5
    loader = make_dataloader(Dataset(HDF5Reader(path)), batch_size=32, shuffle=True, seed=1)
    order = loader.batch_sampler.sampler.order(0)
    seen_images, seen_labels = zip(*[(x, y) for x, y in loader])
    assert torch.equal(torch.cat(seen_images), torch.from_numpy(images)[order])
    assert torch.equal(torch.cat(seen_labels), torch.from_numpy(labels)[order])


def cache_of(reader: HDF5Reader) -> tuple[int, int, float]:
    """``(nslots, nbytes, w0)`` of the chunk cache the reader's (chunked) images got."""
    return reader._columns[0].id.get_access_plist().get_chunk_cache()


def test_chunk_cache_settings_reach_the_datasets(h5, tmp_path, caplog) -> None:
    path, _, _ = h5
    reader = HDF5Reader(path, rdcc_nbytes=4 << 20, rdcc_nslots=1009, rdcc_w0=0.5, preload_bytes=0)
    reader.read(0)
    assert cache_of(reader) == (1009, 4 << 20, 0.5)
    reader.close()
    plain = HDF5Reader(path, preload_bytes=0)
    plain.read(0)
    assert cache_of(plain)[1] == 0  # unfiltered: records are read straight from the file
    packed = tmp_path / "gzip.h5"
    write_hdf5(packed, 100, compression="gzip")
    gz = HDF5Reader(packed, preload_bytes=0)
    gz.read(0)
    assert cache_of(gz)[1] == 1 << 20  # a compressed chunk is decoded once per batch
    gz.close()
    with h5py.File(packed, "r") as f, caplog.at_level("WARNING", logger="ptutils"):
        held = f["images"]  # someone else holds the dataset open, with h5py's cache
        again = HDF5Reader(packed, preload_bytes=0)
        assert np.array_equal(again.read(3)[0], held[3])
    assert "already open in this process" in caplog.text


def test_pickles_without_an_open_handle(h5) -> None:
    path, images, _ = h5
    reader = HDF5Reader(path)
    reader.read(0)
    assert reader._file is not None
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._file is None
    assert np.array_equal(clone.read(3)[0], images[3])
    reader.close()
    assert reader._file is None and np.array_equal(reader.read(4)[0], images[4])  # reopens


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_two_workers_read_correctly(h5, context) -> None:
    path, images, labels = h5
    dataset = Dataset(HDF5Reader(path))
    dataset[0]  # the parent holds an open handle when the workers start
    loader = make_dataloader(dataset, batch_size=20, num_workers=2, multiprocessing_context=context)
    got = list(loader)
    assert torch.equal(torch.cat([x for x, _ in got]), torch.from_numpy(images))
    assert torch.equal(torch.cat([y for _, y in got]), torch.from_numpy(labels))


def test_resume_through_two_workers_repeats_the_epoch_exactly(h5) -> None:
    path, _, _ = h5
    dataset = ImageNet(path)
    options = {"batch_size": 16, "shuffle": True, "seed": 5, "num_workers": 2}
    reference = make_dataloader(dataset, **options)
    set_loader_position(reference, 1, 0)
    epoch1 = [(x.clone(), y.clone()) for x, y in reference]
    resumed = make_dataloader(ImageNet(path), **options)
    assert set_loader_position(resumed, 1, 3)
    rest = list(resumed)
    assert len(rest) == len(epoch1) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch1[3:], rest))


def test_bad_files_and_keys_name_the_file(tmp_path, h5) -> None:
    path, _, _ = h5
    missing = tmp_path / "missing.h5"
    with pytest.raises(DataError, match="no such file") as err:
        HDF5Reader(missing)
    assert err.value.file == str(missing)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="cannot open as HDF5"):
        HDF5Reader(junk)
    with pytest.raises(DataError, match=r"no dataset 'pixels' \(datasets in the file: \['images', 'labels'\]\)"):
        HDF5Reader(path, keys=("pixels", "labels"))
    with h5py.File(path, "a") as f:
        f.create_dataset("short", data=np.zeros(99))
        f.create_dataset("scalar", data=1.0)
        f.create_group("group")
    with pytest.raises(DataError, match=r"different lengths: \{'images': 100, 'short': 99\}") as err:
        HDF5Reader(path, keys=("images", "short"))
    assert err.value.file == str(path)
    with pytest.raises(DataError, match="scalar"):
        HDF5Reader(path, keys="scalar")
    with pytest.raises(DataError, match="not a dataset"):
        HDF5Reader(path, keys="group")
    with pytest.raises(DataError, match="index 100") as err:
        HDF5Reader(path).read(100)
    assert err.value.index == 100


def test_corrupt_chunk_names_the_record(tmp_path) -> None:
    path = tmp_path / "corrupt.h5"
    images, _ = write_hdf5(path, 64, compression="gzip")
    with h5py.File(path, "r") as f:
        info = f["images"].id.get_chunk_info(2)  # records 32..47
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\xff" * info.size)
    reader = HDF5Reader(path)
    assert np.array_equal(reader.read(slice(0, 32))[0], images[:32])
    with pytest.raises(DataError, match="index 32") as err:
        reader.read(np.arange(20, 40))
    assert err.value.file == str(path) and err.value.index == 32
