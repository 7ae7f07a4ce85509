"""Worker functions for the storage tests' child processes, and a hostile pickle payload.

The workers live here, not in a test module, so that child processes (started by
:func:`ptutils.testing.processes.process_context`) import only ptutils and this file.
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any

import numpy as np

from ptutils import open_db
from ptutils.database import backend_for
from ptutils.errors import StorageError


def mixed_writer_worker(url: str, collection: str, worker: int, rounds: int, barrier: Any) -> None:
    """Save own docs, replace one shared doc (with a blob) and $push to a shared list."""
    with open_db(url, collection=collection) as db:
        barrier.wait(timeout=120)
        for k in range(rounds):
            db.save({"_id": f"w{worker}-{k}", "worker": worker, "k": k})
            db.save({"_id": "shared", "worker": worker, "k": k, "weights": np.full(20_000, worker * 1000 + k, np.int64)})
            db.update("log", {"$push": {"events": [worker, k]}}, upsert=True)


def rewrite_forever_worker(url: str, collection: str, started: Any) -> None:
    """Replace one document with a large body in a loop until killed."""
    with open_db(url, collection=collection) as db:
        k = 0
        while True:
            db.save({"_id": "victim", "k": k, "payload": "x" * 2_000_000, "arr": np.full(50_000, k)})
            db.put_blob(bytes([k % 256]) * 1_000_000, "ckpt")
            k += 1
            if k == 3:
                started.set()


def limited_write_worker(url: str, collection: str, results: Any) -> None:
    """Replace a document while the OS refuses files over 64 KiB (RLIMIT_FSIZE -> EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    with open_db(url, collection=collection) as db:
        for attempt in (
            lambda: db.save({"_id": "doc", "text": "new" * 100_000}),
            lambda: db.put_blob(b"n" * 200_000, "blob"),
        ):
            try:
                attempt()
                results.put(("ok", ""))
            except StorageError as exc:
                results.put((type(exc).__name__, str(exc)))


def unprivileged_write_worker(url: str, collection: str, results: Any) -> None:
    """Try to write to a database the process may not write to (as nobody when run as root)."""
    backend_for(url)  # imported while the checkout can still be read: nobody may not enter it
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    with open_db(url, collection=collection) as db:
        for attempt in (
            lambda: db.save({"_id": "doc", "v": 2}),
            lambda: db.put_blob(b"data", "blob"),
        ):
            try:
                attempt()
                results.put(("ok", ""))
            except StorageError as exc:
                results.put((type(exc).__name__, str(exc)))


class Detonator:
    """Unpickling this creates ``path``: what an attacker's payload would do."""

    def __init__(self, path: Any):
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))
