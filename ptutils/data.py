"""Data for sessions: providers, datasets, and the base of the readers they read through.

A session asks its :class:`DataProvider` for a :class:`torch.utils.data.DataLoader`
with a *request* (a dataset name, or a dict such as ``{"dataset": "train",
"stage": "train", "epoch": 3}``).  The ready :class:`DatasetProvider` answers from a
table of named datasets and per-dataset :class:`LoaderSettings`.

A :class:`Dataset` reads records through a :class:`DataReader` (HDF5, Zarr or an
image folder: see :mod:`ptutils.readers`).  Readers read whole batches at once: the
DataLoader hands a batch's indices to :meth:`Dataset.__getitems__`, which sorts
them and asks the reader for all of them in one call, so contiguous runs become one
slice read instead of one read per sample.  With the default ``collate_fn`` and
no transforms it hands the batch back already collated, and the batch leaves a
DataLoader worker in one shared-memory block (:mod:`ptutils.batches`).

Sampling is resumable (:mod:`ptutils.sampling`): the default loaders draw indices
from a :class:`ResumableSampler`, whose order for an epoch is a pure function of
``(seed, epoch)``, and :func:`set_loader_position` moves a loader to "epoch *e*, *b*
batches already done".  Random transforms of a :class:`Dataset` are seeded per
batch from ``(seed, epoch, batch number)``, so augmented batches repeat exactly too.

This module never imports a file-format library (h5py, zarr): readers live in
:mod:`ptutils.readers` and are imported only when used.  So does the
:class:`ImageNet` dataset, which builds an HDF5 reader from a path
(:mod:`ptutils.readers.imagenet`); ``ptutils.data.ImageNet`` imports it on first use.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .batches import Collated, Samples, _collate_column, collate
from .errors import ConfigError, DataError
from .sampling import BatchIndices, ResumableBatchSampler, ResumableSampler, _mix, set_loader_position

# With the public names of ptutils.sampling and ptutils.batches and the ImageNet of
# ptutils.readers.imagenet, which were defined here once and still import from here.
__all__ = [
    "ArrayReader",
    "BatchIndices",
    "Collated",
    "DataIndexError",
    "DataProvider",
    "DataReader",
    "Dataset",
    "DatasetProvider",
    "ImageNet",  # noqa: F822  (supplied by __getattr__ below, on first use)
    "Index",
    "LoaderSettings",
    "Request",
    "ResumableBatchSampler",
    "ResumableSampler",
    "Samples",
    "check_index",
    "check_requests",
    "coalesce_runs",
    "collate",
    "make_dataloader",
    "set_loader_position",
]

Request = str | Mapping[str, Any]
"""What a session asks a provider for: a dataset name or a dict (see DatasetProvider)."""

Index = int | slice | np.ndarray


class DataIndexError(DataError, IndexError):
    """An index is outside a data source; also an IndexError so ``for x in ds`` stops."""


# --------------------------------------------------------------------------- readers


def check_index(index: Index, length: int, source: str | None = None) -> Index:
    """Validate ``index`` for a source of ``length`` records and normalise it.

    Returns a non-negative ``int``, a ``slice`` with step 1 and ``0 <= start <= stop
    <= length``, or a 1-D int64 array that is strictly increasing (sorted, no
    duplicates) and in range.  Anything else raises :class:`DataIndexError` naming
    ``source``.  Readers call this first so every reader rejects bad indices alike.
    """
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        i = int(index)
        if i < 0:
            i += length
        if not 0 <= i < length:
            raise DataIndexError(f"index out of range for {length} records", file=source, index=int(index))
        return i
    if isinstance(index, slice):
        start, stop, step = index.indices(length)
        if step != 1:
            raise DataIndexError("only slices with step 1 are supported", file=source, index=index)
        return slice(start, max(start, stop))
    arr = np.asarray(index)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise DataIndexError("expected an int, a slice or a 1-D integer array", file=source, index=repr(index))
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr[0] < 0 or arr[-1] >= length):
        bad = int(arr[0] if arr[0] < 0 else arr[-1])
        raise DataIndexError(f"index out of range for {length} records", file=source, index=bad)
    if arr.size > 1 and not bool(np.all(arr[1:] > arr[:-1])):
        raise DataIndexError("index arrays must be strictly increasing", file=source, index=arr.tolist())
    return arr


def coalesce_runs(indices: np.ndarray, max_gap: int = 0) -> list[tuple[int, int]]:
    """Group sorted ``indices`` into ``(start, stop)`` spans to read as slices.

    Neighbours at most ``max_gap`` records apart share a span (the records between
    them are read and dropped): one larger read is cheaper than two small ones when
    the gap is smaller than a storage chunk or a few kilobytes.
    """
    if indices.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) > max_gap + 1) + 1
    starts = indices[np.concatenate(([0], breaks))]
    stops = indices[np.concatenate((breaks - 1, [indices.size - 1]))] + 1
    return list(zip(starts.tolist(), stops.tolist()))


class DataReader(abc.ABC):
    """Reads records of one data source by position; the base of every reader.

    A record is a tuple of fields named by :attr:`fields` (e.g. ``("images",
    "labels")``).  :meth:`read` takes

    * an ``int``: returns the record, one value per field;
    * a ``slice`` (step 1) or a strictly increasing int array: returns one *column*
      per field holding those records in order (a numpy array of shape ``(n, ...)``,
      or a list when records differ in shape, like decoded images).

    Readers must be picklable without open handles (they travel to DataLoader
    worker processes) and open their source lazily in each process.
    """

    #: The names of the fields of a record.
    fields: tuple[str, ...] = ("data",)

    @property
    def source(self) -> str:
        """The file, folder or URL read, as named in error messages."""
        return type(self).__name__

    @property
    def shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Full shape of each field (first axis = records), or None when records vary."""
        return None

    @property
    def chunk_size(self) -> int | None:
        """Records per storage chunk (for chunk-aware shuffling), or None if unchunked."""
        return None

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of records."""

    @abc.abstractmethod
    def read(self, index: Index) -> tuple[Any, ...]:
        """Read one record (``int``) or a batch of records (slice / sorted array)."""

    def close(self) -> None:
        """Release open handles in this process (reopened lazily on the next read)."""

    def record_name(self, index: int) -> str:
        """Record ``index`` as error messages name it (readers of files add the file)."""
        return f"index {index}"

    def locate_error(self, index: Index, exc: BaseException) -> DataError:
        """The error naming the first record of ``index`` that cannot be read.

        Readers call this when a batched read fails: each record is retried alone
        (slow, but only on failure) so the error names the bad index.
        """
        if isinstance(index, slice):
            index = np.arange(index.start, index.stop)
        if isinstance(index, np.ndarray):
            for i in index.tolist():
                try:
                    self.read(i)
                except DataError as err:
                    return err
        return DataError(f"cannot read: {exc}", file=self.source, index=index if isinstance(index, int) else None)

    def __enter__(self) -> DataReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArrayReader(DataReader):
    """Records from in-memory arrays of equal length (numpy arrays or tensors).

    ``ArrayReader(images=x, labels=y)``: the keyword order is the field order.
    For small data, tests and examples; reads return copies, never views.
    """

    def __init__(self, **arrays: Any):
        if not arrays:
            raise DataError("no arrays given", file="ArrayReader")
        self.arrays = {name: np.asarray(value) for name, value in arrays.items()}
        for name, value in self.arrays.items():
            if value.ndim == 0:
                raise DataError(f"array {name!r} is a scalar; records need a first axis", file="ArrayReader")
        lengths = {name: len(value) for name, value in self.arrays.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"arrays have different lengths: {lengths}", file="ArrayReader")
        self.fields = tuple(self.arrays)
        self._len = next(iter(lengths.values()))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: value.shape for name, value in self.arrays.items()}

    def __len__(self) -> int:
        return self._len

    def read(self, index: Index) -> tuple[Any, ...]:
        index = check_index(index, self._len, self.source)
        return tuple(np.array(value[index]) for value in self.arrays.values())


# --------------------------------------------------------------------------- datasets


def _to_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value) if value.flags.writeable else torch.from_numpy(value.copy())
    return value


def _scalar(value: Any) -> Any:
    """A record's 0-d value as a plain Python number (like torchvision labels)."""
    if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
        return value.item()
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    return value


