"""DataReaders for ptutils: HDF5, Zarr and image folders, and the ImageNet dataset over HDF5.

Each reader lives in its own module and imports its file-format library (h5py,
zarr, torchvision.io) only when that module is imported; ``from ptutils.readers
import HDF5Reader`` imports h5py and nothing else.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HDF5Reader", "ImageFolderReader", "ImageNet", "ZarrReader"]

_MODULES = {"HDF5Reader": "hdf5", "ZarrReader": "zarr", "ImageFolderReader": "image_folder", "ImageNet": "imagenet"}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_MODULES))
