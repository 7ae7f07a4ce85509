"""Multistage training in one session: train on "ImageNet" (HDF5), test, then finetune on a JPEG folder.

The first use case of the design notes, at small scale.  The script generates

* an ImageNet-like dataset in HDF5: 10 classes of 32x32 RGB uint8 images (each
  class a smooth colour pattern, each image that pattern under a random
  low-frequency distractor and pixel noise), with train/val/test splits, read
  through ``ptutils.data.ImageNet`` and its ``HDF5Reader``;
* a small task-specific dataset as a folder of JPEGs (4 new classes), read
  through a user-defined ``torchvision.datasets.ImageFolder`` subclass that the
  DatasetProvider serves under the names ``task_train`` and ``task_val``.

One Session then runs a small AlexNet-shaped CNN through the stages

* ``train``: trains on the HDF5 train split, measuring the training error
  (``Evaluate`` on the train split in eval mode, prefix ``train``) and the
  validation error every epoch.  A Monitor on ``gap("train_error",
  "val_error")`` fires the ``overfit`` trigger as soon as the training error is
  well below the validation error (by more than ``--gap``); if that never
  happens, the epoch budget runs out (``stage_done``).  Either way the session moves to
* ``test``: one pass over the test split in eval mode.  When the test error is
  below ``--test-threshold`` (a guarded ``stage_done`` transition), the
  session moves to
* ``finetune``, whose ``setup`` reinitialises the bottleneck layer and the
  classifier (a new head for the task's classes) and gives the model a fresh
  optimizer (a stage setup is replayed before a resume, so a paused finetune
  resumes with the right head); it trains on the JPEG folder, evaluating on its
  val split.

Otherwise the session completes after ``test``.  Every stage change is in the
status record (``record["stage_history"]``, with the trigger that caused it).

    python examples/multistage.py --out /tmp/ptutils-multistage
    python examples/multistage.py --out /tmp/ptutils-multistage --test-threshold 0   # never satisfied
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.datasets import ImageFolder
from torchvision.io import encode_jpeg
from torchvision.transforms import v2

from ptutils.data import DatasetProvider, ImageNet
from ptutils.model import Model
from ptutils.session import Session
from ptutils.update import Evaluate, Monitor, Threshold, gap

SIZE = 32
CLASSES = 10
TASK_CLASSES = 4


# ---------------------------------------------------------------------- data
def _smooth_fields(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` smooth RGB fields in [0, 1]: random 4x4 colour grids upsampled to SIZE x SIZE."""
    grid = torch.from_numpy(rng.uniform(0, 1, size=(count, 3, 4, 4)).astype(np.float32))
    return F.interpolate(grid, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1).numpy()


def _images(rng: np.random.Generator, patterns: np.ndarray, labels: np.ndarray, distractor: float) -> np.ndarray:
    """uint8 NCHW images: the label's pattern, shifted, under a random smooth distractor and noise."""
    distractors = _smooth_fields(rng, len(labels))
    out = np.empty((len(labels), 3, SIZE, SIZE), np.float32)
    for i, label in enumerate(labels):
        dy, dx = rng.integers(-4, 5, size=2)
        shifted = np.roll(patterns[label], (int(dy), int(dx)), axis=(1, 2))
        out[i] = 0.5 * shifted + distractor * distractors[i] + rng.normal(0, 0.1, size=shifted.shape)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def _labels(rng: np.random.Generator, classes: int, per_class: int) -> np.ndarray:
    labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(labels)
    return labels


def make_imagenet(
    path: Path, seed: int = 0, per_class: tuple[int, int, int] = (20, 20, 20), distractor: float = 0.6
) -> Path:
    """Write ``{train,val,test}/{images,labels}``: uint8 (N, 3, 32, 32) images and int64 labels."""
    rng = np.random.default_rng(seed)
    patterns = _smooth_fields(rng, CLASSES)
    with h5py.File(path, "w") as f:
        for split, n in zip(("train", "val", "test"), per_class):
            labels = _labels(rng, CLASSES, n)
            images = _images(rng, patterns, labels, distractor)
            f.create_dataset(f"{split}/images", data=images, chunks=(32, 3, SIZE, SIZE))
            f.create_dataset(f"{split}/labels", data=labels.astype(np.int64))
    return path


def make_task_folder(root: Path, seed: int = 1, per_class: tuple[int, int] = (16, 8)) -> Path:
    """Write ``root/{train,val}/class_<k>/<n>.jpg``: 4 new classes, built like the HDF5 ones."""
    rng = np.random.default_rng(seed)
    patterns = _smooth_fields(rng, TASK_CLASSES)
    for split, n in zip(("train", "val"), per_class):
        labels = np.sort(_labels(rng, TASK_CLASSES, n))
        images = _images(rng, patterns, labels, 0.4)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.jpg").write_bytes(encode_jpeg(torch.from_numpy(image), quality=90).numpy().tobytes())
    return root


class TaskImages(ImageFolder):
    """The task's JPEGs, ``root/<split>/<class>/*.jpg``, as (uint8 CHW tensor, label) pairs."""

    def __init__(self, root: Path, split: str):
        super().__init__(str(root / split), transform=v2.PILToTensor())


