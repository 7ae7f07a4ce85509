"""Resumable sampling: where exact resume positions the loader.

The loaders of :func:`ptutils.data.make_dataloader` draw indices from a
:class:`ResumableSampler`, whose order for an epoch is a pure function of
``(seed, epoch)``, in batches from a :class:`ResumableBatchSampler`.
:func:`set_loader_position` moves a loader to "epoch *e*, *b* batches already
done": the sampler's next pass skips exactly those ``b * batch_size`` indices, so
a session resumed mid-epoch sees exactly the batches it would have seen.

Each batch is a :class:`BatchIndices` carrying a seed that is a pure function of
``(seed, epoch, batch number)``; :meth:`ptutils.data.Dataset.__getitems__` seeds
random transforms with it, so augmented batches repeat exactly too, whichever
worker makes them and whether or not the session was interrupted.

This module stands on torch alone; :mod:`ptutils.data` builds on it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

__all__ = ["BatchIndices", "ResumableBatchSampler", "ResumableSampler", "set_loader_position"]


def _mix(*values: int) -> int:
    """A 63-bit seed that is a pure function of ``values`` (stable across runs)."""
    data = b"".join(int(v).to_bytes(16, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class BatchIndices(list):
    """A batch of indices carrying the seed of its random transforms (see ResumableBatchSampler)."""

    def __init__(self, indices: Sequence[int], seed: int | None = None, precollate: bool = False):
        super().__init__(indices)
        self.seed = seed
        self.precollate = precollate


class ResumableSampler(Sampler[int]):
    """Indices ``0..length-1`` in an order that is a pure function of ``(seed, epoch)``.

    * ``shuffle=False``: sequential order.  ``shuffle=True``: a full random
      permutation drawn from a local ``torch.Generator`` seeded with
      ``(seed, epoch)``; the global RNG is never touched.
    * ``chunk_size`` (with ``shuffle``): chunk-aware shuffle for chunked storage.
      The chunks (runs of ``chunk_size`` consecutive indices) are permuted, then
      taken ``window`` chunks at a time (default 8) and the indices of those
      chunks permuted together.  Every index still appears exactly once per epoch,
      but randomness is lesser: a batch draws from only about ``window`` chunks,
      and indices of one chunk land in the same stretch of the epoch.  That makes
      reads several times cheaper, and is statistically harmless only when the
      storage order is itself random (shuffle the data when writing it; do not use
      it on data stored sorted by class unless ``window`` spans many classes).

    Position: each ``__iter__`` is one epoch.  It yields the epoch set by
    :meth:`set_epoch` / :meth:`set_position` / :meth:`load_state_dict`, otherwise
    the epoch after the previous pass (so a plain training loop gets a new order
    each epoch).  :meth:`set_position` skips the first ``start`` indices of that
    epoch's order for the next pass only.  ``len()`` is always ``length``.
    """

    def __init__(
        self,
        length: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        chunk_size: int | None = None,
        window: int | None = None,
    ):
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.length = int(length)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.chunk_size = chunk_size
        self.window = window if window is not None else 8
        self.epoch = 0
        self._start = 0
        self._advance = False
        self._pos = 0
        self._token: object | None = None

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass produce ``epoch`` from its beginning."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, start: int) -> None:
        """Make the next pass produce ``epoch`` without its first ``start`` indices."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start <= self.length:
            raise ValueError(f"start must be in [0, {self.length}], got {start}")
        self.epoch = int(epoch)
        self._start = int(start)
        self._advance = False
        self._token = None

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, start)`` the sampler would continue from, as in :meth:`state_dict`.

        During a pass, ``start`` counts the indices handed out so far.  With
        DataLoader workers those run ahead of the batches the loop consumed (they
        are prefetched): for exact resume use the loop's own batch count with
        :func:`set_loader_position`.
        """
        if not self._advance:
            return self.epoch, self._start
        if self._pos >= self.length:
            return self.epoch + 1, 0
        return self.epoch, self._pos

    def state_dict(self) -> dict[str, int]:
        """Plain ints: ``length``, ``seed``, and the ``epoch``/``start`` of :attr:`position`."""
        epoch, start = self.position
        return {"length": self.length, "seed": self.seed, "epoch": epoch, "start": start}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore :meth:`state_dict` output; the next pass continues from it."""
        if int(state["length"]) != self.length:
            raise ValueError(f"state is for {state['length']} samples, this sampler has {self.length}")
        self.seed = int(state["seed"])
        self.set_position(int(state["epoch"]), int(state["start"]))

    def order(self, epoch: int) -> torch.Tensor:
        """The full index order of ``epoch`` (int64 tensor of length ``length``)."""
        n = self.length
        if not self.shuffle:
            return torch.arange(n, dtype=torch.int64)
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
        if self.chunk_size is None or n == 0:
            return torch.randperm(n, generator=gen)
        size = self.chunk_size
        chunks = torch.randperm(math.ceil(n / size), generator=gen)
        parts = []
        for w in range(0, chunks.numel(), self.window):
            spans = [torch.arange(c * size, min((c + 1) * size, n)) for c in chunks[w : w + self.window].tolist()]
            window = torch.cat(spans)
            parts.append(window[torch.randperm(window.numel(), generator=gen)])
        return torch.cat(parts)

    def _begin(self) -> tuple[list[int], int, int, object]:
        """Start a pass: its indices, epoch, start, and the token that tracks it."""
        if self._advance:
            self.epoch += 1
            self._start = 0
        start = self._start
        self._start = 0
        self._advance = True
        self._pos = start
        self._token = token = object()
        return self.order(self.epoch)[start:].tolist(), self.epoch, start, token

    def _handed_out(self, token: object, count: int) -> None:
        """Count indices handed out by the pass of ``token`` (ignored once superseded)."""
        if self._token is token:
            self._pos += count

    def _finish(self, token: object) -> None:
        if self._token is token:
            self._pos = self.length

    def __iter__(self) -> Iterator[int]:
        indices, _, _, token = self._begin()
        return self._generate(indices, token)

    def _generate(self, indices: list[int], token: object) -> Iterator[int]:
        for i in indices:
            self._handed_out(token, 1)
            yield i
        self._finish(token)


