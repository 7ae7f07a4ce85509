"""ImageFolderReader, corrupt images, and a torchvision ImageFolder subclass in a provider."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import v2

from ptutils.data import Dataset, DatasetProvider, ImageNet, make_dataloader, set_loader_position
from ptutils.errors import ConfigError, DataError
from ptutils.readers import ImageFolderReader
from ptutils.readers import image_folder

from .support.datagen import write_hdf5, write_image_folder


@pytest.fixture
def folder(tmp_path):
    """root/cat and root/dog with three 8x8 PNGs each."""
    root = tmp_path / "pets"
    return root, write_image_folder(root)


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_records_agree_with_torchvision_image_folder(folder, decoder) -> None:
    root, written = folder
    reader = ImageFolderReader(root, decoder=decoder)
    tv = torchvision.datasets.ImageFolder(str(root))
    assert reader.classes == tv.classes == ["cat", "dog"]
    assert reader.samples == tv.samples
    for i, (path, label, pixels) in enumerate(written):
        image, got_label = reader.read(i)
        assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
        assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))  # PNG is lossless
        assert got_label == label
    images, labels = reader.read(np.array([1, 4, 5]))
    assert [torch.equal(a, reader.read(i)[0]) for a, i in zip(images, [1, 4, 5])] == [True] * 3
    assert labels.tolist() == [0, 1, 1]


def test_jpeg_and_read_modes(tmp_path) -> None:
    root = tmp_path / "jpegs"
    write_image_folder(root, per_class=2, fmt="jpg")
    tv = torchvision.datasets.ImageFolder(str(root), transform=v2.PILToTensor())
    rgb = ImageFolderReader(root)
    for i in range(len(rgb)):
        diff = (rgb.read(i)[0].int() - tv[i][0].int()).abs().max()
        assert diff <= 2  # both decode with libjpeg; rounding may differ by a level
    assert ImageFolderReader(root, mode="GRAY").read(0)[0].shape == (1, 8, 8)
    with pytest.raises(ConfigError, match="mode"):
        ImageFolderReader(root, mode="sepia")
    with pytest.raises(ConfigError, match="on_corrupt"):
        ImageFolderReader(root, on_corrupt="ignore")


def test_pil_decoder_gives_image_folders_own_pixels(tmp_path) -> None:
    root = tmp_path / "jpegs"
    write_image_folder(root, per_class=2, fmt="jpg")
    tv = torchvision.datasets.ImageFolder(str(root), transform=v2.PILToTensor())
    pil = ImageFolderReader(root, decoder="pil")
    assert all(torch.equal(pil.read(i)[0], tv[i][0]) for i in range(len(pil)))  # both decode with Pillow


def write_pixel_formats(root) -> dict[str, int]:
    """One 8x8 image per pixel format under root/c; its index in the reader by name."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    (root / "c").mkdir(parents=True)
    images = {
        "rgba.png": Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA"),
        "gray.png": Image.fromarray(rgb[:, :, 0], "L"),
        "gray_alpha.png": Image.fromarray(np.concatenate([rgb[:, :, :1], alpha], 2), "LA"),
        "rgb.jpg": Image.fromarray(rgb, "RGB"),
        "gray.jpg": Image.fromarray(rgb[:, :, 0], "L"),
        "palette.png": Image.fromarray(rgb, "RGB").quantize(16),
    }
    for name, image in images.items():
        image.save(root / "c" / name)
    Image.fromarray(rgb, "RGB").quantize(16).save(root / "c" / "palette_t.png", transparency=0)
    return {name: i for i, name in enumerate(sorted([*images, "palette_t.png"]))}


