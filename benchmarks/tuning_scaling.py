"""How well do a tuning session's executors use 2 cores, and what does an exploit cost against a checkpoint?

Eight children (``tuning_children.py``: an MLP with two hidden layers of
``--width`` on synthetic data, SGD, ``--steps`` steps, one torch thread each,
checkpointed at the end) are tuned by a random search over the learning rate
that decides nothing, so every variant runs exactly the same children:

* ``inprocess``: one after the other in this process (the baseline, ``T_seq``);
* ``pool``:      a local pool of ``--workers`` spawned processes;
* ``ray``:       Ray tasks on a local Ray started by the executor with
                 ``num_cpus=--workers``.

Each parallel variant runs twice a round:

* ``cold``: a fresh executor made by the tuning itself, timed from the
  ``Tuning`` to ``run()`` returning, so it holds the start-up (Ray's init,
  spawning the pool, ``import torch`` and ptutils in every worker) and the
  close (``ray.shutdown``, joining the pool): what a user waits for.
* ``warm``: the executor is made first and one trivial round (a tuning of one
  tiny child, one epoch, per worker) is run on it; that is the ``start-up``
  column (executor creation + that round).  Then the 8-child tuning runs on
  the *same* executor (its workers already started and imported): ``steady s``
  is that run's wall time.  The executor is closed afterwards (``close s``).

``eff`` is the parallel efficiency ``T_seq / (workers x T_par)`` with ``T_par``
the cold run's time (``eff w/ start``) or the warm one's (``eff steady``), each
against the in-process run of the same round (the machine is shared: its speed
drifts), the median over ``--rounds`` interleaved rounds (the order of the
variants turns each round).  The in-process baseline runs once a round, after
its own trivial round (this process already imported torch: it has no start-up
to speak of).  ``workers`` is how many processes ran the 8 children (from the
children's claim logs) and ``reused`` whether the steady run's were all started
by the warm-up round.  ``same result`` compares every decision row (times
left out) and every child's final weights with the first in-process run's.

What is left of ``T_par`` beyond ``T_seq / workers`` in the steady state is the
parent's per-round work (its records, polling its futures every 0.2 s), each
round's rebuild of the child in the worker from its stored config, the
filesystem database shared by the processes, and the two cores not being
idle otherwise (the parent, and on Ray its raylet/GCS, share them).

Then, for one child of the last in-process run, what an exploit adds to it
against one of its checkpoints:

* ``serialize``: :func:`ptutils.checkpoint.serialize_parts` of its newest state;
* ``write``:     ``CheckpointStore.write`` of those bytes (blob, fsync'd by the
                 filesystem backend, then its record; pruning the one before);
* ``clone``:     ``CheckpointStore.clone`` of a donor's checkpoint (a hold and
                 a record pointing to the donor's blob: no bytes copied);
* ``exploit``:   ``Tuning._exploit`` on a decision row (the clone plus the
                 recipient's config update and its config-change log entry).

The recipient's next round loads the donor's blob instead of its own, which
costs what the load of its own would have (every round starts with one), so
the exploit adds the ``exploit`` time and nothing else.

    python benchmarks/tuning_scaling.py                  # 8 x 500 steps of width 1024, 3 rounds
    python benchmarks/tuning_scaling.py --steps 2000 --rounds 1
    python benchmarks/tuning_scaling.py --variants inprocess pool --quick
    python benchmarks/tuning_scaling.py --pbt            # also a PBT run (exploits) on every executor

``--pbt`` adds ``pbt-*`` rows: PBT (population ``--children``, perturbation
every quarter of the steps, synchronous) run cold on each executor, its rows
and weights compared with its in-process run.  Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the children's module, for this process and (inherited) for every worker
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import tuning_children  # noqa: E402
from ptutils import load_weights, open_db  # noqa: E402
from ptutils.checkpoint import CheckpointStore, serialize_parts  # noqa: E402
from ptutils.child import ChildTask  # noqa: E402
from ptutils.executors import Executor, make_executor  # noqa: E402
from ptutils.nest import Tuning  # noqa: E402
from ptutils.searchers import PBT, RandomSearch  # noqa: E402
from ptutils.spaces import LogUniform  # noqa: E402
from ptutils.status import SESSIONS  # noqa: E402

SPACE = {"model.optimizer.lr": LogUniform(1e-3, 1e-1)}
SESSION_ID = "scaling"


class Kept(Executor):
    """An executor that a tuning's ``run()`` does not close (``run()`` closes the executor it was given)."""

    def __init__(self, inner: Executor):
        self.inner = inner
        self.kind = inner.kind
        self.capacity = inner.capacity

    def submit(self, task: ChildTask) -> Future:
        return self.inner.submit(task)

    def settings(self) -> dict[str, Any]:
        return self.inner.settings()

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        self.inner.close()


