"""ImageNet: a dataset of ImageNet-style images and labels, from HDF5 or any two-field reader.

It lives beside the readers because it builds an
:class:`~ptutils.readers.hdf5.HDF5Reader` from a path, and it imports that reader
(and h5py) only then: an ImageNet over a reader it is given never loads h5py.
``ptutils.data.ImageNet`` names this same class, imported on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ptutils.data import DataReader, Dataset
from ptutils.errors import ConfigError, DataError

__all__ = ["ImageNet"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNet(Dataset):
    """ImageNet-style images and labels from HDF5 (or any two-field reader).

    ``source`` is an HDF5 file path (read with :class:`ptutils.readers.hdf5.HDF5Reader`,
    imported only here) or a ready :class:`DataReader` whose fields are (images,
    labels).  Images are uint8 arrays ``(N, C, H, W)`` or ``(N, H, W, C)``
    (``layout="auto"`` decides from where the 1 or 3 channels are); samples are
    ``(CHW uint8 tensor, int label)``, the input torchvision transforms v2 expect.
    With ``split``, fields are read from ``{split}/{images_key}`` and
    ``{split}/{labels_key}``.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | DataReader,
        *,
        split: str | None = None,
        images_key: str = "images",
        labels_key: str = "labels",
        layout: str = "auto",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        reader_options: Mapping[str, Any] | None = None,
    ):
        if isinstance(source, DataReader):
            if split is not None:
                raise ConfigError("split", "applies to HDF5 paths; a reader given as source has its fields already")
            reader = source
        else:
            from ptutils.readers.hdf5 import HDF5Reader

            prefix = f"{split}/" if split else ""
            reader = HDF5Reader(source, keys=(prefix + images_key, prefix + labels_key), **dict(reader_options or {}))
        super().__init__(reader, transform=transform, target_transform=target_transform)
        self.layout = self._check(reader, layout)

    @staticmethod
    def _check(reader: DataReader, layout: str) -> str:
        if len(reader.fields) != 2:
            raise DataError(f"ImageNet needs (images, labels) fields, got {reader.fields}", file=reader.source)
        shapes = reader.shapes
        if shapes is None:
            raise DataError("ImageNet needs a reader of fixed-shape arrays", file=reader.source)
        images, labels = (shapes[f] for f in reader.fields)
        if len(images) != 4:
            raise DataError(f"images must be 4-D (N,C,H,W or N,H,W,C), got shape {images}", file=reader.source)
        if len(labels) != 1:
            raise DataError(f"labels must be 1-D, got shape {labels}", file=reader.source)
        if layout == "auto":
            if images[1] in (1, 3):
                layout = "NCHW"
            elif images[3] in (1, 3):
                layout = "NHWC"
            else:
                raise DataError(f"cannot tell the channel axis of images of shape {images}", file=reader.source)
        if layout not in ("NCHW", "NHWC"):
            raise ConfigError("layout", f"expected 'auto', 'NCHW' or 'NHWC', got {layout!r}")
        channels = images[1] if layout == "NCHW" else images[3]
        if channels not in (1, 3):
            raise DataError(f"{layout} images of shape {images} do not have 1 or 3 channels", file=reader.source)
        return layout

    def to_tensors(self, record: tuple[Any, ...], *, batch: bool) -> tuple[Any, ...]:
        images, labels = super().to_tensors(record, batch=batch)
        if self.layout == "NHWC":
            images = images.permute(0, 3, 1, 2) if batch else images.permute(2, 0, 1)
            if batch:
                images = images.contiguous()
        return images, labels

    @staticmethod
    def train_transform(size: int = 224) -> Callable[[torch.Tensor], torch.Tensor]:
        """The usual training augmentation (random resized crop, flip, normalise), v2."""
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.RandomResizedCrop(size, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
            ]
        )

    @staticmethod
    def eval_transform(size: int = 224, resize: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The usual evaluation transform (resize, centre crop, normalise), v2."""
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.Resize(resize or round(size * 256 / 224), antialias=True),
                v2.CenterCrop(size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
            ]
        )