@pytest.mark.parametrize("mode", image_folder.READ_MODES)
def test_both_decoders_read_every_mode_alike(tmp_path, mode) -> None:
    index = write_pixel_formats(tmp_path)
    tv = ImageFolderReader(tmp_path, mode=mode, decoder="torchvision")
    pil = ImageFolderReader(tmp_path, mode=mode, decoder="pil")
    channels = {"GRAY": 1, "GRAY_ALPHA": 2, "RGB": 3, "RGB_ALPHA": 4}.get(mode)
    for name in ("rgba.png", "gray.png", "gray_alpha.png", "rgb.jpg", "gray.jpg"):
        if name.endswith(".jpg") and mode in ("GRAY_ALPHA", "RGB_ALPHA"):
            continue  # torchvision.io refuses alpha modes for JPEG (Pillow adds an opaque alpha)
        a, b = tv.read(index[name])[0], pil.read(index[name])[0]
        assert a.shape == b.shape and (channels is None or a.shape[0] == channels), name
        tolerance = 0 if mode in ("UNCHANGED", "RGB", "RGB_ALPHA") else 1  # Pillow's luma rounds its own way
        if name == "rgb.jpg" and mode == "GRAY":
            tolerance = 8  # libjpeg's luma plane against Pillow's luma of the decoded RGB (4 on this data)
        assert (a.int() - b.int()).abs().max() <= tolerance, name
    unchanged = {"UNCHANGED": {"palette.png": 3, "palette_t.png": 4}}.get(mode, {})
    for name, expected in unchanged.items():
        assert pil.read(index[name])[0].shape[0] == expected  # palettes expanded, transparency kept


def test_auto_decoder_falls_back_to_pil_where_torchvision_has_no_decoders(folder, monkeypatch) -> None:
    root, written = folder
    assert ImageFolderReader(root).decoder == "torchvision"
    monkeypatch.setattr(image_folder, "_torchvision_decode", None)  # as a torchvision without torchvision.io decoders
    reader = ImageFolderReader(root)
    assert reader.decoder == "pil" and "decoder='pil'" in repr(reader)
    assert torch.equal(reader.read(0)[0], torch.from_numpy(written[0][2]).permute(2, 0, 1))
    with pytest.raises(ConfigError, match="decoder.*no image decoders"):
        ImageFolderReader(root, decoder="torchvision")
    with pytest.raises(ConfigError, match="decoder"):
        ImageFolderReader(root, decoder="opencv")


