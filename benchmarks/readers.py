"""Reader throughput: ptutils readers against the raw ways of reading the same data.

Generates (in a temporary folder, or ``--dir``) an HDF5 file (uncompressed) and a
Zarr group (zarr's default zstd) with 20,000 images of 3x64x64 uint8 plus int64
labels, in chunks of 64 images, and a folder of 2,000 JPEGs in 10 class folders,
then measures samples/s through a DataLoader (batch 256; workers 0 and 2;
sequential and shuffled epochs) for:

* ``per-item``: a minimal map-style Dataset reading one record per ``__getitem__``
  with h5py / zarr (the way most users write it: the file opened lazily per
  worker, its dataset objects kept), ``shuffle=True`` for shuffled epochs;
* ``ptutils``: :class:`ptutils.data.Dataset` over ``HDF5Reader`` / ``ZarrReader``
  from :func:`ptutils.data.make_dataloader` (shuffled = full random permutation,
  each batch read as sorted indices; ``chunk-shuffle`` = the chunk-aware shuffle);
* ``raw slice (ceiling)``: contiguous ``array[i:i+256]`` reads of the same arrays,
  one per batch, labels read once per process, batches sent from workers the way
  ptutils sends them (the ceiling for sequential epochs; its ``x baseline`` is
  the most any reader can reach there); with workers, ``raw slice, default IPC``
  is the same reads sent the DataLoader's default way, as the per-item
  baseline's batches are;
* ``tv ImageFolder``: ``torchvision.datasets.ImageFolder`` (PIL loader +
  ``PILToTensor``) against :class:`ptutils.readers.ImageFolderReader`, which
  decodes with ``torchvision.io``, and with Pillow (``ImageFolderReader (pil)``,
  what it falls back to once torchvision drops its deprecated decoders).

Every loader has the same DataLoader settings (batch 256, persistent workers,
default prefetch).  Ratios are against the baselines measured in the same run.
Each figure is the best of ``--repeat`` fresh loaders, each timed for
``--seconds`` seconds (and at least 6 batches) once its workers are in steady
state (after the batches they prefetched while starting); the loaders are timed
in turns, so load from other processes falls on all of them alike.  ``--quick``
uses small data for a smoke run.  Run: ``python benchmarks/readers.py [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import h5py
import numpy as np
import torch
import torchvision
import zarr
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ptutils.data import Collated, Dataset, collate, make_dataloader
from ptutils.readers import HDF5Reader, ImageFolderReader, ZarrReader

BATCH = 256
CHUNK = 64


# ----------------------------------------------------------------------------- data


def make_images(n: int, seed: int) -> np.ndarray:
    """Smooth-ish 3x64x64 uint8 images (upsampled 8x8 noise plus grain), like photos compress."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 240, (n, 3, 8, 8), dtype=np.uint8)
    images = np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)
    grain = rng.integers(0, 16, images.shape, dtype=np.uint8)
    return images + grain


def generate(folder: str, n: int, n_jpeg: int) -> dict[str, str]:
    """Write the HDF5 file, the Zarr group and the JPEG folder (unless already there)."""
    paths = {
        "hdf5": os.path.join(folder, f"images-{n}.h5"),
        "zarr": os.path.join(folder, f"images-{n}.zarr"),
        "jpeg": os.path.join(folder, f"jpeg-{n_jpeg}"),
    }
    if not os.path.exists(paths["hdf5"]) or not os.path.exists(paths["zarr"]):
        images = make_images(n, 0)
        labels = np.random.default_rng(1).integers(0, 1000, n).astype(np.int64)
        with h5py.File(paths["hdf5"], "w") as f:
            f.create_dataset("images", data=images, chunks=(CHUNK, 3, 64, 64))
            f.create_dataset("labels", data=labels)
        group = zarr.open_group(paths["zarr"], mode="w")
        group.create_array("images", shape=images.shape, dtype=images.dtype, chunks=(CHUNK, 3, 64, 64))[:] = images
        group.create_array("labels", shape=labels.shape, dtype=labels.dtype, chunks=(4096,))[:] = labels
    if not os.path.exists(paths["jpeg"]):
        images = make_images(n_jpeg, 2).transpose(0, 2, 3, 1)
        for i, image in enumerate(images):
            cls = os.path.join(paths["jpeg"], f"class{i % 10}")
            os.makedirs(cls, exist_ok=True)
            Image.fromarray(image).save(os.path.join(cls, f"{i:06d}.jpg"), quality=90)
    return paths


# ----------------------------------------------------------------------------- baselines


class H5PerItem(torch.utils.data.Dataset):
    """The usual hand-written HDF5 Dataset: one h5py read per sample, opened per worker."""

    def __init__(self, path: str):
        self.path = path
        with h5py.File(path, "r") as f:
            self.length = len(f["labels"])
        self.file: Any = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.file is None:
            file = h5py.File(self.path, "r")
            self.file = file["images"], file["labels"]
        images, labels = self.file
        return torch.from_numpy(images[i]), int(labels[i])