def settings_of(variant: str, workers: int) -> dict[str, Any]:
    return {"inprocess": {"kind": "inprocess"}, "pool": {"kind": "pool", "workers": workers},
            "ray": {"kind": "ray", "num_cpus": workers}}[variant]


def run_tuning(url: str, config: Mapping[str, Any], searcher: Any, executor: Any) -> float:
    t0 = time.perf_counter()
    with Tuning(config, searcher, space=SPACE, executor=executor, db=url, session_id=SESSION_ID,
                metric="val_loss", mode="min") as t:
        t.run()
        assert t.session.state == "complete", t.session.state
    return time.perf_counter() - t0


def result(url: str) -> tuple[list[tuple], dict[str, dict[str, torch.Tensor]]]:
    """Every decision row (times left out) and every child's final weights (as ``tests/support/tuningkit``)."""
    with Tuning.resume(url, SESSION_ID) as t:
        rows = [(r["round"], r["child"], r["t"], r["score"], r["rank"], r["quantile"], r["action"], r["donor"],
                 repr(r["old_values"]), repr(r["new_values"]), repr(r["ops"]), r["applied"]) for r in t.rows()]
        weights = {c: load_weights(url, c) for c in t.children}
    return rows, weights


def same(a: tuple[list, dict], b: tuple[list, dict]) -> bool:
    (rows_a, wa), (rows_b, wb) = a, b
    return rows_a == rows_b and wa.keys() == wb.keys() and all(
        wa[c].keys() == wb[c].keys() and all(torch.equal(wa[c][k], wb[c][k]) for k in wa[c]) for c in wa)


def claim_pids(url: str) -> set[int]:
    """The processes that ran the tuning's children (from their records' claim logs)."""
    sessions = open_db(url).collection(SESSIONS)
    return {e["pid"] for r in sessions.load({"parent_id": SESSION_ID}) for e in r.get("claims") or []
            if e.get("event") == "claim"}


