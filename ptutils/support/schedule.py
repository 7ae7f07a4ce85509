"""TFUtils' save schedule in closed form (spec §4.3, §4.4): which steps write what, without running anything.

TFUtils calls ``DBInterface.save`` once per step after the update, with ``step`` = the
number of updates done (``tfutils/db_interface.py:746-754``), and once at step 0 for the
``validate_first`` validation.  With m, v, f, c = save_metrics_freq, save_valid_freq,
save_filters_freq, cache_filters_freq and L = "the weights came from the database":

    perm  = step % f == 0 and (step > 0 or (save_initial_filters and not L))
    cache = step % c == 0 and (step > 0 or (save_initial_filters and not L))
    write = do_save and (perm or cache or step % m == 0 or step % v == 0)

A run starts at global step ``start`` (0 when fresh, S when resumed) and trains to
``end``; nothing is written when ``start >= end`` (training is cancelled), nothing at
``start`` itself unless ``start == 0`` and ``validate_first``, and the steps after the
last write point are never written.  A permanent checkpoint's record is the GridFS file
doc (``saved_filters: True``); a cached one goes to ``__RECENT`` (which keeps the newest
``cache_max_num``) while its record, with ``saved_filters: False``, goes to the main
collection.  Step 0's checkpoint is always permanent (0 is a multiple of f), so the
cache never holds step 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Protocol

import attrs

__all__ = [
    "Counts", "PlannedRecord", "SaveFrequencies", "cache_steps", "expected_counts", "filter_steps", "last_step",
    "plan", "recent_kept", "record_steps", "records_per_test_run", "validation_steps",
]


class SaveFrequencies(Protocol):
    """What the schedule reads from a save group (:class:`ptutils.support.groups.SaveGroup` has it all)."""

    do_save: bool
    save_metrics_freq: int
    save_valid_freq: int
    save_filters_freq: int
    cache_filters_freq: int
    cache_max_num: int
    save_initial_filters: bool


def last_step(num_steps: int | float) -> int:
    """The last step a run reaches for ``num_steps``: the loop goes on while ``step < num_steps``, so ``ceil``."""
    if math.isinf(num_steps):
        raise ValueError("an unbounded run (num_steps=inf) has no last step")
    return math.ceil(num_steps)


def _multiples(freq: int, start: int, end: int) -> range:
    """Multiples of ``freq`` in ``(start, end]``."""
    return range((start // freq + 1) * freq, end + 1, freq)


def _count(freq: int, start: int, end: int) -> int:
    return max(0, end // freq - start // freq)


def _runs(save: SaveFrequencies, start: int, end: int) -> bool:
    return save.do_save and start < end


def _initial(save: SaveFrequencies, start: int, validate_first: bool) -> bool:
    """A step-0 record is written: fresh start with validate_first (0 is a multiple of every frequency)."""
    return start == 0 and validate_first


def _initial_filters(save: SaveFrequencies, start: int, validate_first: bool, restored: bool) -> bool:
    return _initial(save, start, validate_first) and save.save_initial_filters and not restored


def _freqs(save: SaveFrequencies) -> tuple[int, ...]:
    return (save.save_metrics_freq, save.save_valid_freq, save.save_filters_freq, save.cache_filters_freq)


def record_steps(save: SaveFrequencies, start: int, end: int, *, validate_first: bool = True) -> list[int]:
    """The ``step`` of every record written in ``<collname>.files``, in order (checkpoint records included)."""
    if not _runs(save, start, end):
        return []
    steps = sorted(set().union(*(_multiples(f, start, end) for f in _freqs(save))))
    return ([0] if _initial(save, start, validate_first) else []) + steps


def validation_steps(save: SaveFrequencies, start: int, end: int, *, validate_first: bool = True) -> list[int]:
    """Steps whose record carries ``validation_results`` (when validation_params names a set)."""
    if not _runs(save, start, end):
        return []
    return ([0] if _initial(save, start, validate_first) else []) + list(_multiples(save.save_valid_freq, start, end))


def filter_steps(
    save: SaveFrequencies, start: int, end: int, *, validate_first: bool = True, restored: bool = False,
) -> list[int]:
    """Steps with a permanent checkpoint (``saved_filters: True`` in ``<collname>.files``).

    Step 0 only on a fresh run with validate_first and save_initial_filters whose weights
    did not come from the database (``restored``, TFUtils' ``load_data``).
    """
    if not _runs(save, start, end):
        return []
    first = [0] if _initial_filters(save, start, validate_first, restored) else []
    return first + list(_multiples(save.save_filters_freq, start, end))


def cache_steps(save: SaveFrequencies, start: int, end: int) -> list[int]:
    """Steps checkpointed into the ``__RECENT`` database (multiples of c that are not multiples of f), in order."""
    if not _runs(save, start, end):
        return []
    f = save.save_filters_freq
    return [s for s in _multiples(save.cache_filters_freq, start, end) if s % f]


def recent_kept(cached: Iterable[int], cache_max_num: int) -> list[int]:
    """What ``__RECENT`` holds after these cache writes (oldest first): the newest ``cache_max_num``."""
    cached = list(cached)
    return cached[-cache_max_num:] if cache_max_num > 0 else []


@attrs.frozen
class PlannedRecord:
    """One record a run writes: its ``step``, the training steps its ``train_results`` list holds, and its flags."""

    step: int
    train_steps: range
    validation: bool
    saved_filters: bool
    cached: bool


def plan(
    save: SaveFrequencies, start: int, end: int, *, validate_first: bool = True, restored: bool = False,
) -> list[PlannedRecord]:
    """Every record of a run from ``start`` to ``end``, in the order TFUtils writes them.

    A record's ``train_results`` holds one entry per step since the previous write point
    (the step-0 record holds none); ``unwritten`` steps after the last record are lost.
    """
    steps = record_steps(save, start, end, validate_first=validate_first)
    valid = set(validation_steps(save, start, end, validate_first=validate_first))
    perm = set(filter_steps(save, start, end, validate_first=validate_first, restored=restored))
    cache = set(cache_steps(save, start, end))
    out, previous = [], start
    for step in steps:
        out.append(PlannedRecord(step=step, train_steps=range(previous + 1, step + 1), validation=step in valid,
                                 saved_filters=step in perm, cached=step in cache))
        previous = step
    return out


@attrs.frozen
class Counts:
    """The §4.4 numbers of one run: records written, permanent checkpoints, cache writes and what ``__RECENT`` keeps."""

    records: int
    saved_filters: int
    validations: int
    cached: int
    recent_kept: int
    unwritten_steps: int


def _lcm(values: Sequence[int]) -> int:
    return math.lcm(*values)


def _count_any(freqs: Sequence[int], start: int, end: int) -> int:
    """#{start < s <= end : some freq divides s}, by inclusion–exclusion over the frequencies' lcms."""
    freqs = sorted(set(freqs))
    total = 0
    for size in range(1, len(freqs) + 1):
        for subset in combinations(freqs, size):
            total += (-1) ** (size + 1) * _count(_lcm(subset), start, end)
    return total


def expected_counts(
    save: SaveFrequencies, start: int, end: int, *, validate_first: bool = True, restored: bool = False,
    recent_before: int = 0,
) -> Counts:
    """The counts of :func:`plan` in O(1) (no enumeration), usable for runs of millions of steps.

    ``recent_before`` is how many checkpoints ``__RECENT`` already holds (from earlier runs of this exp_id).
    """
    if not _runs(save, start, end):
        return Counts(0, 0, 0, 0, min(recent_before, save.cache_max_num), max(0, end - start))
    initial = int(_initial(save, start, validate_first))
    f, c = save.save_filters_freq, save.cache_filters_freq
    cached = _count(c, start, end) - _count(math.lcm(c, f), start, end)
    last_write = max(end // freq * freq for freq in _freqs(save))
    return Counts(
        records=initial + _count_any(_freqs(save), start, end),
        saved_filters=int(_initial_filters(save, start, validate_first, restored)) + _count(f, start, end),
        validations=initial + _count(save.save_valid_freq, start, end),
        cached=cached,
        recent_kept=min(recent_before + cached, save.cache_max_num),
        unwritten_steps=end - max(last_write, start),
    )


def records_per_test_run(num_steps: Sequence[int], save_intermediate_freq: int | None = None) -> int:
    """Records one ``test_from_params`` run writes: ⌈n/k⌉ intermediate ones per target (if k is set) plus the final one."""
    if save_intermediate_freq is None:
        return 1
    return sum(-(-n // save_intermediate_freq) for n in num_steps) + 1
