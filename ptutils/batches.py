"""Batches: collating them, and carrying them out of DataLoader workers.

A :class:`ptutils.data.Dataset` reads a whole batch in one reader call, so it can
collate the batch itself: :func:`_collate_column` builds what ``default_collate``
would make of a column without splitting it into samples, and the dataset hands
the result back wrapped in :class:`Collated`.  :func:`collate`, the default
``collate_fn`` of :func:`ptutils.data.make_dataloader`, unwraps it and collates
anything else with ``default_collate``.  Samples of different sizes (images
of different sizes, most often) cannot be stacked into one batch: :func:`collate`
raises a :class:`~ptutils.errors.DataError` naming them and their sizes, and the
files they came from when the Dataset handed them over as :class:`Samples`.

From a DataLoader worker, a collated batch travels to the main process in one
reused shared-memory block (:class:`_SharedBatch`) rather than one fresh segment
per tensor.  The blocks come from ``_pool``, a process-global :class:`_BlockPool`
that each sending process makes for itself (a forked worker notices by its pid
that the pool it inherited is its parent's).  The main process gets plain tensors
it owns either way.

This module stands on torch (and :mod:`ptutils.errors`) alone; :mod:`ptutils.data` builds on it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from .errors import DataError

__all__ = ["Collated", "Samples", "collate"]

RESIZE_HINT = (
    "give the Dataset a transform to one size, e.g. Dataset(reader, transform=torchvision.transforms.v2.Resize"
    "((224, 224))), or CenterCrop / RandomResizedCrop"
)


def _collate_column(column: Any) -> Any:
    """What ``default_collate`` makes of a column, built without splitting it.

    Python-scalar fields collate to int64 / float64 / bool tensors; array fields
    and lists of same-shape tensors (decoded images) stack.  Returns None for
    other lists (records of varying shape: collated per sample).
    """
    if isinstance(column, list):
        first = column[0] if column else None
        if isinstance(first, torch.Tensor) and all(
            isinstance(t, torch.Tensor) and t.shape == first.shape and t.dtype == first.dtype for t in column
        ):
            return torch.stack(column)
        return None
    tensor = torch.as_tensor(column)
    if tensor.dim() == 1:
        if tensor.dtype.is_floating_point:
            return tensor.to(torch.float64)
        if tensor.dtype == torch.bool:
            return tensor
        return tensor.to(torch.int64)
    return tensor


class Collated:
    """A batch a :class:`ptutils.data.Dataset` collated itself; :func:`collate` unwraps it."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class Samples(list):
    """A batch's samples, not collated yet, with the names of the records they came from.

    ``name(j)`` names sample ``j`` (its index and file); it is only called when
    :func:`collate` cannot stack the samples and names them in its error.
    """

    __slots__ = ("name", "source")

    def __init__(self, samples: Sequence[Any], name: Callable[[int], str], source: str | None = None):
        super().__init__(samples)
        self.name = name
        self.source = source


def _shape_of(sample: Any, field: Any) -> tuple[int, ...] | None:
    value = sample if field is None else sample[field]
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _size_mismatch(batch: Sequence[Any]) -> DataError | None:
    """The error naming the samples of ``batch`` whose tensors differ in size, or None if none do."""
    if not isinstance(batch, Sequence) or not batch:
        return None
    first = batch[0]
    if isinstance(first, torch.Tensor):
        fields: list[Any] = [None]
    elif isinstance(first, Mapping):
        fields = list(first)
    elif isinstance(first, Sequence) and not isinstance(first, str):
        fields = list(range(len(first)))
    else:
        return None
    for field in fields:
        try:
            shapes = [_shape_of(sample, field) for sample in batch]
        except (KeyError, IndexError, TypeError):
            return None
        if None in shapes or len(set(shapes)) < 2:
            continue
        name = batch.name if isinstance(batch, Samples) else (lambda j: f"sample {j} of the batch")
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for j, shape in enumerate(shapes):
            by_shape.setdefault(shape, []).append(j)
        sizes = "; ".join(
            f"{'x'.join(map(str, shape))}: {', '.join(name(j) for j in js[:2])}{' ...' if len(js) > 2 else ''}"
            for shape, js in list(by_shape.items())[:4]
        )
        what = "" if field is None else f" (field {field!r})"
        return DataError(
            f"samples of different sizes in one batch{what}, which torch cannot stack: {sizes}; {RESIZE_HINT}",
            file=batch.source if isinstance(batch, Samples) else None,
        )
    return None