def descendants(pid: int) -> list[tuple[int, str]]:
    """This process's live descendants (pid, command), from /proc."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                names[int(entry)] = fh.read().replace(b"\0", b" ").decode(errors="replace")[:80]
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p:
                found.append((child, names.get(child, "?")))
                frontier.append(child)
    return found


class Others:
    """How many cores processes outside this one's tree used meanwhile (the machine is shared).

    A thread samples ``/proc/stat`` (every process's CPU) and this process's
    tree (itself and its live descendants: pool workers, Ray's raylet and its
    workers) every 0.5 s; a process's last sample counts once it has exited.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    def _ours(self) -> None:
        for pid in [os.getpid()] + [p for p, _ in descendants(os.getpid())]:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                self._seen[pid] = max(self._seen.get(pid, 0), int(fields[11]) + int(fields[12]))
            except (OSError, IndexError, ValueError):
                continue

    def __enter__(self) -> Others:
        self._seen: dict[int, int] = {}
        self._ours()
        self._base = dict(self._seen)
        self._busy0, self._t0 = self._busy(), time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._ours()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._ours()
        ours = sum(v - self._base.get(p, 0) for p, v in self._seen.items())
        wall = time.perf_counter() - self._t0
        self.cores = max(0.0, (self._busy() - self._busy0 - ours) / self.tick / wall)


def pids_alive(pids: set[int]) -> list[int]:
    alive = []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
        except PermissionError:
            alive.append(pid)
    return alive


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: str):
        self.args = args
        self.tmp = tmp
        self.config = tuning_children.config(args.steps, args.width)
        self.warm_config = tuning_children.config(tuning_children.STEPS_PER_EPOCH, args.width)
        self.count = 0
        self.reference: dict[str, tuple] = {}
        self.worker_pids: set[int] = set()
        self.last_inprocess: str | None = None

    def url(self) -> str:
        self.count += 1
        path = Path(self.tmp) / f"db{self.count:03d}"
        return path.as_uri()

    def check(self, key: str, url: str) -> bool:
        got = result(url)
        if key not in self.reference:
            self.reference[key] = got
            return True
        return same(self.reference[key], got)

    def discard(self, url: str) -> None:
        if url != self.last_inprocess:
            shutil.rmtree(url.removeprefix("file://"), ignore_errors=True)

    def searcher(self) -> RandomSearch:
        return RandomSearch(self.args.children, seed=self.args.seed)

    def warm(self, variant: str) -> dict[str, Any]:
        """Start-up (executor + one trivial round), then the tuning on the started executor, then the close."""
        t0 = time.perf_counter()
        executor = Kept(make_executor(settings_of(variant, self.args.workers)))
        created = time.perf_counter()
        try:
            warm_url = self.url()
            run_tuning(warm_url, self.warm_config, RandomSearch(executor.capacity, seed=99), executor)
            started = time.perf_counter()
            url = self.url()
            with Others() as others:
                steady = run_tuning(url, self.config, self.searcher(), executor)
        finally:
            t1 = time.perf_counter()
            executor.shutdown()
            closed = time.perf_counter() - t1
        warm_pids, pids = claim_pids(warm_url), claim_pids(url)
        self.worker_pids |= warm_pids | pids
        out = {"create": created - t0, "startup": started - t0, "steady": steady, "close": closed,
               "others": others.cores, "workers": len(pids), "reused": pids <= warm_pids, "same": self.check("search", url)}
        if variant == "inprocess":
            self.discard(self.last_inprocess or "")
            self.last_inprocess = url
        self.discard(url)
        self.discard(warm_url)
        return out

    def cold(self, variant: str, pbt: bool = False) -> dict[str, Any]:
        """The tuning with an executor of its own: start-up, the run and the close, as a user waits for them."""
        url = self.url()
        if pbt:
            interval = max(1, self.args.steps // 4)
            config = tuning_children.config(self.args.steps, self.args.width, checkpoint_every=interval)
            searcher = PBT(metric="val_loss", mode="min", perturbation_interval=interval, hyperparam_mutations=SPACE,
                           population_size=self.args.children, seed=self.args.seed)
        else:
            config, searcher = self.config, self.searcher()
        with Others() as others:
            wall = run_tuning(url, config, searcher, settings_of(variant, self.args.workers))
        pids = claim_pids(url)
        self.worker_pids |= pids
        out = {"cold": wall, "cold_others": others.cores, "workers": len(pids), "same": self.check("pbt" if pbt else "search", url)}
        if pbt:
            rows = result(url)[0]
            out["exploits"] = sum(1 for r in rows if r[6] == "exploit")
        self.discard(url)
        return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float, spec: str = ".2f") -> str:
    return "-" if value != value else format(value, spec)


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def exploit_cost(url: str, repeats: int) -> dict[str, float]:
    """One child's checkpoint (serialise + write) against one exploit of it (clone + the record update)."""
    db = open_db(url)
    with Tuning.resume(url, SESSION_ID) as t:
        children = t.children
        records = t._records()
        donor, recipient = children[0], children[1]
        state, donor_ckpt = CheckpointStore(db, donor).load_latest()
        parts = serialize_parts(state)
        nbytes = sum(p.nbytes for p in parts)
        serialize = timed(lambda: serialize_parts(state), repeats)
        scratch = CheckpointStore(db, f"{donor}-bench", keep=1)  # the same bytes, without pruning the child's own
        write = timed(lambda: scratch.write(serialize_parts(state)), repeats)
        seen = {"n": 0}
        checkpoints = db.collection("checkpoints")

        def clone() -> None:
            seen["n"] += 1
            CheckpointStore(db, f"{recipient}-clones").clone(
                checkpoints.load_from_id(donor_ckpt["_id"]), decision=f"bench-clone-{seen['n']}", attempt=1,
                apply={"model.optimizer.lr": 0.01})

        def exploit() -> None:
            seen["n"] += 1
            t._exploit({"_id": f"bench-exploit-{seen['n']}", "child": recipient, "donor": donor,
                        "donor_checkpoint": donor_ckpt["_id"], "t": int(records[donor].get("step") or 0),
                        "old_values": dict(records[recipient]["tuning"]["values"]),
                        "new_values": {"model.optimizer.lr": 0.01}})

        clone_times = timed(clone, repeats)
        exploit_times = timed(exploit, repeats)
    db.close()
    return {"nbytes": nbytes, "serialize": median(serialize), "write": median(write), "clone": median(clone_times),
            "exploit": median(exploit_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Tuning executors: parallel efficiency on 2 cores, exploit cost")
    parser.add_argument("--children", type=int, default=8)
    parser.add_argument("--steps", type=int, default=500, help="steps of each child")
    parser.add_argument("--width", type=int, default=1024, help="the MLP's hidden width (cost ~ width**2)")
    parser.add_argument("--workers", type=int, default=2, help="pool workers / Ray CPUs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["inprocess", "pool", "ray"],
                        choices=["inprocess", "pool", "ray"])
    parser.add_argument("--no-cold", action="store_true", help="skip the cold runs (start-up included)")
    parser.add_argument("--pbt", action="store_true", help="also run PBT (cold) on every executor, once a round")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of each exploit/checkpoint timing")
    parser.add_argument("--quick", action="store_true", help="150 steps, width 512, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.width, args.rounds = 150, 512, 1
    if "inprocess" not in args.variants:
        args.variants.insert(0, "inprocess")  # the baseline
    logging.getLogger("ptutils").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    print(f"{args.children} children x {args.steps} steps, MLP width {args.width}, {args.workers} workers, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}, {os.cpu_count()} cpus, 1 thread a child")
    tmp = tempfile.mkdtemp(prefix="ptutils-tuning-scaling-")
    bench = Bench(args, tmp)
    warm: dict[str, list[dict]] = {v: [] for v in args.variants}
    cold: dict[str, list[dict]] = {v: [] for v in args.variants}
    pbt: dict[str, list[dict]] = {v: [] for v in args.variants}
    seq: list[float] = []
    seq_pbt: list[float] = []
    try:
        for rnd in range(args.rounds):
            order = args.variants[rnd % len(args.variants):] + args.variants[:rnd % len(args.variants)]
            for variant in order:
                w = bench.warm(variant)
                warm[variant].append(w)
                if variant == "inprocess":
                    seq.append(w["steady"])
                elif not args.no_cold:
                    cold[variant].append(bench.cold(variant))
                if args.pbt:
                    p = bench.cold(variant, pbt=True)
                    pbt[variant].append(p)
                    if variant == "inprocess":
                        seq_pbt.append(p["cold"])
                print(f"  round {rnd + 1} {variant}: " + ", ".join(
                    f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in {**w, **(cold[variant][-1] if cold[variant] and variant != 'inprocess' else {})}.items()),
                    flush=True)
        costs = exploit_cost(bench.last_inprocess, args.repeats) if bench.last_inprocess else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"{'variant':<10} {'start-up s':>10} {'steady s':>9} {'cold s':>7} {'close s':>8} {'eff steady':>11} "
          f"{'eff w/ start':>13} {'others':>7} {'workers':>8} {'reused':>7} {'same result':>12}")
    for variant in args.variants:
        ws, cs = warm[variant], cold[variant]
        n = 1 if variant == "inprocess" else args.workers
        steady_eff = [s / (n * w["steady"]) for s, w in zip(seq, ws)]
        if variant == "inprocess":
            cold_times, cold_eff = [w["steady"] for w in ws], [1.0] * len(ws)
        else:
            cold_times = [c["cold"] for c in cs]
            cold_eff = [s / (n * c["cold"]) for s, c in zip(seq, cs)]
        same_all = all(r["same"] for r in ws + cs)
        print(f"{variant:<10} {fmt(median([w['startup'] for w in ws])):>10} {fmt(median([w['steady'] for w in ws])):>9} "
              f"{fmt(median(cold_times)):>7} {fmt(median([w['close'] for w in ws])):>8} {fmt(median(steady_eff), '.3f'):>11} "
              f"{fmt(median(cold_eff), '.3f'):>13} {fmt(median([w['others'] for w in ws])):>7} {max([w['workers'] for w in ws] + [c['workers'] for c in cs]):>8} "
              f"{'yes' if all(w['reused'] for w in ws) else 'no':>7} {('baseline' if variant == 'inprocess' else 'yes' if same_all else 'NO'):>12}")
    if args.pbt:
        print()
        print(f"{'variant':<14} {'cold s':>7} {'eff w/ start':>13} {'exploits':>9} {'same result':>12}")
        for variant in args.variants:
            ps = pbt[variant]
            n = 1 if variant == "inprocess" else args.workers
            eff = [s / (n * p["cold"]) for s, p in zip(seq_pbt, ps)]
            print(f"{'pbt-' + variant:<14} {fmt(median([p['cold'] for p in ps])):>7} {fmt(median(eff), '.3f'):>13} "
                  f"{ps[-1]['exploits']:>9} {('baseline' if variant == 'inprocess' else 'yes' if all(p['same'] for p in ps) else 'NO'):>12}")
    if costs is not None:
        print()
        print(f"one child's checkpoint: {costs['nbytes'] / 2**20:.2f} MiB; medians of {args.repeats}")
        print(f"{'serialize ms':>13} {'write ms':>9} {'clone ms':>9} {'exploit ms':>11} {'exploit / write':>16} "
              f"{'exploit / (serialize+write)':>28}")
        print(f"{costs['serialize'] * 1e3:>13.2f} {costs['write'] * 1e3:>9.2f} {costs['clone'] * 1e3:>9.2f} "
              f"{costs['exploit'] * 1e3:>11.2f} {costs['exploit'] / costs['write']:>16.3f} "
              f"{costs['exploit'] / (costs['serialize'] + costs['write']):>28.3f}")
    time.sleep(2.0)
    alive = pids_alive(bench.worker_pids)
    left = descendants(os.getpid())
    print()
    print(f"worker processes seen: {len(bench.worker_pids - {os.getpid()})}, still alive 2 s after the end: "
          f"{len(alive)}{' ' + str(sorted(alive)) if alive else ''}; live descendants of this process: {len(left)}")
    for pid, cmd in left:
        print(f"  {pid} {cmd}")


if __name__ == "__main__":
    main()