# ---------------------------------------------------------------------- model
class SmallAlexNet(nn.Module):
    """AlexNet's shape at 32x32: five convolutions, then fc -> bottleneck fc -> classifier."""

    def __init__(self, classes: int = CLASSES, bottleneck: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(48, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(32 * 4 * 4, 128), nn.ReLU(inplace=True))
        self.bottleneck = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, bottleneck), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(bottleneck, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() / 255.0 - 0.5) / 0.25  # uint8 in, normalised here so loaders stay cheap
        return self.classifier(self.bottleneck(self.hidden(self.features(x))))

    def reset_head(self, classes: int) -> None:
        """Reinitialise the bottleneck layer and replace the classifier by a fresh one for ``classes``."""
        for layer in self.bottleneck:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        old = self.classifier
        self.classifier = nn.Linear(old.in_features, classes, device=old.weight.device)


def error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max is not the target class."""
    return (outputs.argmax(dim=-1) != targets).float().mean()


# ---------------------------------------------------------------------- session
def build_session(
    out: Path, db: str, *, epochs: int, gap_threshold: float, test_threshold: float, finetune_epochs: int, seed: int
) -> Session:
    """The model, the provider of the five datasets, and the staged session over them."""
    h5 = out / "imagenet.h5"
    if not h5.exists():
        make_imagenet(h5, seed=seed)
    task = out / "task"
    if not task.exists():
        make_task_folder(task, seed=seed + 1)

    torch.manual_seed(seed)
    model = Model(SmallAlexNet(), nn.CrossEntropyLoss(), {"cls": "torch.optim.Adam", "lr": 3e-3},
                  metrics={"error": error}, device="cpu")
    data = DatasetProvider(
        {
            **{split: ImageNet(h5, split=split) for split in ("train", "val", "test")},
            "task_train": TaskImages(task, "train"),
            "task_val": TaskImages(task, "val"),
        },
        {
            "train": {"batch_size": 32, "shuffle": True, "seed": seed},
            "task_train": {"batch_size": 16, "shuffle": True, "seed": seed},
        },
        default={"batch_size": 100},
    )

    def test_satisfactory(session: Session) -> bool:
        return session.metrics["test_error"] < test_threshold

    def start_finetune(session: Session) -> None:
        session.model.module.reset_head(TASK_CLASSES)
        session.model.set_optimizer({"cls": "torch.optim.Adam", "lr": 2e-3})

    return Session(
        model,
        data,
        stages=[
            {"name": "train", "data": "train", "max_epochs": epochs},
            {"name": "test", "data": "test", "mode": "eval", "max_epochs": 1},
            {"name": "finetune", "data": "task_train", "max_epochs": finetune_epochs, "setup": start_finetune},
        ],
        transitions=[
            {"trigger": "overfit", "source": "train", "dest": "test"},
            {"trigger": "stage_done", "source": "train", "dest": "test"},
            {"trigger": "stage_done", "source": "test", "dest": "finetune",
             "conditions": [test_satisfactory]},
        ],
        updates=[
            Evaluate({"dataset": "train", "shuffle": False}, prefix="train", stages=["train"]),
            Evaluate("val", prefix="val", stages=["train"]),
            Monitor(gap("train_error", "val_error"), Threshold(above=gap_threshold), then="overfit",
                    on="epoch", stages=["train"], name="overfitting"),
            Evaluate("task_val", prefix="task_val", stages=["finetune"]),
        ],
        db=db,
        name="multistage",
        seed=seed,
        checkpoint_every_epochs=1,
        status_interval=0.5,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ptutils-multistage"),
                        help="folder for the data and the database")
    parser.add_argument("--db", help="database URL (default: file://OUT/db)")
    parser.add_argument("--epochs", type=int, default=15, help="epoch budget of the train stage")
    parser.add_argument("--gap", type=float, default=0.25, help="val error minus train error that ends training")
    parser.add_argument("--test-threshold", type=float, default=0.6,
                        help="finetune only if the test error is below this")
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (one is fastest for this small model on a busy machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    args.out.mkdir(parents=True, exist_ok=True)
    db = args.db or (args.out / "db").resolve().as_uri()
    session = build_session(args.out, db, epochs=args.epochs, gap_threshold=args.gap,
                            test_threshold=args.test_threshold, finetune_epochs=args.finetune_epochs, seed=args.seed)
    try:
        session.run()
        record = session.record
        summary = {
            "session": session.id,
            "db": db,
            "state": record["state"],
            "outcome": record["outcome"],
            "stages": [
                {"stage": h["stage"], "from": h["from"], "trigger": h["trigger"], "step": h["step"]}
                for h in record["stage_history"]
            ],
            "monitor": [{"step": e["step"], "gap": round(e["value"], 4)} for e in session.events("monitor")],
            "steps": record["step"],
            "metrics": {k: round(v, 4) for k, v in sorted(record["metrics"].items())},
        }
    finally:
        session.close()
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