class ZarrPerItem(torch.utils.data.Dataset):
    """The usual hand-written Zarr Dataset: one zarr read per sample."""

    def __init__(self, path: str):
        group = zarr.open_group(path, mode="r")
        self.images, self.labels = group["images"], group["labels"]
        self.length = self.labels.shape[0]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.images[i]), int(self.labels[i])


class SliceBatches(torch.utils.data.Dataset):
    """Batch ``b`` is ``images[b*256:(b+1)*256]``: one contiguous slice read per batch.

    Labels are read whole once per process (as the readers do), so only the image
    reads count.  ``transport="ptutils"`` hands the batch back as
    :class:`ptutils.data.Collated`, so with :func:`ptutils.data.collate` it travels
    from a worker the way ptutils batches do (like with like); ``"default"`` returns
    plain tensors, sent the DataLoader's default way.
    """

    def __init__(self, kind: str, path: str, transport: str = "ptutils"):
        self.kind, self.path, self.transport = kind, path, transport
        self.arrays: Any = None
        self.length = len(H5PerItem(path)) if kind == "hdf5" else ZarrPerItem(path).length

    def __len__(self) -> int:
        return math.ceil(self.length / BATCH)

    def __getitem__(self, b: int) -> Any:
        if self.arrays is None:
            node = h5py.File(self.path, "r") if self.kind == "hdf5" else zarr.open_group(self.path, mode="r")
            self.arrays = node["images"], np.asarray(node["labels"][:])
        images, labels = self.arrays
        sl = slice(b * BATCH, (b + 1) * BATCH)
        batch = [torch.from_numpy(images[sl]), torch.from_numpy(labels[sl].copy())]
        return Collated(batch) if self.transport == "ptutils" else batch


# ----------------------------------------------------------------------------- timing


def throughput(make: Callable[[], DataLoader], seconds: float, workers: int) -> float:
    """Samples/s of a fresh loader iterated for ``seconds`` (and at least 6 batches).

    The clock starts once the workers are in steady state: after the batches they
    prefetched while starting (``1 + 2 * workers``: the first, plus the default
    prefetch of 2 per worker), so start-up and its head start count for no
    loader.  It then runs over as many epochs as fit (persistent workers).
    """
    loader = make()
    warmup = 1 + 2 * workers
    seen, samples, batches, start = 0, 0, 0, None
    while start is None or time.perf_counter() - start < seconds or batches < 6:
        for batch in loader:
            seen += 1
            if start is None:
                if seen >= warmup:
                    start = time.perf_counter()
                continue
            samples += len(batch[1])
            batches += 1
            if time.perf_counter() - start > seconds and batches >= 6:
                break
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, short cuts: a smoke run")
    parser.add_argument("--dir", help="folder for the generated data (kept and reused); default: a temp folder")
    parser.add_argument("--seconds", type=float, default=None, help="how long each loader is timed")
    parser.add_argument("--repeat", type=int, default=None, help="timings per loader, interleaved (best is kept)")
    args = parser.parse_args()
    n, n_jpeg = (2560, 512) if args.quick else (20000, 2000)
    seconds = args.seconds or (0.5 if args.quick else 2.0)
    repeat = args.repeat or (1 if args.quick else 3)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or tmp
        os.makedirs(folder, exist_ok=True)
        t0 = time.perf_counter()
        paths = generate(folder, n, n_jpeg)
        print(f"data: {n} images in HDF5 and Zarr, {n_jpeg} JPEGs ({time.perf_counter() - t0:.1f}s) in {folder}")
        print(f"torch {torch.__version__}, h5py {h5py.__version__}, zarr {zarr.__version__}, {os.cpu_count()} CPUs")
        cases = build_cases(paths)
        rates: dict[tuple[str, str, int, str], float] = {}
        for _ in range(repeat):  # interleaved, so load from other processes hits every case alike
            for key, make in cases.items():
                rates[key] = max(rates.get(key, 0.0), throughput(make, seconds, key[2]))
                gc.collect()  # close this case's files before the next one opens them
    print_table(rates)


# (data, loader) -> (minimum x baseline, minimum x ceiling) the issue asks for
TARGETS = {
    ("hdf5", "ptutils", "sequential"): (5.0, 0.8),
    ("zarr", "ptutils", "sequential"): (50.0, 0.8),
    ("hdf5", "ptutils", "shuffled"): (1.0, None),
    ("zarr", "ptutils", "shuffled"): (1.0, None),
    ("hdf5", "ptutils chunk-shuffle", "shuffled"): (3.0, None),
    ("zarr", "ptutils chunk-shuffle", "shuffled"): (3.0, None),
    ("jpeg", "ImageFolderReader", "sequential"): (2.0, None),
    ("jpeg", "ImageFolderReader", "shuffled"): (2.0, None),
}


def ptutils_dataset(fmt: str, path: str, **options: Any) -> Dataset:
    """A ptutils Dataset over a new reader of ``path``."""
    reader = {"hdf5": HDF5Reader, "zarr": ZarrReader, "jpeg": ImageFolderReader}[fmt]
    return Dataset(reader(path, **options))


