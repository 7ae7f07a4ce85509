"""Checkpoint save+load throughput through a DBInterface vs raw torch.save/torch.load.

A ~100 MB state dict (a model's and an Adam optimizer's tensors) is saved and
loaded through :class:`ptutils.checkpoint.CheckpointStore` on the filesystem
backend and, in the same run and on the same disk, with raw
``torch.save``/``torch.load(weights_only=True)``.

A ptutils save is durable and verified: the blob goes to a temporary file that
is fsync'd and renamed (and its directory fsync'd), then its record is written
the same way, the previous checkpoint is pruned, and the bytes are SHA-256
hashed.  So the fair reference is ``raw save+fsync`` (``torch.save`` then
``fsync``, no rename); ``raw save`` (page cache only) is shown as well.  Two
ptutils saves are timed: ``CheckpointStore.save`` (writes the tensors' memory
as it is) and ``snapshot save`` (``serialize`` then ``write``: one copy first,
what ``Session.save_checkpoint`` does so that training may go on while a
background thread writes).  ``ptutils load`` finds the newest record, reads the
blob, verifies its SHA-256 and builds the tensors; ``raw load`` is
``torch.load`` of the raw file.  Rounds are interleaved; the table shows median
seconds, MB/s and ratios (above 1: faster than the reference).  Hashing runs on
a helper thread, so a busy machine (see the load average printed) narrows the
gap less than an idle one.

    python benchmarks/checkpoint_io.py [--mb 100] [--rounds 5] [--dir /tmp] [--db URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from ptutils import open_db
from ptutils.checkpoint import CheckpointStore, serialize


def make_state(megabytes: int) -> dict:
    """Model weights + Adam moments (3 copies), ~``megabytes`` in total."""
    per_tensor = 1 << 18  # 1 MiB of float32
    count = max(1, megabytes // 3)
    weights = {f"layer{i}.weight": torch.randn(per_tensor) for i in range(count)}
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(per_tensor), "exp_avg_sq": torch.rand(per_tensor)}
             for i in range(count)}
    return {"model": weights, "optimizer": {"state": state, "param_groups": [{"lr": 1e-3, "params": list(range(count))}]}}


def nbytes(state: dict) -> int:
    """Bytes of tensor data in ``state``."""
    total = 0
    stack = [state]
    while stack:
        cur = stack.pop()
        if isinstance(cur, torch.Tensor):
            total += cur.numel() * cur.element_size()
        elif isinstance(cur, dict):
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return total


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_save(path: str, state: dict, fsync: bool) -> None:
    """``torch.save`` to ``path``, optionally followed by ``fsync``."""
    with open(path, "wb") as fh:
        torch.save(state, fh)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def main() -> None:
    """Run the interleaved rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="directory on the disk to test (default: a temp dir)")
    parser.add_argument("--db", default=None, help="a database URL to test instead of file://DIR/db")
    parser.add_argument("--quick", action="store_true", help="20 MB, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.mb, args.rounds = 20, 2
    state = make_state(args.mb)
    size_mb = nbytes(state) / 1e6
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        db = open_db(args.db or f"file://{tmp}/db")
        store = CheckpointStore(db, "bench", keep=1)
        path = os.path.join(tmp, "raw.pt")
        saves = ("raw save", "raw save+fsync", "ptutils save", "snapshot save")
        results: dict[str, list[float]] = {k: [] for k in (*saves, "raw load", "ptutils load")}
        load_before = os.getloadavg()[0]
        for _ in range(args.rounds):
            results["raw save"].append(timed(lambda: raw_save(path, state, fsync=False)))
            results["raw load"].append(timed(lambda: torch.load(path, weights_only=True)))
            results["raw save+fsync"].append(timed(lambda: raw_save(path, state, fsync=True)))
            results["ptutils save"].append(timed(lambda: store.save(state, step=0)))
            results["ptutils load"].append(timed(lambda: store.load_latest()))
            results["snapshot save"].append(timed(lambda: store.write(serialize(state), step=0)))
        load_after = os.getloadavg()[0]
        loaded, _ = store.load_latest()
        assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
        db.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"state dict: {size_mb:.0f} MB, {args.rounds} interleaved rounds, backend {args.db or 'file://'}, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} -> {load_after:.1f}")
    print("ptutils save = temp file + fsync + rename + dir fsync + SHA-256 + record: compare with raw save+fsync")
    print(f"{'operation':<16} {'median s':>9} {'MB/s':>8} {'x raw+fsync':>12} {'x raw (no fsync)':>17}")
    for name in saves:
        ratio = med["raw save"] / med[name]
        ratio_fsync = med["raw save+fsync"] / med[name]
        print(f"{name:<16} {med[name]:>9.3f} {size_mb / med[name]:>8.0f} {ratio_fsync:>12.2f} {ratio:>17.2f}")
    print(f"{'operation':<16} {'median s':>9} {'MB/s':>8} {'x raw load':>12}")
    for name in ("raw load", "ptutils load"):
        print(f"{name:<16} {med[name]:>9.3f} {size_mb / med[name]:>8.0f} {med['raw load'] / med[name]:>12.2f}")


if __name__ == "__main__":
    main()
