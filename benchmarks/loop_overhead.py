"""What does the Session cost per step, against a hand-written PyTorch loop?

The same tiny MLP (784 -> 256 -> 10, SGD, fixed seed, in-memory synthetic
tensors, one thread) trains for the same steps as:

* ``raw``:       a hand-written loop (the baseline);
* ``raw+ckpt``:  the same loop saving model and optimizer with ``torch.save`` and
                 fsync every 500 steps (what the Session's checkpoints cost bare);
* ``session``:   a ptutils Session with status persisted to the filesystem
                 backend and a checkpoint every 500 steps;
* ``ignite`` / ``lightning`` when installed (``pip install ptutils[bench]``):
  Ignite's ``create_supervised_trainer``, Lightning's ``Trainer`` with logger,
  checkpointing and progress bar off.

All read the same precomputed batches through the same DataLoader.  Variants
are interleaved over several rounds, and the raw loop runs before every other
variant and once more at the end of a round, so each variant's ratio in a
round is to the mean of the raw runs just before and just after it (the
machine is shared: its speed drifts within a round).  The table shows the
median time, the median of those ratios, the ratio of the best (fastest) runs,
the median ratio of process CPU time (every thread's, the Session's writer
thread included: the work a variant costs even where a second core hides it
from the wall time; on this VM it moves with the wall time, as stolen cycles
count as CPU time), the added microseconds per step over the whole run, and
whether the final weights are bitwise identical to the raw loop's.

The raw loops and the Session note when each step ends, which splits what a
variant adds to the raw loop of the same round into:

* ``step us``:  the median step's duration, minus the raw loop's (the per-step
                cost of the loop, robust to the machine's hiccups);
* ``start ms``: ``run()`` to the end of step 1 (the durable start: record and
                initial checkpoint, written by the Session's writer thread);
* ``ckpt ms``:  what each periodic checkpoint before the last adds to the 40
                steps from its step on, over their median (the snapshot, and the
                writer thread's fsync'd writes competing with training);
* ``end ms``:   the end of the last step to ``run()`` returning (the last
                checkpoint and the ``complete`` record, durable on return).

The whole run's ``us/step`` is about ``step us`` plus the start, the checkpoints
and the end spread over the steps (and each epoch's new iterator).

    python benchmarks/loop_overhead.py            # 2,000 steps, 5 rounds, batch 128 and 1
    python benchmarks/loop_overhead.py --quick
    python benchmarks/loop_overhead.py --device cuda   # model and batches on the GPU

On CUDA the loop is bound by kernel launches, so every microsecond of Python the
Session adds per step shows, and a per-step device synchronisation (reading the
loss back) would show as a multiple; each run ends with ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ptutils.data import DataProvider
from ptutils.model import Model
from ptutils.session import Session


class Batches(Dataset):
    """A dataset whose items are ready-made batches (so no variant pays for collation)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[i]


def make_batches(batch_size: int, count: int = 100) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 784, generator=g), torch.randint(0, 10, (batch_size,), generator=g)) for _ in range(count)]


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def loader_of(batches: list) -> DataLoader:
    return DataLoader(Batches(batches), batch_size=None, shuffle=False)


class Clock:
    """Wall and process CPU seconds (every thread's) of the timed region of the last run, and its step ends."""

    def start(self) -> None:
        self.marks: list[float] = []
        self.t0, self._cpu = time.perf_counter(), time.process_time()

    def mark(self) -> None:
        """Note that a step just ended."""
        self.marks.append(time.perf_counter())

    def stop(self) -> float:
        self.t1, self.cpu = time.perf_counter(), time.process_time() - self._cpu
        self.wall = self.t1 - self.t0
        return self.wall

    def phases(self, steps: int) -> dict[str, float] | None:
        """Seconds: start (to the end of step 1), median step, mean checkpoint excess, end; None if not marked."""
        if len(self.marks) != steps:
            return None
        durations = [b - a for a, b in zip(self.marks, self.marks[1:])]  # durations[i] is step i + 2's
        median = statistics.median(durations)
        windows = range(CHECKPOINT_EVERY, steps - 40, CHECKPOINT_EVERY)
        excess = [sum(d - median for d in durations[c - 2:c + 38]) for c in windows]
        return {"start": self.marks[0] - self.t0, "step": median,
                "ckpt": statistics.mean(excess) if excess else math.nan, "end": self.t1 - self.marks[-1]}


CLOCK = Clock()
DEVICE = torch.device("cpu")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def run_raw(init: nn.Module, batches: list, steps: int, checkpoint_dir: str | None = None) -> tuple[float, nn.Module]:
    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    loader = loader_of(batches)
    CLOCK.start()
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            CLOCK.mark()
            if checkpoint_dir is not None and step % CHECKPOINT_EVERY == 0:
                state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
                save_fsynced(state, f"{checkpoint_dir}/{step}.pt")
            if step == steps:
                break
    synchronize()
    return CLOCK.stop(), model


CHECKPOINT_EVERY = 500


def save_fsynced(state: dict, path: str) -> None:
    with open(path, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())


def run_raw_checkpointed(init: nn.Module, batches: list, steps: int) -> tuple[float, nn.Module]:
    with tempfile.TemporaryDirectory() as tmp:
        return run_raw(init, batches, steps, checkpoint_dir=tmp)


def mark_steps(session):
    """An update that notes the end of each step on the clock."""
    if session.event == "step":
        CLOCK.mark()
    return session


class _Provider(DataProvider):
    def __init__(self, batches: list):
        self.batches = batches

    def get_dataloader(self, request: object) -> DataLoader:
        return loader_of(self.batches)


