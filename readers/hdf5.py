"""HDF5Reader: records from datasets of one HDF5 file, read in batches.

Opening is lazy and per process: the reader pickles without a file handle, each
DataLoader worker (fork or spawn) opens its own, and a handle inherited through
``fork`` is dropped and reopened.  Batches are read with few HDF5 calls: the
sorted indices are grouped into spans (contiguous runs, plus gaps too small to be
worth a separate call) and each span is read straight into the output array.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from ptutils.data import DataReader, Index, check_index, coalesce_runs
from ptutils.errors import DataError

__all__ = ["HDF5Reader"]

logger = logging.getLogger("ptutils")

_MiB = 1 << 20


class HDF5Reader(DataReader):
    """Reads records whose fields are the datasets ``keys`` of the HDF5 file ``path``.

    All datasets must have the same length (first axis).  The file is checked when
    the reader is built, so a missing file or key, or mismatched lengths, raise
    :class:`~ptutils.errors.DataError` here rather than in a worker.

    Chunk cache, per dataset and process: by default none for a dataset stored
    without filters, so HDF5 reads just the requested records (a cache would read
    a whole chunk per random access, several times slower), and twice the chunk
    (at least 1 MiB) for a compressed one, so a chunk is decompressed once per
    batch.  ``rdcc_nbytes`` / ``rdcc_nslots`` / ``rdcc_w0`` override that for
    every dataset (unset ones keep the file's defaults).  HDF5 shares an open
    dataset within a process: if the dataset is already open elsewhere in the
    process, that opening's cache applies, and a warning says so.

    ``max_gap`` is the largest number of unwanted records read to save a call: by
    default one chunk for compressed datasets (the whole chunk is decoded anyway)
    and 64 KiB worth of records otherwise.  Datasets of at most ``preload_bytes``
    (e.g. labels) are read whole once per process and then indexed in memory.
    ``file_kwargs`` go to ``h5py.File`` (e.g. ``{"locking": False}`` on network
    file systems).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        keys: str | Sequence[str] = ("images", "labels"),
        *,
        rdcc_nbytes: int | None = None,
        rdcc_nslots: int | None = None,
        rdcc_w0: float | None = None,
        max_gap: int | None = None,
        preload_bytes: int = 16 * _MiB,
        file_kwargs: Mapping[str, Any] | None = None,
    ):
        self.path = os.fspath(path)
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)
        if not self.keys:
            raise DataError("no dataset keys given", file=self.path)
        self.fields = self.keys
        self.preload_bytes = int(preload_bytes)
        self.file_kwargs = dict(file_kwargs or {})
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._chunks: dict[str, tuple[int, ...] | None] = {}
        self._filtered: dict[str, bool] = {}
        self._probe()
        self.rdcc_nbytes = rdcc_nbytes
        self.rdcc_nslots = rdcc_nslots
        self.rdcc_w0 = rdcc_w0
        self.max_gap = {k: self._default_gap(k) if max_gap is None else int(max_gap) for k in self.keys}
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._columns: list[Any] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ metadata

    def _open(self) -> h5py.File:
        if not os.path.exists(self.path):
            raise DataError("no such file", file=self.path)
        try:
            return h5py.File(self.path, "r", **self.file_kwargs)
        except OSError as exc:
            raise DataError(f"cannot open as HDF5: {exc}", file=self.path) from exc

    def _probe(self) -> None:
        with self._open() as f:
            for key in self.keys:
                obj = f.get(key)
                if obj is None:
                    found = sorted(_dataset_names(f))
                    raise DataError(f"no dataset {key!r} (datasets in the file: {found})", file=self.path)
                if not isinstance(obj, h5py.Dataset):
                    raise DataError(f"{key!r} is a {type(obj).__name__}, not a dataset", file=self.path)
                if obj.ndim == 0:
                    raise DataError(f"dataset {key!r} is a scalar; records need a first axis", file=self.path)
                if obj.dtype.kind not in "biuf":
                    raise DataError(f"dataset {key!r} has unsupported dtype {obj.dtype}", file=self.path)
                self._shapes[key] = tuple(obj.shape)
                self._dtypes[key] = obj.dtype
                self._chunks[key] = obj.chunks
                self._filtered[key] = obj.id.get_create_plist().get_nfilters() > 0
        lengths = {k: s[0] for k, s in self._shapes.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"datasets have different lengths: {lengths}", file=self.path)
        self._len = next(iter(lengths.values()))

    def _default_gap(self, key: str) -> int:
        chunks = self._chunks[key]
        if chunks and self._filtered[key]:
            return chunks[0] - 1
        row = int(np.prod(self._shapes[key][1:])) * self._dtypes[key].itemsize
        return (64 * 1024) // max(row, 1)

    def _chunk_cache(self, key: str, defaults: tuple[int, int, float]) -> tuple[int, int, float]:
        """``(nslots, nbytes, w0)`` of the chunk cache for ``key``, as documented."""
        nslots, nbytes, w0 = defaults
        if self.rdcc_nbytes is not None:
            nbytes = int(self.rdcc_nbytes)
        elif self._chunks[key] and self._filtered[key]:
            nbytes = max(_MiB, 2 * int(np.prod(self._chunks[key])) * self._dtypes[key].itemsize)
        else:
            nbytes = 0
        return (
            nslots if self.rdcc_nslots is None else int(self.rdcc_nslots),
            nbytes,
            w0 if self.rdcc_w0 is None else float(self.rdcc_w0),
        )

    def _open_dataset(self, f: h5py.File, key: str) -> h5py.Dataset:
        if not self._chunks[key]:  # contiguous storage has no chunk cache
            return h5py.Dataset(h5py.h5d.open(f.id, key.encode()), readonly=True)
        _, nslots, nbytes, w0 = f.id.get_access_plist().get_cache()
        wanted = self._chunk_cache(key, (nslots, nbytes, w0))
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        dapl.set_chunk_cache(*wanted)
        dset = h5py.Dataset(h5py.h5d.open(f.id, key.encode(), dapl), readonly=True)
        got = dset.id.get_access_plist().get_chunk_cache()
        if got[1] != wanted[1] and key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "%s: dataset %r is already open in this process with a %d-byte chunk cache; "
                "HDF5Reader wanted %d bytes, so its reads may be slower",
                self.path,
                key,
                got[1],
                wanted[1],
            )
        return dset

    @property
    def source(self) -> str:
        return self.path

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    @property
    def chunk_size(self) -> int | None:
        chunks = self._chunks[self.keys[0]]
        return chunks[0] if chunks else None

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"HDF5Reader({self.path!r}, keys={self.keys!r}, length={self._len})"

    # ------------------------------------------------------------------ handles

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _pid=None, _columns=[])
        return state

    def _ensure_open(self) -> list[Any]:
        if self._file is not None and self._pid == os.getpid():
            return self._columns
        self._file = None  # a handle inherited through fork is dropped, not shared
        self._columns = []
        f = self._open()
        columns = []
        for key in self.keys:
            try:
                dset = self._open_dataset(f, key)
            except (KeyError, ValueError, OSError):
                dset = None
            if dset is None or tuple(dset.shape) != self._shapes[key]:
                f.close()
                raise DataError(f"dataset {key!r} changed since the reader was created", file=self.path)
            columns.append(self._preload(dset))
        self._file, self._pid, self._columns = f, os.getpid(), columns
        return columns

    def _preload(self, dset: h5py.Dataset) -> np.ndarray | h5py.Dataset:
        """The whole dataset if small enough and readable; else the dataset, read lazily."""
        if dset.nbytes > self.preload_bytes:
            return dset
        try:
            return dset[()]
        except OSError:  # a damaged chunk: read per batch, so the error names the record
            return dset

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid, self._columns = None, None, []

    # ------------------------------------------------------------------ reading

    def read(self, index: Index) -> tuple[Any, ...]:
        index = check_index(index, self._len, self.path)
        columns = self._ensure_open()
        try:
            if isinstance(index, (int, slice)):
                return tuple(np.array(col[index]) if isinstance(col, np.ndarray) else col[index] for col in columns)
            return tuple(self._gather(key, col, index) for key, col in zip(self.keys, columns))
        except (OSError, RuntimeError, ValueError) as exc:
            raise self.locate_error(index, exc) from exc

    def _gather(self, key: str, column: Any, idx: np.ndarray) -> np.ndarray:
        if isinstance(column, np.ndarray):
            return column[idx]
        spans = coalesce_runs(idx, self.max_gap[key])
        if len(spans) == 1 and spans[0][1] - spans[0][0] == idx.size:
            return column[spans[0][0] : spans[0][1]]
        out = np.empty((idx.size,) + self._shapes[key][1:], dtype=self._dtypes[key])
        pos = 0
        for start, stop in spans:
            count = int(np.searchsorted(idx, stop, side="left")) - pos
            block = column[start:stop]
            out[pos : pos + count] = block if stop - start == count else block[idx[pos : pos + count] - start]
            pos += count
        return out


def _dataset_names(group: h5py.Group) -> list[str]:
    names: list[str] = []
    group.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names