def test_reader_imports_and_reads_with_a_torchvision_that_lost_its_decoders(folder) -> None:
    root, written = folder
    script = (
        "import sys, torchvision.io\n"
        "del torchvision.io.decode_image  # as torchvision will once 0.29's deprecation runs out\n"
        "from ptutils.readers import ImageFolderReader\n"
        "reader = ImageFolderReader(sys.argv[1])\n"
        "print(reader.decoder, reader.read(0)[0].flatten()[:6].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, check=True).stdout
    assert out.split(" ", 1) == ["pil", f"{written[0][2].transpose(2, 0, 1).flatten()[:6].tolist()}\n"]


def test_loader_batches_with_a_resize_transform(folder) -> None:
    root, written = folder
    dataset = Dataset(ImageFolderReader(root), transform=v2.Resize((4, 4), antialias=True))
    images, labels = next(iter(make_dataloader(dataset, batch_size=6, num_workers=2)))
    assert images.shape == (6, 3, 4, 4) and labels.tolist() == [label for _, label, _ in written]


def test_missing_and_empty_folders(tmp_path) -> None:
    with pytest.raises(DataError, match="no such folder") as err:
        ImageFolderReader(tmp_path / "nowhere")
    assert err.value.file == str(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderReader(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        ImageFolderReader(tmp_path / "empty")


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_corrupt_image_raises_naming_file_and_index(folder, decoder) -> None:
    root, written = folder
    bad_path = written[4][0]
    with open(bad_path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    reader = ImageFolderReader(root, decoder=decoder)
    with pytest.raises(DataError) as err:
        reader.read(np.array([2, 3, 4, 5]))
    assert err.value.file == bad_path and err.value.index == 4 and "cannot decode" in str(err.value)
    with pytest.raises(DataError, match="index 4"):
        list(make_dataloader(Dataset(reader), batch_size=3))


def test_skip_policy_substitutes_the_next_readable_image(folder, caplog) -> None:
    root, written = folder
    for k in (2, 5):  # the last cat, and the last image of all (wraps around to index 0)
        with open(written[k][0], "wb") as f:
            f.write(b"")
    reader = ImageFolderReader(root, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="ptutils"):
        images, labels = reader.read(np.arange(6))
    assert len(images) == 6
    assert torch.equal(images[2], reader.read(3)[0]) and labels[2] == written[3][1]
    assert torch.equal(images[5], reader.read(0)[0]) and labels[5] == written[0][1]
    warned = [r for r in caplog.records if r.name == "ptutils"]
    assert len(warned) == 2 and written[2][0] in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ptutils"):
        again = reader.read(np.arange(6))[0]
    assert not caplog.records  # warned once per file
    assert all(torch.equal(a, b) for a, b in zip(images, again))


class FinetuneImages(torchvision.datasets.ImageFolder):
    """A user's own dataset for the notes' multistage example: torchvision's
    ImageFolder with its root and transforms set in the subclass."""

    def __init__(self, root: str):
        super().__init__(root, transform=v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]))


def test_multistage_provider_with_imagenet_and_an_image_folder_subclass(tmp_path, folder) -> None:
    root, written = folder
    h5 = tmp_path / "imagenet.h5"
    write_hdf5(h5, 24, group="train")
    write_hdf5(tmp_path / "val.h5", 12, seed=1)
    provider = DatasetProvider(
        {
            "train": ImageNet(h5, split="train", transform=v2.ToDtype(torch.float32, scale=True)),
            "test": ImageNet(tmp_path / "val.h5"),
            "finetune": FinetuneImages(str(root)),
        },
        {
            "train": {"batch_size": 8, "shuffle": True},
            "test": {"batch_size": 12},
            "finetune": {"batch_size": 2, "shuffle": True, "seed": 7, "num_workers": 2},
        },
    )
    # stage 1: train on ImageNet; the monitor then pauses and asks for the test set
    images, _ = next(iter(provider.get_dataloader({"stage": "train", "epoch": 0})))
    assert images.shape == (8, 3, 8, 8) and images.dtype == torch.float32
    assert len(list(provider.get_dataloader({"stage": "test"}))) == 1
    # stage 2: finetune on the user's raw image folder
    finetune = provider.get_dataloader({"stage": "finetune", "epoch": 0})
    full = [(x.clone(), y.clone()) for x, y in finetune]
    assert len(full) == 3 and full[0][0].shape == (2, 3, 8, 8)
    assert sorted(y for _, ys in full for y in ys.tolist()) == sorted(label for _, label, _ in written)
    # a session interrupted after one finetune batch resumes with exactly the rest
    resumed = provider.get_dataloader({"stage": "finetune"})
    assert set_loader_position(resumed, 0, 1)
    rest = list(resumed)
    assert len(rest) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[1:], rest))


def test_images_of_different_sizes_in_a_batch_name_their_files_and_sizes(tmp_path) -> None:
    from PIL import Image

    root = tmp_path / "mixed"
    written = write_image_folder(root, per_class=2)
    Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(written[1][0])  # cat/001.png is now 12 high, 10 wide
    loader = make_dataloader(Dataset(ImageFolderReader(root)), batch_size=4)
    with pytest.raises(DataError, match=r"3x8x8: index 0 \(.*cat/000.png\), index 2 \(.*dog/000.png\) ...; "
                                        r"3x12x10: index 1 \(.*cat/001.png\); give the Dataset a transform"):
        next(iter(loader))
    resized = Dataset(ImageFolderReader(root), transform=v2.Resize((8, 8), antialias=True))  # the fix the error names
    images, _ = next(iter(make_dataloader(resized, batch_size=4)))
    assert images.shape == (4, 3, 8, 8)