class ResumableBatchSampler(BatchSampler):
    """A BatchSampler over a :class:`ResumableSampler` whose batches carry a seed.

    Each batch is a :class:`BatchIndices` with ``seed = f(sampler seed, epoch, batch
    number)``; :meth:`ptutils.data.Dataset.__getitems__` seeds random transforms
    with it, so a batch's augmentation does not depend on which worker made it or
    on whether the session was interrupted.  Batch numbers count from the epoch's start (a pass
    positioned at ``start`` begins at batch ``start // batch_size``).

    ``precollate=True`` tells datasets that the loader's ``collate_fn`` is
    :func:`ptutils.batches.collate`, so :meth:`ptutils.data.Dataset.__getitems__`
    may hand back the batch already collated (no per-sample split and re-stack);
    :func:`ptutils.data.make_dataloader` sets it when it uses that ``collate``.
    """

    sampler: ResumableSampler

    def __init__(
        self, sampler: ResumableSampler, batch_size: int, drop_last: bool = False, *, precollate: bool = False
    ):
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableBatchSampler needs a ResumableSampler, got {type(sampler).__name__}")
        super().__init__(sampler, batch_size, drop_last)
        self.precollate = precollate

    def __iter__(self) -> Iterator[list[int]]:
        sampler, size = self.sampler, self.batch_size
        indices, epoch, start, token = sampler._begin()
        stop = len(indices) - (len(indices) % size if self.drop_last else 0)
        number = start // size
        for k in range(0, stop, size):
            batch = indices[k : k + size]
            sampler._handed_out(token, len(batch))
            yield BatchIndices(batch, _mix(sampler.seed, epoch, number, 0x5EED), self.precollate)
            number += 1
        sampler._finish(token)


def set_loader_position(loader: DataLoader, epoch: int, batches_done: int) -> bool:
    """Position ``loader`` at ``epoch`` with ``batches_done`` batches already consumed.

    Finds the :class:`ResumableSampler` behind the loader (``loader.sampler``, or
    the ``sampler`` of its BatchSampler) and sets it ``batches_done * batch_size``
    samples into ``epoch``, for the loader's next iteration.  Returns True when
    that is exact; False when the loader has no ResumableSampler or an unknown
    batch sampler (e.g. a plain RandomSampler): the caller must then skip
    ``batches_done`` batches itself, knowing the order may differ.
    """
    if epoch < 0 or batches_done < 0:
        raise ValueError(f"epoch and batches_done must be >= 0, got {epoch}, {batches_done}")
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:
        sampler, per_batch, batches = loader.sampler, 1, None
    elif isinstance(batch_sampler, BatchSampler):
        sampler, per_batch, batches = batch_sampler.sampler, batch_sampler.batch_size, len(batch_sampler)
    else:
        return False
    if not isinstance(sampler, ResumableSampler):
        return False
    if batches is None:
        batches = len(sampler)
    if batches_done > batches:
        raise ValueError(f"batches_done={batches_done} exceeds the {batches} batches of an epoch")
    sampler.set_position(epoch, min(batches_done * per_batch, len(sampler)))
    return True
