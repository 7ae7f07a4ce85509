"""EpochMeans: the training loss and metrics of each step, averaged over the epoch without a per-step sync.

The loop only appends each step's detached 0-d tensors to a list (tens of
nanoseconds; an in-place add into a device tensor costs a torch op, about 2 µs on
the CPU and a kernel launch on CUDA).  Every :data:`FOLD` values are stacked and
summed in float64 on their device, so memory stays bounded however long an epoch
is, and :meth:`EpochMeans.take` reads the means once, at the epoch's end.

Where the folds happen depends only on how many values an epoch has seen, and a
checkpoint (:meth:`EpochMeans.state_dict`) holds the folded sums and the values
not folded yet; so an epoch paused half-way and resumed in another process sums
the very same tensors in the same order, and its means are bitwise those of an
uninterrupted run.

This module stands on torch alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["FOLD", "EpochMeans"]

FOLD = 1024
"""Values kept per name before they are summed into the running float64 sum."""


class EpochMeans:
    """Per-name sums of per-step values over the current epoch; ``values["loss"]`` is appended to by the loop."""

    __slots__ = ("counts", "sums", "values")

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {"loss": []}
        """The steps' values not folded yet (the loop holds ``values["loss"]``: it is cleared, never replaced)."""
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        """Append one step's values (metrics; the loop appends the loss itself)."""
        for name, value in values.items():
            found = self.values.get(name)
            if found is None:
                self.values[name] = [value]
            else:
                found.append(value)

    def fold(self) -> None:
        """Sum the pending values into the float64 sums (on their device, no sync)."""
        for name, pending in self.values.items():
            if pending:
                total = torch.stack(pending).double().sum()
                prev = self.sums.get(name)
                self.sums[name] = total if prev is None else prev + total
                self.counts[name] = self.counts.get(name, 0) + len(pending)
                pending.clear()

    def take(self, prefix: str) -> dict[str, float]:
        """The epoch's means as ``{prefix}_{name}`` floats (one sync each), and start the next epoch."""
        self.fold()
        means = {f"{prefix}_{name}": float(total) / self.counts[name] for name, total in self.sums.items()}
        self.reset()
        return means

    def reset(self) -> None:
        """Forget the epoch in progress."""
        for pending in self.values.values():
            pending.clear()
        self.sums.clear()
        self.counts.clear()

    def state_dict(self) -> dict[str, Any]:
        """The epoch so far, for a checkpoint: folded sums and counts, and the pending values stacked."""
        return {
            "sums": dict(self.sums),
            "counts": dict(self.counts),
            "pending": {name: torch.stack(pending) for name, pending in self.values.items() if pending},
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        """Continue the epoch :meth:`state_dict` saved, its tensors moved to ``device`` (the model's)."""
        self.reset()
        self.sums.update({name: t.to(device) for name, t in (state.get("sums") or {}).items()})
        self.counts.update({name: int(n) for name, n in (state.get("counts") or {}).items()})
        for name, stacked in (state.get("pending") or {}).items():
            self.values.setdefault(name, []).extend(stacked.to(device).unbind())