class _SeededRNG:
    """Run a block with the torch CPU RNG seeded, restoring the caller's state after."""

    def __init__(self, seed: int | None):
        self.seed = seed

    def __enter__(self) -> None:
        if self.seed is not None:
            self._state = torch.get_rng_state()
            torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        if self.seed is not None:
            torch.set_rng_state(self._state)


class Dataset(torch.utils.data.Dataset):
    """A torch Dataset reading its records through a :class:`DataReader`.

    A sample is the record's single field, or a tuple of its fields; arrays become
    tensors and 0-d values Python numbers.  ``transform`` applies to the first field
    (the input), ``target_transform`` to the second (the target).

    The DataLoader calls :meth:`__getitems__` with a whole batch of indices: they
    are read in one sorted, coalesced reader call.  Without transforms the batch
    comes back already collated (see :func:`collate`).  With transforms, the torch
    RNG is seeded per batch when the batch carries a seed (as those of
    :class:`ResumableBatchSampler` do), so random augmentations repeat exactly when
    a session resumes.
    """

    def __init__(
        self,
        reader: DataReader,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
    ):
        self.reader = reader
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def chunk_size(self) -> int | None:
        """The reader's records per storage chunk (used by ``chunk_size="auto"``)."""
        return self.reader.chunk_size

    def to_tensors(self, record: tuple[Any, ...], *, batch: bool) -> tuple[Any, ...]:
        """Convert raw reader output (one record, or columns if ``batch``) to tensors.

        Subclasses override this to reshape fields (e.g. NHWC -> CHW images).
        """
        if batch:
            return tuple(_to_tensor(col) if isinstance(col, np.ndarray) else col for col in record)
        return tuple(_scalar(_to_tensor(v)) for v in record)

    def _finish(self, values: Sequence[Any]) -> Any:
        values = list(values)
        if self.transform is not None:
            values[0] = self.transform(values[0])
        if self.target_transform is not None and len(values) > 1:
            values[1] = self.target_transform(values[1])
        return values[0] if len(values) == 1 else tuple(values)

    def __getitem__(self, index: int) -> Any:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise DataIndexError("Dataset indices are ints", file=self.reader.source, index=repr(index))
        record = self.reader.read(check_index(index, len(self), self.reader.source))
        return self._finish(self.to_tensors(tuple(record), batch=False))

    def __getitems__(self, indices: Sequence[int]) -> list[Any] | Collated:
        """Read a batch in one reader call; the samples come back in ``indices`` order.

        Returns the list of samples, or, when the indices ask for it
        (``BatchIndices.precollate``) and there are no transforms, the collated
        batch wrapped in :class:`Collated`.
        """
        idx = np.asarray(indices, dtype=np.int64)
        n = len(self)
        if idx.size and idx.min() < 0:
            idx = np.where(idx < 0, idx + n, idx)
        if idx.size < 2 or bool(np.all(idx[1:] > idx[:-1])):
            columns = self.reader.read(check_index(idx, n, self.reader.source))
        else:
            unique, inverse = np.unique(idx, return_inverse=True)
            columns = self.reader.read(check_index(unique, n, self.reader.source))
            columns = tuple(
                [col[j] for j in inverse.tolist()] if isinstance(col, list) else col[inverse] for col in columns
            )
        columns = self.to_tensors(tuple(columns), batch=True)
        if self.transform is None and self.target_transform is None:
            if getattr(indices, "precollate", False):
                collated = [_collate_column(col) for col in columns]
                if all(c is not None for c in collated):
                    return Collated(collated[0] if len(collated) == 1 else collated)
            return self._samples([self._finish(self._row(columns, j)) for j in range(idx.size)], idx)
        with _SeededRNG(getattr(indices, "seed", None)):
            return self._samples([self._finish(self._row(columns, j)) for j in range(idx.size)], idx)

    def _samples(self, samples: list[Any], idx: np.ndarray) -> Samples:
        """The samples, with the names of their records for an error that cannot collate them."""
        reader = self.reader
        return Samples(samples, lambda j: reader.record_name(int(idx[j])), reader.source)

    @staticmethod
    def _row(columns: tuple[Any, ...], j: int) -> list[Any]:
        return [col[j] if isinstance(col, list) else _scalar(col[j]) for col in columns]


