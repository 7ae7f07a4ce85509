"""ImageFolderReader: class-per-folder JPEG/PNG trees, decoded with torchvision.io or PIL.

The layout and the order of records are those of ``torchvision.datasets.ImageFolder``
(classes are the sorted sub-folder names, files sorted within each, sub-folders
walked recursively), so indices and labels agree with it.  By default decoding
uses ``torchvision.io.decode_image`` (libjpeg-turbo / libpng) on the file's bytes;
torchvision deprecated its image decoders in 0.29 and will remove them, so where
they are gone (or with ``decoder="pil"``) Pillow decodes instead, as
``ImageFolder`` itself does.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _torchvision_decode
except ImportError:  # a torchvision without image decoders (removed after 0.29's deprecation)
    ImageReadMode = None  # type: ignore[assignment,misc]
    _torchvision_decode = None

from ptutils.data import DataReader, Index, check_index
from ptutils.errors import ConfigError, DataError

__all__ = ["ImageFolderReader"]

logger = logging.getLogger("ptutils")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
READ_MODES = ("UNCHANGED", "GRAY", "GRAY_ALPHA", "RGB", "RGB_ALPHA")
"""The read modes, named as torchvision's ``ImageReadMode``."""
_PIL_MODES = {"GRAY": "L", "GRAY_ALPHA": "LA", "RGB": "RGB", "RGB_ALPHA": "RGBA"}
_PIL_UNCHANGED = {"1": "L", "P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB"}  # no 8-bit gray/RGB layout