def run_session(init: nn.Module, batches: list, steps: int) -> tuple[float, nn.Module]:
    with tempfile.TemporaryDirectory() as tmp:
        model = Model(copy.deepcopy(init), nn.CrossEntropyLoss(), {"cls": "torch.optim.SGD", "lr": 0.01}, device=DEVICE)
        session = Session(
            model, _Provider(batches), stages=[{"name": "train", "data": "train", "max_steps": steps}],
            db=f"file://{tmp}", checkpoint_every_steps=CHECKPOINT_EVERY, checkpoint_every_epochs=None, name="bench",
            updates=[mark_steps],
        )
        CLOCK.start()
        session.run()
        synchronize()
        elapsed = CLOCK.stop()
        assert session.state == "complete" and session.step == steps
        session.close()
        return elapsed, model.module


def run_ignite(init: nn.Module, batches: list, steps: int) -> tuple[float, nn.Module]:
    from ignite.engine import create_supervised_trainer

    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = create_supervised_trainer(model, opt, nn.CrossEntropyLoss(), device=DEVICE)
    loader = loader_of(batches)
    CLOCK.start()
    trainer.run(loader, max_epochs=-(-steps // len(batches)), epoch_length=min(steps, len(batches)))
    synchronize()
    return CLOCK.stop(), model


def run_lightning(init: nn.Module, batches: list, steps: int) -> tuple[float, nn.Module]:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = copy.deepcopy(init)
            self.loss_fn = nn.CrossEntropyLoss()

        def training_step(self, batch, _):
            x, y = batch
            return self.loss_fn(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.01)

    module = Module()
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="gpu" if DEVICE.type == "cuda" else "cpu", devices=1,
        num_sanity_val_steps=0,
    )
    loader = loader_of(batches)
    CLOCK.start()
    trainer.fit(module, loader)
    synchronize()
    return CLOCK.stop(), module.net


def available() -> dict[str, Callable]:
    variants: dict[str, Callable] = {"raw": run_raw, "raw+ckpt": run_raw_checkpointed, "session": run_session}
    try:
        import ignite  # noqa: F401

        variants["ignite"] = run_ignite
    except ImportError:
        pass
    try:
        import lightning  # noqa: F401

        variants["lightning"] = run_lightning
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
    except ImportError:
        pass
    return variants


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)  # Lightning hands its module back on the CPU


def main() -> None:
    parser = argparse.ArgumentParser(description="Session loop overhead vs a raw PyTorch loop")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1])
    parser.add_argument("--quick", action="store_true", help="500 steps, 2 rounds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model and batches live")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.quick:
        args.steps, args.rounds = 500, 2
    torch.set_num_threads(1)
    variants = available()
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"{args.steps} steps, {args.rounds} interleaved rounds, torch {torch.__version__}, 1 thread, on {where}")
    print(f"{'batch':>5} {'variant':<10} {'median s':>9} {'x raw':>7} {'best x raw':>11} {'cpu x raw':>10} "
          f"{'us/step':>9} {'step us':>8} {'start ms':>9} {'ckpt ms':>8} {'end ms':>7} {'same weights':>13}")
    for batch_size in args.batch_sizes:
        batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in make_batches(batch_size)]
        init = make_mlp().to(DEVICE)
        times: dict[str, list[float]] = {name: [] for name in variants}
        ratios: dict[str, list[float]] = {name: [] for name in variants}
        cpu_ratios: dict[str, list[float]] = {name: [] for name in variants}
        added: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
        identical: dict[str, bool] = {}
        for _ in range(args.rounds):
            before, raw_model = run_raw(init, batches, args.steps)
            before_cpu, before_phases = CLOCK.cpu, CLOCK.phases(args.steps)
            for name, fn in variants.items():
                if name == "raw":
                    continue
                elapsed, model = fn(init, batches, args.steps)
                cpu, phases = CLOCK.cpu, CLOCK.phases(args.steps)
                after, _ = run_raw(init, batches, args.steps)  # the next variant's "before"
                after_phases = CLOCK.phases(args.steps)
                times[name].append(elapsed)
                times["raw"].append(before)
                ratios[name].append(elapsed / ((before + after) / 2))
                cpu_ratios[name].append(cpu / ((before_cpu + CLOCK.cpu) / 2))
                identical[name] = same_weights(model, raw_model)
                if phases is not None:
                    for key, value in phases.items():
                        raw_value = (before_phases[key] + after_phases[key]) / 2
                        added[name].setdefault(key, []).append(value - raw_value)
                before, before_cpu, before_phases = after, CLOCK.cpu, after_phases
            times["raw"].append(before)
        raw_median, raw_best = statistics.median(times["raw"]), min(times["raw"])
        ratios["raw"] = cpu_ratios["raw"] = [1.0]
        for name in variants:
            median = statistics.median(times[name])
            overhead = (median - raw_median) / args.steps * 1e6
            same = "baseline" if name == "raw" else ("yes" if identical[name] else "NO")
            phase = {key: statistics.median(values) for key, values in added[name].items()}
            cells = [""] * 4
            if phase:
                ckpt = f"{phase['ckpt'] * 1e3:.2f}" if math.isfinite(phase["ckpt"]) else "-"
                cells = [f"{phase['step'] * 1e6:.1f}", f"{phase['start'] * 1e3:.2f}", ckpt, f"{phase['end'] * 1e3:.2f}"]
            print(f"{batch_size:>5} {name:<10} {median:>9.3f} {statistics.median(ratios[name]):>7.3f} "
                  f"{min(times[name]) / raw_best:>11.3f} {statistics.median(cpu_ratios[name]):>10.3f} "
                  f"{overhead:>9.1f} {cells[0]:>8} {cells[1]:>9} {cells[2]:>8} {cells[3]:>7} {same:>13}")


if __name__ == "__main__":
    main()
