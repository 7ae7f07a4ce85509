"""ZarrReader: records from zarr v3 arrays (one array, or several in a group).

Any store zarr can open works: a local path, a ``file://``, ``memory://`` or other
fsspec URL (with ``storage_options``), or an already open ``zarr.Array`` /
``zarr.Group``.  A batch is read with one zarr call per span of indices, and zarr
decodes each chunk a span touches once, concurrently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from ptutils.data import DataReader, Index, check_index, coalesce_runs
from ptutils.errors import DataError

__all__ = ["ZarrReader"]

_MiB = 1 << 20


class ZarrReader(DataReader):
    """Reads records whose fields are zarr arrays of equal length.

    ``source`` is a zarr array (one field, named ``keys`` if given as a string,
    else after the array) or a group with the arrays ``keys`` (default
    ``("images", "labels")``).  Arrays of at most ``preload_bytes`` (e.g. labels)
    are read whole once per process.  ``max_gap`` is the largest number of unwanted
    records read to save a zarr call (default: one chunk, as zarr decodes whole
    chunks anyway).  Sources given as paths or URLs are reopened lazily in each
    process; open zarr objects are pickled as zarr pickles them.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | zarr.Array | zarr.Group,
        keys: str | Sequence[str] | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        max_gap: int | None = None,
        preload_bytes: int = 16 * _MiB,
    ):
        if isinstance(source, (zarr.Array, zarr.Group)):
            self._url = None
            self._node: zarr.Array | zarr.Group | None = source
            self._name = f"{source.store}/{source.path}".rstrip("/")
        else:
            self._url = os.fspath(source)
            self._node = None
            self._name = self._url
        self.storage_options = dict(storage_options) if storage_options else None
        self.preload_bytes = int(preload_bytes)
        node = self._open_node()
        arrays = self._select(node, keys)
        self.fields = tuple(arrays)
        self._shapes = {k: tuple(a.shape) for k, a in arrays.items()}
        self._chunks = {k: tuple(a.chunks) for k, a in arrays.items()}
        lengths = {k: s[0] for k, s in self._shapes.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"arrays have different lengths: {lengths}", file=self._name)
        self._len = next(iter(lengths.values()))
        self.max_gap = {k: (c[0] - 1 if max_gap is None else int(max_gap)) for k, c in self._chunks.items()}
        self._keys = keys
        self._pid: int | None = None
        self._columns: list[Any] = []

    # ------------------------------------------------------------------ metadata

    def _open_node(self) -> zarr.Array | zarr.Group:
        if self._node is not None:
            return self._node
        try:
            return zarr.open(store=self._url, mode="r", storage_options=self.storage_options)
        except (FileNotFoundError, zarr.errors.NodeNotFoundError) as exc:
            raise DataError("no zarr array or group here", file=self._name) from exc
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise DataError(f"cannot open as zarr: {exc}", file=self._name) from exc

    def _select(self, node: zarr.Array | zarr.Group, keys: str | Sequence[str] | None) -> dict[str, zarr.Array]:
        if isinstance(node, zarr.Array):
            if keys is not None and not isinstance(keys, str):
                raise DataError("a single array has one field; give keys as one name or None", file=self._name)
            name = keys if isinstance(keys, str) else (node.basename or self._basename())
            arrays = {name: node}
        else:
            names = ("images", "labels") if keys is None else ((keys,) if isinstance(keys, str) else tuple(keys))
            if not names:
                raise DataError("no array keys given", file=self._name)
            arrays = {}
            for key in names:
                try:
                    member = node[key]
                except KeyError:
                    found = sorted(name for name, _ in node.arrays())
                    raise DataError(f"no array {key!r} (arrays in the group: {found})", file=self._name) from None
                if not isinstance(member, zarr.Array):
                    raise DataError(f"{key!r} is a group, not an array", file=self._name)
                arrays[key] = member
        for key, array in arrays.items():
            if array.ndim == 0:
                raise DataError(f"array {key!r} is a scalar; records need a first axis", file=self._name)
            if np.dtype(array.dtype).kind not in "biuf":
                raise DataError(f"array {key!r} has unsupported dtype {array.dtype}", file=self._name)
        return arrays

    def _basename(self) -> str:
        """The array's name from its URL or path ("data" when there is none)."""
        return os.path.basename((self._url or "").rstrip("/")) or "data"

    @property
    def source(self) -> str:
        return self._name

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    @property
    def chunk_size(self) -> int | None:
        return self._chunks[self.fields[0]][0]

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"ZarrReader({self._name!r}, fields={self.fields!r}, length={self._len})"

    # ------------------------------------------------------------------ handles

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _columns=[])
        return state

    def _ensure_open(self) -> list[Any]:
        if self._pid == os.getpid():
            return self._columns
        arrays = self._select(self._open_node(), self._keys)
        columns: list[Any] = []
        for key, array in arrays.items():
            if tuple(array.shape) != self._shapes[key]:
                raise DataError(f"array {key!r} changed since the reader was created", file=self._name)
            columns.append(self._preload(array))
        self._pid, self._columns = os.getpid(), columns
        return columns

    def _preload(self, array: zarr.Array) -> np.ndarray | zarr.Array:
        """The whole array if small enough and readable; else the array, read lazily."""
        if array.nbytes > self.preload_bytes:
            return array
        try:
            return array[...]
        except Exception:  # noqa: BLE001 -- codecs raise many types; read per batch to name the record
            return array

    def close(self) -> None:
        self._pid, self._columns = None, []

    # ------------------------------------------------------------------ reading

    def read(self, index: Index) -> tuple[Any, ...]:
        index = check_index(index, self._len, self._name)
        columns = self._ensure_open()
        try:
            if isinstance(index, (int, slice)):
                return tuple(np.array(col[index]) for col in columns)
            return tuple(self._gather(key, col, index) for key, col in zip(self.fields, columns))
        except DataError:
            raise
        except Exception as exc:  # codecs and stores raise many types; name the record
            raise self.locate_error(index, exc) from exc

    def _gather(self, key: str, column: Any, idx: np.ndarray) -> np.ndarray:
        if isinstance(column, np.ndarray):
            return column[idx]
        spans = coalesce_runs(idx, self.max_gap[key])
        if len(spans) == 1 and spans[0][1] - spans[0][0] == idx.size:
            return column[spans[0][0] : spans[0][1]]
        parts = []
        pos = 0
        for start, stop in spans:
            count = int(np.searchsorted(idx, stop, side="left")) - pos
            block = column[start:stop]
            parts.append(block if stop - start == count else block[idx[pos : pos + count] - start])
            pos += count
        return np.concatenate(parts)