def _decode_pil(data: bytes, mode: str) -> torch.Tensor:
    """A uint8 CHW tensor of the image in ``data``, decoded by Pillow into ``mode``."""
    with Image.open(io.BytesIO(data)) as image:
        if mode != "UNCHANGED":
            target = _PIL_MODES[mode]
        elif image.mode == "P" and "transparency" in image.info:
            target = "RGBA"
        else:  # as stored, palettes expanded
            target = _PIL_UNCHANGED.get(image.mode, image.mode)
        if target not in ("L", "LA", "RGB", "RGBA"):
            raise ValueError(f"unsupported pixel format {image.mode!r} (not 8-bit gray or RGB)")
        pixels = np.array(image.convert(target) if image.mode != target else image)  # a writable copy
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class ImageFolderReader(DataReader):
    """Reads ``(image, label)`` records from ``root/<class>/**/<file>``.

    Images come back as uint8 CHW tensors in ``mode`` (``"RGB"`` by default;
    ``"UNCHANGED"``, ``"GRAY"``, ``"GRAY_ALPHA"``, ``"RGB_ALPHA"``), labels as
    class indices.  ``decoder`` is ``"torchvision"`` (``torchvision.io``, the
    faster), ``"pil"`` (Pillow) or ``"auto"`` (the default: torchvision.io where
    this torchvision still has it, else Pillow).  The two give the same pixels
    for RGB (JPEG and PNG) and for gray/RGB PNGs with or without alpha.  They
    differ on ``"GRAY"`` of a color JPEG (libjpeg's luma plane against Pillow's
    luma of the decoded RGB, a few levels apart) and on palette PNGs: read
    ``"UNCHANGED"`` Pillow expands them to RGB (RGBA with a transparent color)
    where torchvision.io gives one channel, and read with alpha but without a
    transparent color Pillow makes them opaque where torchvision.io does not.
    Only Pillow reads JPEGs with an alpha mode (opaque).

    ``on_corrupt`` says what to do with a file that cannot be read or decoded:

    * ``"raise"`` (default): raise :class:`~ptutils.errors.DataError` naming the
      file and its index;
    * ``"skip"``: log a warning (once per file and process) on the ``"ptutils"``
      logger and substitute the next readable record in index order (wrapping
      around), with *its* label.  The substitution is deterministic, so batches
      keep their size and a resumed session sees the same batches.
    
    Images of different sizes cannot share a batch (the DataLoader stacks them):
    collating such a batch raises a :class:`~ptutils.errors.DataError` naming the
    files and their sizes.  Bring them to one size with a transform, e.g.
    ``Dataset(reader, transform=torchvision.transforms.v2.Resize((224, 224)))``
    (or ``CenterCrop``, or ``RandomResizedCrop`` for training).
    """

    fields = ("image", "label")

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        mode: str | ImageReadMode = "RGB",
        on_corrupt: str = "raise",
        decoder: str = "auto",
    ):
        self.root = os.fspath(root)
        if on_corrupt not in ("raise", "skip"):
            raise ConfigError("on_corrupt", f"expected 'raise' or 'skip', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        name = mode.upper() if isinstance(mode, str) else getattr(mode, "name", None)
        if name not in READ_MODES:
            raise ConfigError("mode", f"unknown image read mode {mode!r}; expected one of {', '.join(READ_MODES)}")
        self.mode_name: str = name
        if decoder == "auto":
            decoder = "pil" if _torchvision_decode is None else "torchvision"
        if decoder not in ("torchvision", "pil"):
            raise ConfigError("decoder", f"expected 'auto', 'torchvision' or 'pil', got {decoder!r}")
        if decoder == "torchvision" and _torchvision_decode is None:
            raise ConfigError("decoder", "this torchvision has no image decoders (torchvision.io); use 'pil'")
        self.decoder = decoder
        self.mode = ImageReadMode[name] if decoder == "torchvision" else name
        self.extensions = tuple(e.lower() for e in extensions)
        self.classes, self.class_to_idx, self.samples = self._scan()
        self.targets = np.array([label for _, label in self.samples], dtype=np.int64)
        self._bad: set[int] = set()

    def _scan(self) -> tuple[list[str], dict[str, int], list[tuple[str, int]]]:
        if not os.path.isdir(self.root):
            raise DataError("no such folder", file=self.root)
        classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if not classes:
            raise DataError("no class folders", file=self.root)
        class_to_idx = {name: i for i, name in enumerate(classes)}
        samples = []
        for name in classes:
            for folder, _, files in sorted(os.walk(os.path.join(self.root, name), followlinks=True)):
                for file in sorted(files):
                    if file.lower().endswith(self.extensions):
                        samples.append((os.path.join(folder, file), class_to_idx[name]))
        if not samples:
            raise DataError(f"no images with extensions {self.extensions}", file=self.root)
        return classes, class_to_idx, samples

    @property
    def source(self) -> str:
        return self.root

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"ImageFolderReader({self.root!r}, classes={len(self.classes)}, length={len(self.samples)}, "
                f"decoder={self.decoder!r})")

    def record_name(self, index: int) -> str:
        """The record with the file it was read from."""
        return f"index {index} ({self.samples[index][0]})"

    def decode(self, index: int) -> torch.Tensor:
        """Decode the image of record ``index``; DataError naming the file if it cannot."""
        path = self.samples[index][0]
        try:
            with open(path, "rb") as file:
                data = file.read()
            if self.decoder == "pil":
                return _decode_pil(data, self.mode_name)
            writable = bytearray(data)  # torch.frombuffer wants a writable buffer
            return _torchvision_decode(torch.frombuffer(writable, dtype=torch.uint8), mode=self.mode)
        except (RuntimeError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot decode image: {exc}", file=path, index=index) from exc

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        if self.on_corrupt == "raise":
            return self.decode(index), self.samples[index][1]
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                return self.decode(j), self.samples[j][1]
            except DataError as err:
                self._bad.add(j)
                logger.warning("skipping unreadable image (on_corrupt='skip'): %s", err)
        raise DataError("no readable image left to substitute", file=self.root, index=index)

    def read(self, index: Index) -> tuple[Any, ...]:
        index = check_index(index, len(self.samples), self.root)
        if isinstance(index, int):
            return self._load(index)
        positions = range(index.start, index.stop) if isinstance(index, slice) else index.tolist()
        records = [self._load(i) for i in positions]
        return [image for image, _ in records], np.array([label for _, label in records], dtype=np.int64)
