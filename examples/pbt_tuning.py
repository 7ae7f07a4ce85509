"""Population-based training against random search from the same start, with the same compute.

The toy of ``tuning.md`` (the issue-8 example): a fixed random tanh-MLP (the
teacher) labels 20-dimensional Gaussian inputs into 4 classes, with 10 % of the
labels replaced by random ones; 1024 train, 1024 validation and 3072 test
examples, generated (seeded) into ``OUT/toy-seedN.npz``.  The student is a
20-64-4 ReLU MLP trained with SGD (momentum 0.9, batch 64, 16 steps an epoch).

Two tuning sessions of 4 children each tune the learning rate
(``model.optimizer.lr`` ~ LogUniform(1e-4, 1)) and the weight decay
(``model.optimizer.weight_decay`` ~ LogUniform(1e-6, 0.1)) on validation
accuracy:

* PBT: every 4 epochs (64 steps) the worst child takes the best child's
  checkpoint and perturbed (or resampled) hyperparameters; the population
  table is printed after every round;
* random search: the same 4 initial values (those the PBT session drew and
  stored), the same initial weights (child *i* is seeded ``seed + i`` in both)
  and the same number of epochs, each child on its own.

Both run on a local pool of 2 spawned workers (``--executor``); each child is
rebuilt from its stored config, whose data and model specs name the factories
of this module (``pbt_tuning.make_provider``, ``pbt_tuning.mlp``), importable
in the workers because the script's folder is on ``sys.path``.  At the end the
final weights of every child are scored on the test split and a JSON summary
is printed: PBT's best test accuracy against random search's median and best.

    python examples/pbt_tuning.py --out /tmp/ptutils-pbt
    python examples/pbt_tuning.py --out /tmp/ptutils-pbt --seed 3 --quiet

Run again with the same ``--out``, ``--seed`` and ``--epochs`` and the stored
sessions are read back (an interrupted one goes on where it stopped).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ptutils import load_weights
from ptutils.data import DatasetProvider
from ptutils.nest import Tuning
from ptutils.searchers import PBT, RandomSearch
from ptutils.spaces import LogUniform

FEATURES, HIDDEN, CLASSES = 20, 64, 4
TEACHER_HIDDEN = 32
SPLITS = {"train": 1024, "val": 1024, "test": 3072}
LABEL_NOISE = 0.1
BATCH = 64
INTERVAL_EPOCHS = 4
POPULATION_SIZE = 4
SPACE = {"model.optimizer.lr": LogUniform(1e-4, 1.0), "model.optimizer.weight_decay": LogUniform(1e-6, 0.1)}
METRIC, MODE = "val_accuracy", "max"


def make_toy(path: Path, seed: int = 0) -> Path:
    """Write the teacher-labelled splits (``{split}_x`` float32, ``{split}_y`` int64) to an ``.npz``."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0.0, 2.0 / np.sqrt(FEATURES), size=(FEATURES, TEACHER_HIDDEN))
    b1 = rng.normal(0.0, 0.5, size=TEACHER_HIDDEN)
    w2 = rng.normal(0.0, 1.0 / np.sqrt(TEACHER_HIDDEN), size=(TEACHER_HIDDEN, CLASSES))
    arrays: dict[str, np.ndarray] = {}
    for split, n in SPLITS.items():
        x = rng.normal(size=(n, FEATURES))
        y = np.argmax(np.tanh(x @ w1 + b1) @ w2, axis=1)
        noisy = rng.random(n) < LABEL_NOISE
        y[noisy] = rng.integers(CLASSES, size=int(noisy.sum()))
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x.astype(np.float32), y.astype(np.int64)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def _split(path: str, split: str) -> TensorDataset:
    with np.load(path) as data:
        return TensorDataset(torch.from_numpy(data[f"{split}_x"]), torch.from_numpy(data[f"{split}_y"]))


def make_provider(path: str, seed: int = 0) -> DatasetProvider:
    """The toy's train/val/test splits from :func:`make_toy`'s file (the config's ``data`` spec)."""
    return DatasetProvider({split: _split(path, split) for split in SPLITS},
                           default={"batch_size": BATCH, "shuffle": True, "seed": seed})


