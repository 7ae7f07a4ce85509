"""ImageFolderReader: class-per-folder JPEG/PNG trees, decoded with torchvision.io.

The layout and the order of records are those of ``torchvision.datasets.ImageFolder``
(classes are the sorted sub-folder names, files sorted within each, sub-folders
walked recursively), so indices and labels agree with it.  Decoding uses
``torchvision.io.decode_image`` (libjpeg-turbo / libpng) on the file's bytes,
without PIL.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from ptutils.data import DataReader, Index, check_index
from ptutils.errors import ConfigError, DataError

__all__ = ["ImageFolderReader"]

logger = logging.getLogger("ptutils")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ImageFolderReader(DataReader):
    """Reads ``(image, label)`` records from ``root/<class>/**/<file>``.

    Images come back as uint8 CHW tensors in ``mode`` (``"RGB"`` by default;
    ``"UNCHANGED"``, ``"GRAY"``, ``"RGB_ALPHA"`` ...), labels as class indices.

    ``on_corrupt`` says what to do with a file that cannot be read or decoded:

    * ``"raise"`` (default): raise :class:`~ptutils.errors.DataError` naming the
      file and its index;
    * ``"skip"``: log a warning (once per file and process) on the ``"ptutils"``
      logger and substitute the next readable record in index order (wrapping
      around), with *its* label.  The substitution is deterministic, so batches
      keep their size and a resumed session sees the same batches.
    """

    fields = ("image", "label")

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        mode: str | ImageReadMode = "RGB",
        on_corrupt: str = "raise",
    ):
        self.root = os.fspath(root)
        if on_corrupt not in ("raise", "skip"):
            raise ConfigError("on_corrupt", f"expected 'raise' or 'skip', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        if isinstance(mode, str):
            try:
                mode = ImageReadMode[mode.upper()]
            except KeyError:
                raise ConfigError("mode", f"unknown image read mode {mode!r}") from None
        self.mode = mode
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
        return f"ImageFolderReader({self.root!r}, classes={len(self.classes)}, length={len(self.samples)})"

    def decode(self, index: int) -> torch.Tensor:
        """Decode the image of record ``index``; DataError naming the file if it cannot."""
        path = self.samples[index][0]
        try:
            with open(path, "rb") as file:
                data = bytearray(file.read())
            return decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=self.mode)
        except (RuntimeError, OSError, ValueError) as exc:
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