def build_cases(paths: dict[str, str]) -> dict[tuple[str, str, int, str], Callable[[], DataLoader]]:
    """Every measured loader, keyed by (data, loader, workers, order).

    Each call builds its dataset afresh, so no case inherits another's open files
    (HDF5 shares an open dataset, chunk cache included, within a process).
    """
    cases: dict[tuple[str, str, int, str], Callable[[], DataLoader]] = {}

    def loader(dataset: Callable[[], Any], ours: bool, **options: Any) -> Callable[[], DataLoader]:
        build = make_dataloader if ours else DataLoader
        return lambda: build(dataset(), **options)

    for workers in (0, 2):
        common = {"num_workers": workers, "persistent_workers": workers > 0}
        for fmt in ("hdf5", "zarr"):
            path = paths[fmt]
            per_item = partial(H5PerItem if fmt == "hdf5" else ZarrPerItem, path)
            ours = partial(ptutils_dataset, fmt, path)
            ceiling = partial(SliceBatches, fmt, path)
            cases[fmt, "raw slice (ceiling)", workers, "sequential"] = loader(
                ceiling, False, batch_size=None, collate_fn=collate, **common
            )
            if workers:
                default = partial(SliceBatches, fmt, path, "default")
                cases[fmt, "raw slice, default IPC", workers, "sequential"] = loader(
                    default, False, batch_size=None, **common
                )
            for order in ("sequential", "shuffled"):
                shuffle = order == "shuffled"
                cases[fmt, "per-item", workers, order] = loader(
                    per_item, False, batch_size=BATCH, shuffle=shuffle, **common
                )
                cases[fmt, "ptutils", workers, order] = loader(ours, True, batch_size=BATCH, shuffle=shuffle, **common)
            cases[fmt, "ptutils chunk-shuffle", workers, "shuffled"] = loader(
                ours, True, batch_size=BATCH, shuffle=True, chunk_size="auto", **common
            )
        tv = partial(torchvision.datasets.ImageFolder, paths["jpeg"], transform=v2.PILToTensor())
        folder = partial(ptutils_dataset, "jpeg", paths["jpeg"])
        folder_pil = partial(ptutils_dataset, "jpeg", paths["jpeg"], decoder="pil")
        for order in ("sequential", "shuffled"):
            shuffle = order == "shuffled"
            cases["jpeg", "tv ImageFolder", workers, order] = loader(
                tv, False, batch_size=BATCH, shuffle=shuffle, **common
            )
            cases["jpeg", "ImageFolderReader", workers, order] = loader(
                folder, True, batch_size=BATCH, shuffle=shuffle, **common
            )
            cases["jpeg", "ImageFolderReader (pil)", workers, order] = loader(
                folder_pil, True, batch_size=BATCH, shuffle=shuffle, **common
            )
    return cases


def print_table(rates: dict[tuple[str, str, int, str], float]) -> None:
    """One table: samples/s, ratio to the baseline and to the ceiling, and the target."""
    rows = []
    for (data, name, workers, order), rate in rates.items():
        baseline = rates.get((data, "tv ImageFolder" if data == "jpeg" else "per-item", workers, order))
        ceiling = rates.get((data, "raw slice (ceiling)", workers, "sequential"))
        x_base = rate / baseline if baseline else None
        x_ceil = rate / ceiling if ceiling else None
        target = TARGETS.get((data, name, order))
        verdict = ""
        if target and x_base is not None:
            need_base, need_ceil = target
            ok = x_base >= need_base and (need_ceil is None or (x_ceil or 0) >= need_ceil)
            need = f">={need_base:g}x" + (f", >={need_ceil:g} ceil" if need_ceil else "")
            verdict = f"{need}: {'met' if ok else 'MISSED'}"
            reachable = ceiling / baseline if ceiling and baseline and order == "sequential" else None
            if not ok and reachable is not None and reachable < need_base:
                verdict += f" (the ceiling itself is {reachable:.1f}x)"
        rows.append(
            (
                data,
                name,
                str(workers),
                order,
                f"{rate:,.0f}",
                f"{x_base:.2f}" if x_base is not None else "",
                f"{x_ceil:.2f}" if x_ceil is not None else "",
                verdict,
            )
        )
    rows.sort(key=lambda r: (r[2], ("hdf5", "zarr", "jpeg").index(r[0])))
    header = ("data", "loader", "workers", "order", "samples/s", "x baseline", "x ceiling", "target")
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:{'>' if 4 <= i <= 6 else '<'}{w}}}" for i, w in enumerate(widths))
    print()
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print()
    print("baseline: the per-item Dataset (hdf5, zarr) or torchvision ImageFolder (jpeg), same workers and order;")
    print("ceiling: raw contiguous slice reads of the same array, same workers (sequential), its batches sent")
    print("from workers the way ptutils sends them; its 'x baseline' is the most any reader can reach.")
    print("'raw slice, default IPC': the same reads, batches sent the DataLoader's default way (a new")
    print("shared-memory segment per tensor, as the per-item baseline's are).")


if __name__ == "__main__":
    main()
