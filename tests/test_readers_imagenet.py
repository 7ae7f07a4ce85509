"""ImageNet over HDF5: layouts, splits and transforms, shape errors, workers, and its old import path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from ptutils.data import make_dataloader
from ptutils.errors import ConfigError, DataError
from ptutils.readers import HDF5Reader
from ptutils.readers.imagenet import ImageNet

from .support.datagen import write_hdf5


def test_imagenet_reads_nchw_and_nhwc_as_chw(tmp_path) -> None:
    nchw, nhwc = tmp_path / "nchw.h5", tmp_path / "nhwc.h5"
    images, labels = write_hdf5(nchw, 20, layout="NCHW")
    images_hwc, _ = write_hdf5(nhwc, 20, layout="NHWC")
    a, b = ImageNet(nchw), ImageNet(nhwc)
    assert (a.layout, b.layout) == ("NCHW", "NHWC")
    image, label = b[5]
    assert torch.equal(image, torch.from_numpy(images_hwc[5]).permute(2, 0, 1)) and label == labels[5]
    batch_images, _ = next(iter(make_dataloader(b, batch_size=8)))
    assert batch_images.shape == (8, 3, 8, 8) and batch_images.is_contiguous()
    assert torch.equal(batch_images, torch.from_numpy(images_hwc[:8]).permute(0, 3, 1, 2))
    assert torch.equal(next(iter(make_dataloader(a, batch_size=4)))[0], torch.from_numpy(images[:4]))


def test_imagenet_splits_and_v2_transforms(tmp_path) -> None:
    path = tmp_path / "imagenet.h5"
    write_hdf5(path, 30, group="train")
    write_hdf5(tmp_path / "other.h5", 10)
    with h5py.File(path, "a") as f, h5py.File(tmp_path / "other.h5", "r") as g:
        g.copy("images", f, "val/images")
        g.copy("labels", f, "val/labels")
    train = ImageNet(path, split="train", transform=ImageNet.train_transform(size=6))
    val = ImageNet(path, split="val", transform=ImageNet.eval_transform(size=4, resize=6))
    assert (len(train), len(val)) == (30, 10)
    images, labels = next(iter(make_dataloader(train, batch_size=10, shuffle=True)))
    assert images.shape == (10, 3, 6, 6) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert next(iter(make_dataloader(val, batch_size=10)))[0].shape == (10, 3, 4, 4)


def test_imagenet_rejects_wrong_shapes(tmp_path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("flat", data=np.zeros((4, 64), np.uint8))
        f.create_dataset("five", data=np.zeros((4, 5, 8, 8), np.uint8))
        f.create_dataset("labels", data=np.zeros(4, np.int64))
        f.create_dataset("labels2d", data=np.zeros((4, 2), np.int64))
        f.create_dataset("images", data=np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="must be 4-D"):
        ImageNet(path, images_key="flat")
    with pytest.raises(DataError, match="channel axis"):
        ImageNet(path, images_key="five")
    with pytest.raises(DataError, match="labels must be 1-D"):
        ImageNet(path, labels_key="labels2d")
    with pytest.raises(DataError, match="do not have 1 or 3 channels"):
        ImageNet(path, layout="NHWC")
    with pytest.raises(ConfigError, match="layout"):
        ImageNet(path, layout="CHWN")
    with pytest.raises(ConfigError, match="split"):
        ImageNet(HDF5Reader(path), split="train")


def test_imagenet_reaches_spawned_workers_by_its_module_path(tmp_path) -> None:
    path = tmp_path / "nhwc.h5"
    images, labels = write_hdf5(path, 40, layout="NHWC")
    loader = make_dataloader(ImageNet(path), batch_size=8, num_workers=2, multiprocessing_context="spawn")
    got = list(loader)  # each worker unpickles ImageNet and permutes NHWC to CHW itself
    assert torch.equal(torch.cat([x for x, _ in got]), torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(torch.cat([y for _, y in got]), torch.from_numpy(labels))


def test_ptutils_data_imagenet_is_this_class_and_loads_no_reader_until_asked() -> None:
    code = textwrap.dedent(
        """
        import sys
        import ptutils.data as data
        assert "h5py" not in sys.modules and "ptutils.readers.imagenet" not in sys.modules
        from ptutils.readers.imagenet import ImageNet
        star = {}
        exec("from ptutils.data import *", star)
        assert data.ImageNet is ImageNet and star["ImageNet"] is ImageNet and "ImageNet" in dir(data)
        import ptutils.readers as readers
        assert readers.ImageNet is ImageNet and "ImageNet" in readers.__all__
        assert "h5py" not in sys.modules  # ImageNet imports its HDF5 reader only to open a path
        assert not hasattr(data, "ImageNette")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
