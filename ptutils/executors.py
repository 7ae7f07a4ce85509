"""Where a tuning session's children run: in this process, in a local process pool, or on Ray.

An executor only runs :func:`ptutils.child.run_child` on a :class:`ChildTask`
somewhere and hands back a ``concurrent.futures.Future`` of its small result.
It decides *where*; the tuning session decides *what* (which child, to which
step, with which hyperparameters), and the database holds every outcome, so
the three give the same population and the same weights.  Choose one by name
with :func:`make_executor` (``{"kind": "pool", "workers": 2}``), which is what a
tuning session stores, so a resumed one runs the same way.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import attrs

from .child import ChildTask, run_child
from .errors import ConfigError, Interrupted
from .gpus import Node, Placement, choose_devices, local_gpus

KINDS = ("inprocess", "pool", "ray")


class Executor:
    """Runs child rounds; ``capacity`` is how many run at once."""

    kind = "executor"
    capacity = 1

    def submit(self, task: ChildTask) -> Future:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The plain dict :func:`make_executor` rebuilds this executor from."""
        return {"kind": self.kind}

    def close(self) -> None:
        """Let go of workers (and of Ray, when this executor started it)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class InProcess(Executor):
    """Each round runs at once in this process, one after the other: the reference result."""

    kind = "inprocess"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def submit(self, task: ChildTask) -> Future:
        future: Future = Future()
        try:
            future.set_result(run_child(attrs.evolve(task, threads=self.threads)))
        except (Exception, Interrupted) as exc:  # a signal paused the child: the tuning decides what follows
            future.set_exception(exc)
        return future

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "threads": self.threads}


class LocalPool(Executor):
    """A pool of spawned worker processes on this machine; only the task (URL, ids, a step) crosses to them.

    ``gpus_per_child`` > 0 hands each round that many of this machine's GPUs
    (``CUDA_VISIBLE_DEVICES``), the freest first (:mod:`ptutils.gpus`); with
    none free enough a round runs on the CPU.
    """

    kind = "pool"

    def __init__(self, workers: int = 2, threads: int = 1, gpus_per_child: int = 0, min_free_mib: int = 0):
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError("executor.workers", f"expected a positive number of worker processes, got {workers!r}")
        self.workers = self.capacity = workers
        self.threads = threads
        self.gpus_per_child = gpus_per_child
        self.min_free_mib = min_free_mib
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_watch_parent, initargs=(os.getpid(),))
        self._slots: list[Placement] = []
        if gpus_per_child:
            gpus = local_gpus()
            node = Node("localhost", tuple(gpus), None)
            for _ in range(workers):
                placement = choose_devices([node], gpus_per_child, self.min_free_mib)
                self._slots.append(placement)
                node = Node("localhost", tuple(g for g in node.gpus if g.index not in placement.devices), None)
        self._next = 0

    def submit(self, task: ChildTask) -> Future:
        env = dict(task.env)
        if self._slots:
            env.update(self._slots[self._next % len(self._slots)].env())
            self._next += 1
        return self._pool.submit(_pool_run_child, attrs.evolve(task, threads=self.threads, env=env))

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "workers": self.workers, "threads": self.threads,
                "gpus_per_child": self.gpus_per_child, "min_free_mib": self.min_free_mib}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    """Ray tasks (``ptutils[ray]``): Ray places each round by its ``num_cpus``/``num_gpus``; Ray sets the devices.

    Connects to ``address`` (``"auto"``, ``"ray://host:10001"``) or starts a local
    Ray with ``num_cpus`` unless one is already running in this process.  The
    workers get this process's ``sys.path`` (so the config's import paths
    resolve there as here).
    """

    kind = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_child: float = 1,
                 gpus_per_child: float = 0, threads: int = 1, max_retries: int = 0):
        try:
            import ray
        except ImportError:
            raise ConfigError("executor.kind", "'ray' needs Ray: pip install 'ptutils[ray]'") from None
        self._ray = ray
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_child = cpus_per_child
        self.gpus_per_child = gpus_per_child
        self.threads = threads
        self._started = False
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=False)  # each task carries this process's sys.path (submit)
            self._started = True
        resources = ray.cluster_resources()
        self.capacity = max(1, int(resources.get("CPU", 1) // max(cpus_per_child, 1e-9)))
        self._remote = ray.remote(num_cpus=cpus_per_child, num_gpus=gpus_per_child, max_retries=max_retries)(
            _ray_run_child
        )

    def submit(self, task: ChildTask) -> Future:
        ref = self._remote.options(runtime_env={"env_vars": {"PYTHONPATH": _python_path()}}).remote(
            attrs.evolve(task, threads=self.threads)
        )
        return ref.future()

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "address": self.address, "num_cpus": self.num_cpus,
                "cpus_per_child": self.cpus_per_child, "gpus_per_child": self.gpus_per_child, "threads": self.threads}

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


WATCH_S = 1.0
"""How often a pool worker checks that its parent is alive."""
_busy = threading.Event()
"""Set in a pool worker while it runs a round."""
_parent_pid: int | None = None


def _watch_parent(parent_pid: int) -> None:
    """A pool worker's initializer: once the parent is gone (killed), exit after the round in hand, if any.

    Without it the workers of a killed parent would wait for work forever.
    """

    global _parent_pid
    _parent_pid = parent_pid

    def watch() -> None:
        while True:
            time.sleep(WATCH_S)
            if os.getppid() != parent_pid and not _busy.is_set():
                os._exit(0)

    threading.Thread(target=watch, name="ptutils-watch-parent", daemon=True).start()


def _pool_run_child(task: ChildTask) -> dict[str, Any]:
    _busy.set()
    try:
        return run_child(task)
    finally:
        _busy.clear()
        if _parent_pid is not None and os.getppid() != _parent_pid:
            os._exit(0)  # the parent is gone: nobody reads this result, and the next queued task is stale


def _ray_run_child(task: ChildTask) -> dict[str, Any]:
    return run_child(task)


def _python_path() -> str:
    return os.pathsep.join(p or os.getcwd() for p in sys.path)


def make_executor(settings: str | Mapping[str, Any] | Executor | None) -> Executor:
    """An executor from its name or settings (``"pool"``, ``{"kind": "ray", "address": "auto"}``)."""
    if isinstance(settings, Executor):
        return settings
    if settings is None:
        settings = {"kind": "inprocess"}
    if isinstance(settings, str):
        settings = {"kind": settings}
    options = dict(settings)
    kind = options.pop("kind", "inprocess")
    classes = {"inprocess": InProcess, "pool": LocalPool, "ray": RayExecutor}
    if kind not in classes:
        raise ConfigError("executor.kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    try:
        return classes[kind](**options)
    except TypeError as exc:
        raise ConfigError("executor", f"{kind}: {exc}") from None