def mlp() -> nn.Module:
    """The student: 20-64-4 with a ReLU (initialised from the child's seed, set before it is built)."""
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def base_config(data: Path, epochs: int, seed: int) -> dict[str, Any]:
    """The children's config; every part an import path, as each child is rebuilt from its stored config."""
    return {
        "name": "pbt-toy",
        "seed": seed,
        "model": {
            "module": {"cls": "pbt_tuning.mlp"},
            "criterion": {"cls": "torch.nn.CrossEntropyLoss"},
            "optimizer": {"cls": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
            "metrics": {"accuracy": "ptutils.model.accuracy"},
            "device": "cpu",
        },
        "data": {"cls": "pbt_tuning.make_provider", "path": str(data), "seed": seed},
        "stages": [{"name": "train", "data": "train", "max_epochs": epochs}],
        "updates": [{"cls": "ptutils.update.Evaluate", "data": "val"}],
        "checkpoint": {"every_epochs": INTERVAL_EPOCHS, "keep": 1},
        "status_interval": 1.0,
    }


def executor_settings(kind: str) -> str | dict[str, Any]:
    return {"kind": "pool", "workers": 2} if kind == "pool" else kind


def score_on_test(db: str, child: str, test: TensorDataset) -> float:
    """The accuracy of ``child``'s final weights on the test split."""
    module = mlp()
    module.load_state_dict(load_weights(db, child))
    module.eval()
    x, y = test.tensors
    with torch.no_grad():
        return float((module(x).argmax(dim=1) == y).float().mean())


def arm_summary(tuning: Tuning, db: str, test: TensorDataset, wall_s: float) -> dict[str, Any]:
    """What one arm did: its children's final states, values and test accuracies, its exploits and its table."""
    initial = tuning.session.record["tuning"]["initial"]
    children = []
    for index, row in enumerate(tuning.population()):
        children.append({"child": row["child"], "state": row["state"], "steps": row["step"],
                         METRIC: row["score"], "generation": row["generation"], "initial": initial[index],
                         "values": row["values"], "test_accuracy": round(score_on_test(db, row["child"], test), 4)})
    accuracies = [c["test_accuracy"] for c in children]
    exploits = sum(1 for r in tuning.rows() if r["action"] == "exploit")
    return {"session": tuning.id, "wall_s": round(wall_s, 1), "children": children,
            "test_accuracies": accuracies, "best_test_accuracy": max(accuracies),
            "median_test_accuracy": round(statistics.median(accuracies), 4), "exploits": exploits,
            "rounds": tuning.session.record["tuning"]["round"], "table": tuning.table().splitlines()}


def timed_run(tuning: Tuning) -> float:
    """Run (or finish, or read back) the tuning; the seconds it took."""
    start = time.perf_counter()
    tuning.run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ptutils-pbt"), help="folder for the data and the database")
    parser.add_argument("--epochs", type=int, default=40,
                        help=f"epochs per child (PBT decides every {INTERVAL_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="data, initial values and weights, PBT's draws")
    parser.add_argument("--executor", choices=("pool", "inprocess", "ray"), default="pool")
    parser.add_argument("--quiet", action="store_true", help="no population tables while running")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    args.out.mkdir(parents=True, exist_ok=True)
    data = (args.out / f"toy-seed{args.seed}.npz").resolve()
    if not data.exists():
        make_toy(data, args.seed)
    db = (args.out / "db").resolve().as_uri()
    config = base_config(data, args.epochs, args.seed)
    executor = executor_settings(args.executor)
    steps_per_epoch = SPLITS["train"] // BATCH

    def show(tuning: Tuning) -> None:
        if not args.quiet:
            rounds = tuning.session.record["tuning"]["round"]
            print(f"-- {tuning.session.name}, after round {rounds}", tuning.table(), sep="\n", flush=True)

    pbt = PBT(metric=METRIC, mode=MODE, perturbation_interval=INTERVAL_EPOCHS * steps_per_epoch,
              hyperparam_mutations=SPACE, population_size=POPULATION_SIZE, seed=args.seed)
    tag = f"s{args.seed}-e{args.epochs}"
    with Tuning(config, pbt, executor=executor, db=db, name="pbt", session_id=f"pbt-{tag}", on_round=show) as tuning:
        pbt_wall = timed_run(tuning)
        initial = tuning.session.record["tuning"]["initial"]
        test = _split(str(data), "test")
        pbt_arm = arm_summary(tuning, db, test, pbt_wall)

    random = RandomSearch(num_samples=POPULATION_SIZE, seed=args.seed)
    with Tuning(config, random, space=SPACE, initial=initial, executor=executor, db=db, name="random",
                session_id=f"random-{tag}", metric=METRIC, mode=MODE, on_round=show) as tuning:
        rs_arm = arm_summary(tuning, db, test, timed_run(tuning))

    summary = {
        "db": db,
        "seed": args.seed,
        "epochs": args.epochs,
        "executor": args.executor,
        "initial": initial,
        "pbt_best_test_accuracy": pbt_arm["best_test_accuracy"],
        "pbt_median_test_accuracy": pbt_arm["median_test_accuracy"],
        "random_median_test_accuracy": rs_arm["median_test_accuracy"],
        "random_best_test_accuracy": rs_arm["best_test_accuracy"],
        "pbt_beats_random_median": pbt_arm["best_test_accuracy"] > rs_arm["median_test_accuracy"],
        "pbt_wall_s": pbt_arm["wall_s"],
        "random_wall_s": rs_arm["wall_s"],
        "pbt": pbt_arm,
        "random": rs_arm,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
