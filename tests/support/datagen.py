"""Small data sets written to a temporary folder for the data and reader tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def images_and_labels(n: int, *, layout: str = "NCHW", size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random uint8 RGB images (``layout`` NCHW or NHWC) and int64 labels in [0, 10)."""
    rng = np.random.default_rng(seed)
    shape = (n, 3, size, size) if layout == "NCHW" else (n, size, size, 3)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def write_hdf5(
    path: str | os.PathLike[str],
    n: int = 100,
    *,
    layout: str = "NCHW",
    chunk: int | None = 16,
    compression: str | None = None,
    group: str | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Write ``images``/``labels`` datasets (under ``group`` if given); return what was written."""
    import h5py

    images, labels = images_and_labels(n, layout=layout, seed=seed)
    with h5py.File(path, "w") as f:
        node = f.require_group(group) if group else f
        chunks = (min(chunk, n),) + images.shape[1:] if chunk else None
        node.create_dataset("images", data=images, chunks=chunks, compression=compression)
        node.create_dataset("labels", data=labels)
    return images, labels


def write_zarr(
    store: str | os.PathLike[str], n: int = 100, *, chunk: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Write a zarr v3 group with ``images``/``labels`` arrays; return what was written."""
    import zarr

    images, labels = images_and_labels(n, seed=seed)
    group = zarr.open_group(os.fspath(store) if isinstance(store, Path) else store, mode="w")
    group.create_array("images", shape=images.shape, dtype=images.dtype, chunks=(chunk,) + images.shape[1:])[:] = images
    group.create_array("labels", shape=labels.shape, dtype=labels.dtype, chunks=(chunk,))[:] = labels
    return images, labels


def write_image_folder(
    root: str | os.PathLike[str], per_class: int = 3, classes: tuple[str, ...] = ("cat", "dog"), fmt: str = "png"
) -> list[tuple[str, int, np.ndarray]]:
    """Write ``root/<class>/<i>.<fmt>`` images (8x8 RGB); return (path, label, HWC pixels) in index order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    written = []
    for label, name in enumerate(sorted(classes)):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            path = os.path.join(root, name, f"{i:03d}.{fmt}")
            Image.fromarray(pixels).save(path)
            written.append((path, label, pixels))
    return written
