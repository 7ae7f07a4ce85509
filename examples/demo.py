"""The main demo: an end-to-end session with stages, persisted to the filesystem backend.

It generates a small 10-class image dataset in HDF5 (each class a noisy
pattern), then runs one Session whose stages are ``train`` (evaluating on the
validation split every epoch, leaving early when the validation loss plateaus)
and ``test`` (one evaluation pass).  Everything the session knows is in the
database: run it again with ``--resume ID`` after interrupting it (Ctrl-C
pauses cleanly), or point ``--db`` at another backend URL.

    python examples/demo.py --out /tmp/ptutils-demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from ptutils.data import Dataset, DatasetProvider
from ptutils.errors import Interrupted
from ptutils.model import Model, accuracy
from ptutils.progress import Progress
from ptutils.readers.hdf5 import HDF5Reader
from ptutils.session import Session
from ptutils.update import Evaluate, Monitor, Plateau

CLASSES, SIZE = 10, 16


def make_dataset(path: Path, seed: int = 0, per_class: tuple[int, int, int] = (60, 15, 15)) -> Path:
    """Write train/val/test splits of uint8 NCHW images (class = a fixed random pattern + noise)."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 255, size=(CLASSES, 1, SIZE, SIZE))
    with h5py.File(path, "w") as f:
        for split, n in zip(("train", "val", "test"), per_class):
            labels = np.repeat(np.arange(CLASSES), n)
            rng.shuffle(labels)
            noise = rng.normal(0, 90, size=(len(labels), 1, SIZE, SIZE))
            images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
            f.create_dataset(f"{split}/images", data=images, chunks=(32, 1, SIZE, SIZE))
            f.create_dataset(f"{split}/labels", data=labels.astype(np.int64))
    return path


class Scale(nn.Module):
    """uint8 images -> floats in [0, 1] (on the model's device, so loaders stay cheap)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0


def build_session(h5: Path, db: str, epochs: int, session_id: str | None, progress: bool) -> Session:
    torch.manual_seed(0)
    module = nn.Sequential(
        Scale(), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * (SIZE // 2) ** 2, CLASSES),
    )
    model = Model(module, nn.CrossEntropyLoss(), {"cls": "torch.optim.Adam", "lr": 3e-3},
                  metrics={"accuracy": accuracy}, device="cpu")
    data = DatasetProvider(
        {split: Dataset(HDF5Reader(h5, (f"{split}/images", f"{split}/labels"))) for split in ("train", "val", "test")},
        {"train": {"batch_size": 32, "shuffle": True, "seed": 0}},
        default={"batch_size": 64},
    )
    updates = [
        Evaluate("val", prefix="val"),
        Monitor("val_loss", Plateau(patience=2, min_delta=0.01), then="evaluate", on="epoch",
                stages=["train"], name="val-plateau"),
    ]
    if progress:
        updates.append(Progress())
    return Session(
        model,
        data,
        stages=[
            {"name": "train", "data": "train", "max_epochs": epochs},
            {"name": "test", "data": "test", "mode": "eval", "max_epochs": 1},
        ],
        transitions=[
            {"trigger": "evaluate", "source": "train", "dest": "test"},
            {"trigger": "stage_done", "source": "train", "dest": "test"},
        ],
        updates=updates,
        db=db,
        name="demo",
        session_id=session_id,
        checkpoint_every_epochs=1,
        status_interval=0.5,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ptutils-demo"), help="folder for the data and the database")
    parser.add_argument("--db", help="database URL (default: file://OUT/db)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--resume", metavar="ID", help="resume the paused or interrupted session ID")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    args.out.mkdir(parents=True, exist_ok=True)
    h5 = args.out / "images.h5"
    if not h5.exists():
        make_dataset(h5)
    db = args.db or (args.out / "db").resolve().as_uri()
    session = build_session(h5, db, args.epochs, args.resume, progress=not args.quiet)
    try:
        session.run()  # Ctrl-C (or SIGTERM) checkpoints at the next step and pauses; a second Ctrl-C aborts at once
    except Interrupted as exc:
        print(exc, file=sys.stderr)
    record = session.record
    summary = {
        "session": session.id,
        "db": db,
        "state": record["state"],
        "outcome": record["outcome"],
        "stages": [f"{h['stage']} (step {h['step']}, by {h['trigger']})" for h in record["stage_history"]],
        "steps": record["step"],
        "metrics": {k: round(v, 4) for k, v in record["metrics"].items()},
        "checkpoints": len(session.checkpoints.records()),
    }
    print(json.dumps(summary, indent=2))
    if record["state"] == "paused":
        print(f"paused; continue with: python {sys.argv[0]} --out {args.out} --resume {session.id}")
    session.close()
    return summary


if __name__ == "__main__":
    main()