# --------------------------------------------------------------------------- providers


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
    """How to build a DataLoader for one dataset; any field can be overridden per request.

    ``shuffle`` with ``chunk_size`` selects the chunk-aware shuffle of
    :class:`ResumableSampler` (``chunk_size="auto"`` takes the dataset's
    ``chunk_size``, e.g. its HDF5/Zarr chunking).  ``sampler`` replaces the
    ResumableSampler (a Sampler, or a callable ``dataset -> Sampler``); exact
    resume then holds only if it is a ResumableSampler.
    """

    batch_size: int = 1
    shuffle: bool = False
    seed: int = 0
    chunk_size: int | str | None = None
    window: int | None = None
    sampler: Sampler[int] | Callable[[Any], Sampler[int]] | None = None
    num_workers: int = 0
    pin_memory: bool = False
    drop_last: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    multiprocessing_context: str | None = None
    collate_fn: Callable[[Any], Any] | None = None
    worker_init_fn: Callable[[int], None] | None = None
    timeout: float = 0

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, minimum: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(name, f"expected an int >= {minimum}, got {value!r}")

        positive("batch_size", self.batch_size, 1)
        positive("num_workers", self.num_workers, 0)
        positive("seed", self.seed, 0)
        if self.chunk_size is not None and self.chunk_size != "auto":
            positive("chunk_size", self.chunk_size, 1)
        if self.window is not None:
            positive("window", self.window, 1)
        if self.prefetch_factor is not None:
            positive("prefetch_factor", self.prefetch_factor, 1)
        if self.sampler is not None and self.shuffle:
            raise ConfigError("shuffle", "cannot shuffle when a sampler is given (the sampler decides the order)")
        if self.multiprocessing_context not in (None, "fork", "spawn", "forkserver"):
            raise ConfigError("multiprocessing_context", f"unknown start method {self.multiprocessing_context!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "") -> LoaderSettings:
        """Build from a dict, naming an unknown key (``where`` prefixes its path)."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                raise ConfigError(f"{where}{key}", f"unknown loader setting; known: {sorted(names)}")
        return cls(**values)

    def replace(self, **changes: Any) -> LoaderSettings:
        """A copy with ``changes`` (validated like the constructor)."""
        return dataclasses.replace(self, **changes)


def make_dataloader(dataset: Any, settings: LoaderSettings | None = None, **overrides: Any) -> DataLoader:
    """Build a DataLoader for ``dataset`` from ``settings`` (plus ``overrides``).

    Map-style datasets get a :class:`ResumableSampler` (``shuffle``/``seed``/
    ``chunk_size``/``window``) inside a :class:`ResumableBatchSampler`, so
    :func:`set_loader_position` is exact.  The loader has its own
    ``torch.Generator`` (seeded from ``seed``), so iterating it never consumes the
    global RNG that the model's initialisation and dropout use.
    """
    settings = settings or LoaderSettings()
    if overrides:
        settings = settings.replace(**overrides)
    common: dict[str, Any] = {
        "num_workers": settings.num_workers,
        "pin_memory": settings.pin_memory,
        "collate_fn": settings.collate_fn or collate,
        "worker_init_fn": settings.worker_init_fn,
        "timeout": settings.timeout,
        "generator": torch.Generator().manual_seed(_mix(settings.seed, 0x10AD)),
    }
    if settings.num_workers > 0:
        common["persistent_workers"] = settings.persistent_workers
        common["prefetch_factor"] = settings.prefetch_factor
        common["multiprocessing_context"] = settings.multiprocessing_context
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return DataLoader(dataset, batch_size=settings.batch_size, drop_last=settings.drop_last, **common)
    sampler = settings.sampler
    if callable(sampler) and not isinstance(sampler, Sampler):
        sampler = sampler(dataset)
    if sampler is None:
        chunk = settings.chunk_size
        if chunk == "auto":
            chunk = getattr(dataset, "chunk_size", None)
        sampler = ResumableSampler(
            len(dataset), shuffle=settings.shuffle, seed=settings.seed, chunk_size=chunk, window=settings.window
        )
    if isinstance(sampler, ResumableSampler):
        batches = ResumableBatchSampler(
            sampler, settings.batch_size, settings.drop_last, precollate=settings.collate_fn is None
        )
        return DataLoader(dataset, batch_sampler=batches, **common)
    return DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, drop_last=settings.drop_last, **common)


class DataProvider(abc.ABC):
    """Answers a session's data requests with DataLoaders.

    A request is whatever the session's state calls for: a dataset name, or a dict
    with the stage, epoch, metrics...  Subclasses decide what it means.
    """

    @abc.abstractmethod
    def get_dataloader(self, request: Request) -> DataLoader:
        """Return a DataLoader answering ``request``."""

    def check_request(self, request: Request) -> None:
        """Raise ConfigError if ``request`` cannot be answered, without building a loader.

        A session checks its stages' and updates' requests when it is built, so a
        misspelled name fails then rather than an epoch into ``run()``.  This default
        accepts every request: override it where the provider can tell.
        """


def check_requests(provider: DataProvider | None, requests: Sequence[tuple[str, Any]]) -> None:
    """Check each ``(field, request)`` with ``provider``; ConfigError naming the field that makes it.

    Requests made from the session's state (callables) are checked when made, as
    are absent ones (a stage without ``data`` may never run), and nothing is checked
    without a provider (one may be set later) or with one that has no
    ``check_request`` (any object with ``get_dataloader`` will do).
    """
    check = getattr(provider, "check_request", None)
    if check is None:
        return
    for field, request in requests:
        if request is None or callable(request):
            continue
        try:
            check(request)
        except ConfigError as exc:
            inner = "" if exc.field.startswith("request") else f".{exc.field}"
            raise ConfigError(field + inner, str(exc).split(": ", 1)[1]) from None


class DatasetProvider(DataProvider):
    """A provider over named datasets with per-dataset loader settings.

    ``datasets`` maps names to any map-style torch dataset (a ptutils
    :class:`Dataset`, a ``torchvision.datasets.ImageFolder`` subclass, ...).
    ``loaders`` maps names to :class:`LoaderSettings` (or dicts of them);
    ``default`` applies to names without an entry.

    A request is a name, or a dict naming the dataset under ``"dataset"`` (or, if
    absent, ``"stage"``), where keys that are LoaderSettings fields override those
    settings for this loader (e.g. ``{"dataset": "train", "batch_size": 64}``) and
    ``"epoch"`` sets the sampler's epoch.  Other keys (stage, metrics) are free for
    subclasses that override :meth:`resolve`.  Each call builds a new DataLoader.
    :meth:`check_request` asks :meth:`resolve`, so a subclass that answers other
    requests in :meth:`get_dataloader` overrides it too.
    """

    def __init__(
        self,
        datasets: Mapping[str, Any],
        loaders: Mapping[str, LoaderSettings | Mapping[str, Any]] | None = None,
        *,
        default: LoaderSettings | Mapping[str, Any] | None = None,
    ):
        self.datasets = dict(datasets)
        self.default = self._settings(default, "default.")
        self.loaders: dict[str, LoaderSettings] = {}
        for name, settings in (loaders or {}).items():
            if name not in self.datasets:
                raise ConfigError(f"loaders.{name}", f"no dataset named {name!r}; known: {sorted(self.datasets)}")
            self.loaders[name] = self._settings(settings, f"loaders.{name}.")

    @staticmethod
    def _settings(value: LoaderSettings | Mapping[str, Any] | None, where: str) -> LoaderSettings:
        if value is None:
            return LoaderSettings()
        if isinstance(value, LoaderSettings):
            return value
        return LoaderSettings.from_mapping(value, where)

    def resolve(self, request: Request) -> tuple[str, LoaderSettings]:
        """Turn a request into a dataset name and the settings of its loader."""
        if isinstance(request, str):
            name, overrides = request, {}
        elif isinstance(request, Mapping):
            name = request.get("dataset", request.get("stage"))
            if not isinstance(name, str):
                raise ConfigError("request.dataset", f"name a dataset under 'dataset' or 'stage': {dict(request)!r}")
            fields = {f.name for f in dataclasses.fields(LoaderSettings)}
            overrides = {k: v for k, v in request.items() if k in fields}
        else:
            raise ConfigError("request", f"expected a dataset name or a dict, got {type(request).__name__}")
        if name not in self.datasets:
            raise ConfigError("request.dataset", f"no dataset {name!r}; known: {', '.join(sorted(self.datasets))}")
        settings = self.loaders.get(name, self.default)
        return name, settings.replace(**overrides) if overrides else settings

    def check_request(self, request: Request) -> None:
        """ConfigError naming what :meth:`resolve` refuses (an unknown dataset, a bad loader setting)."""
        self.resolve(request)

    def get_dataloader(self, request: Request) -> DataLoader:
        """A new DataLoader for the dataset the request names, positioned at its epoch."""
        name, settings = self.resolve(request)
        loader = make_dataloader(self.datasets[name], settings)
        if isinstance(request, Mapping) and request.get("epoch") is not None:
            set_loader_position(loader, int(request["epoch"]), 0)
        return loader


def __getattr__(name: str) -> Any:
    """``ptutils.data.ImageNet`` imports :mod:`ptutils.readers.imagenet` on first use, so that
    ``import ptutils.data`` imports no reader."""
    if name == "ImageNet":
        from ptutils.readers.imagenet import ImageNet

        return ImageNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "ImageNet"])
