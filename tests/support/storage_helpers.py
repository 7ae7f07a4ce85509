"""Helpers for the storage tests: exact (type-aware) equality and worker processes.

Worker functions live here, not in a test module, so that child processes
import only ptutils and this file.  :func:`process_context` gives a
``forkserver`` context that preloads this module once: every child still starts
from a fresh interpreter (nothing inherited from the pytest process, unlike
``fork``), but torch is imported once instead of once per child, which matters
on small CI machines.
"""

from __future__ import annotations

import datetime as dt
import math
import multiprocessing
import os
import resource
import signal
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ptutils import open_db
from ptutils.errors import StorageError


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values (bitwise comparison works for every dtype)."""
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def numpy_bytes(value: np.ndarray | np.generic) -> bytes:
    """The bytes that carry a numpy value (x87 long doubles have padding bytes that do not)."""
    arr = np.asarray(value)
    if arr.dtype.type in (np.longdouble, np.clongdouble):
        return repr([str(v) for v in arr.reshape(-1)]).encode() + arr.dtype.str.encode()
    return arr.tobytes()


def assert_identical(expected: Any, actual: Any, path: str = "doc") -> None:
    """Assert ``actual`` has exactly ``expected``'s types, dtypes, shapes and (bitwise) values.

    Mapping key order is not compared: JSON stores may reorder keys.
    """
    assert type(actual) is type(expected), f"{path}: type {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.device.type == "cpu", f"{path}: restored on {actual.device}"
        assert actual.requires_grad == expected.requires_grad, f"{path}: requires_grad differs"
        assert tensor_bytes(actual) == tensor_bytes(expected), f"{path}: values differ"
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert actual.dtype.str == expected.dtype.str, f"{path}: dtype {actual.dtype.str} != {expected.dtype.str}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert numpy_bytes(actual) == numpy_bytes(expected), f"{path}: values {actual!r} != {expected!r}"
    elif isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{path}: {actual!r} is not nan"
        else:
            assert actual == expected and math.copysign(1, actual) == math.copysign(1, expected), (
                f"{path}: {actual!r} != {expected!r}"
            )
    elif isinstance(expected, Mapping):
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_identical(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_identical(e, a, f"{path}[{i}]")
    elif isinstance(expected, dt.datetime):
        assert actual == expected and actual.utcoffset() == expected.utcoffset(), f"{path}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def stored_body(doc: Mapping[str, Any]) -> dict:
    """A loaded document without the store's ``_id`` and ``_version``."""
    return {k: v for k, v in doc.items() if k not in ("_id", "_version")}


def process_context() -> multiprocessing.context.BaseContext:
    """A multiprocessing context whose children start clean but with ptutils preloaded."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def run_processes(ctx: multiprocessing.context.BaseContext, target: Any, args_list: list[tuple], timeout: float = 120) -> None:
    """Run ``target(*args)`` for each args in a child process; fail if any child fails."""
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * len(procs), f"worker exit codes {codes} (see captured stderr)"


# --------------------------------------------------------------------- workers
def increment_worker(url: str, collection: str, doc_id: str, times: int, barrier: Any) -> None:
    """$inc a counter ``times`` times, starting together with the other workers."""
    with open_db(url, collection=collection) as db:
        barrier.wait(timeout=120)
        for _ in range(times):
            db.update(doc_id, {"$inc": {"counter": 1}})


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