_ALIGN = 64
_Layout = list[tuple[int, torch.dtype, tuple[int, ...]]]


def _views(block: torch.Tensor, layout: _Layout) -> list[torch.Tensor]:
    """The tensors laid out in ``block`` (views; the first ``_ALIGN`` bytes are its header)."""
    return [
        block[_ALIGN + off : _ALIGN + off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for off, dtype, shape in layout
    ]


def _copy_out(view: torch.Tensor) -> torch.Tensor:
    """A plain copy of ``view``, made by numpy where it can (torch may wake its thread pool)."""
    try:
        return torch.from_numpy(view.numpy().copy())
    except TypeError:  # dtypes numpy lacks (bfloat16, ...)
        return view.clone()


def _unpack_batch(block: torch.Tensor, layout: _Layout, single: bool) -> Any:
    """Rebuild a :class:`_SharedBatch` in the receiving process: copy it out, free its block."""
    tensors = [_copy_out(view) for view in _views(block, layout)]
    block[:1].numpy()[0] = 0
    return tensors[0] if single else tensors


class _BlockPool:
    """The shared-memory blocks one process reuses for the batches it sends.

    A block's first byte is 1 while a batch in it is on its way and 0 once the
    receiver copied it out; only free blocks are reused.  At most ``limit`` blocks
    are kept (the batches a worker has in flight); past that (say, batches never
    received because their loader was dropped) a block is used once and released.
    """

    limit = 8

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.blocks: list[tuple[torch.Tensor, np.ndarray]] = []

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A block of at least ``nbytes`` after its header, marked busy."""
        size = _ALIGN + nbytes
        for block, flag in self.blocks:
            if flag[0] == 0 and block.numel() >= size:
                flag[0] = 1
                return block
        free = [k for k, (_, flag) in enumerate(self.blocks) if flag[0] == 0]
        if len(self.blocks) >= self.limit and free:  # replace a free block too small for this batch
            del self.blocks[free[0]]
        block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
        flag = block[:1].numpy()
        flag[0] = 1
        if len(self.blocks) < self.limit:
            self.blocks.append((block, flag))
        return block


_pool: _BlockPool | None = None


class _SharedBatch:
    """A collated batch in one reused shared-memory block, sent from a DataLoader worker.

    By default a worker sends each tensor of a batch in a fresh shared-memory
    segment: the worker faults in new pages for every batch (costly on VMs) and
    the main process fetches each segment's file descriptor over a socket
    handshake.  Here the batch is copied into one block (one handshake) of a
    per-worker :class:`_BlockPool`, whose pages stay mapped; the main process
    copies it out (its tensors are plain ones it owns) and marks the block free
    for the worker's next batch.
    """

    __slots__ = ("block", "layout", "single")

    def __init__(self, value: torch.Tensor | Sequence[torch.Tensor]):
        global _pool
        self.single = isinstance(value, torch.Tensor)
        tensors = [value] if isinstance(value, torch.Tensor) else list(value)
        self.layout: _Layout = []
        total = 0
        for t in tensors:
            self.layout.append((total, t.dtype, tuple(t.shape)))
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        if _pool is None or _pool.pid != os.getpid():
            _pool = _BlockPool()
        self.block = _pool.acquire(total)
        for t, view in zip(tensors, _views(self.block, self.layout)):
            view.copy_(t)

    @staticmethod
    def fits(value: Any) -> bool:
        """Whether ``value`` is a dense CPU tensor or a non-empty list of them."""
        tensors = [value] if isinstance(value, torch.Tensor) else value
        if not isinstance(tensors, list) or not tensors:
            return False
        return all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided for t in tensors)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpack_batch, (self.block, self.layout, self.single))


def collate(batch: Any) -> Any:
    """``default_collate``, passing through batches a :class:`ptutils.data.Dataset` already collated.

    In a DataLoader worker, a batch the Dataset collated travels to the main
    process in one reused shared-memory block (see :class:`_SharedBatch`); the
    main process gets the same tensors either way.
    """
    if isinstance(batch, Collated):
        value = batch.value
        if torch.utils.data.get_worker_info() is not None and _SharedBatch.fits(value):
            return _SharedBatch(value)
        return value
    try:
        return default_collate(batch)
    except RuntimeError as exc:
        mismatch = _size_mismatch(batch)
        if mismatch is None:
            raise
        raise mismatch from exc
