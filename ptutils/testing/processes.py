"""Worker functions run in child processes, for tests that need more than one process.

:func:`process_context` gives a ``forkserver`` context that preloads this
module once: every child still starts from a fresh interpreter (nothing
inherited from the pytest process, unlike ``fork``), but torch is imported once
instead of once per child, which matters on small CI machines.  A worker is a
module-level function (children import it by name), so tests keep theirs in a
module of their own, not in a test file.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from ptutils import open_db


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


def increment_worker(url: str, collection: str, doc_id: str, times: int, barrier: Any) -> None:
    """$inc a counter ``times`` times, starting together with the other workers."""
    with open_db(url, collection=collection) as db:
        barrier.wait(timeout=120)
        for _ in range(times):
            db.update(doc_id, {"$inc": {"counter": 1}})
