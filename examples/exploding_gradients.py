"""Recover from exploding gradients: detect, restore the last stable checkpoint, apply remedies.

A linear regression on unnormalised data: one input feature has four times the
scale of the others, so the learning rate that suits the others (0.075) is
just above the stability limit for that one.  Training first goes well (the
loss drops), then the error along the large feature grows geometrically and
the gradients explode.

A Monitor watches the gradient norm after every step.  When it goes above
``--max-grad-norm`` (or is NaN/inf), its action, ``Remedies``, restores the most
recent checkpoint (they are written every ``--checkpoint-every`` steps; a
non-finite state is never checkpointed) and applies the next remedy of the
list given with ``--remedies`` (earlier remedies stay applied).  If the list
runs out while it still explodes, the session fails.

    python examples/exploding_gradients.py --out /tmp/ptutils-explode
    python examples/exploding_gradients.py --remedies clip:1.0,lower_lr:0.1

Remedies: ``lower_lr:F`` (multiply the learning rate by F), ``clip:N`` (clip the
gradient norm to N from then on).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ptutils.data import DatasetProvider
from ptutils.model import Model
from ptutils.session import Session
from ptutils.update import (
    Evaluate,
    Monitor,
    NonFinite,
    Remedies,
    Threshold,
    clip_gradients,
    lower_lr,
)

WHOLE_TRAIN_SET = {"dataset": "train", "shuffle": False, "batch_size": 512}
"""The data request of the full-data loss: the train set in one batch."""

REMEDIES: dict[str, Callable[[float], Callable[[Session], str]]] = {"lower_lr": lower_lr, "clip": clip_gradients}


def parse_remedies(text: str) -> list[Callable[[Session], str]]:
    """``"lower_lr:0.1,clip:1.0"`` -> ``[lower_lr(0.1), clip_gradients(1.0)]``."""
    remedies = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition(":")
        if name not in REMEDIES or not value:
            raise argparse.ArgumentTypeError(
                f"unknown remedy {item!r}; use NAME:VALUE with NAME one of {', '.join(REMEDIES)}"
            )
        remedies.append(REMEDIES[name](float(value)))
    if not remedies:
        raise argparse.ArgumentTypeError("give at least one remedy")
    return remedies


class Exploding:
    """A Monitor condition: the value is above ``limit`` or not finite."""

    def __init__(self, limit: float):
        self.above, self.nonfinite = Threshold(above=limit), NonFinite()

    def __call__(self, value: Any) -> bool:
        return self.nonfinite(value) or self.above(value)


def make_data(n: int = 512, features: int = 8, scale: float = 4.0, seed: int = 0) -> TensorDataset:
    """``y = x @ w + noise`` where feature 0 has ``scale`` times the spread of the others."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    x[:, 0] *= scale
    w = torch.randn(features, 1, generator=g)
    w[0] = 0.0
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def build_session(
    db: str, *, lr: float, remedies: list[Callable[[Session], str]], max_grad_norm: float,
    checkpoint_every: int, epochs: int, seed: int,
) -> Session:
    """A linear model (zero-initialised) trained with SGD, watched by a gradient-norm Monitor."""
    data = make_data(seed=seed)
    provider = DatasetProvider({"train": data}, default={"batch_size": 256, "shuffle": True, "seed": seed})
    module = nn.Linear(data.tensors[0].shape[1], 1)
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    model = Model(module, nn.MSELoss(), {"cls": "torch.optim.SGD", "lr": lr}, device="cpu")
    return Session(
        model,
        provider,
        stages=[{"name": "train", "data": "train", "max_epochs": epochs}],
        updates=[
            Monitor("grad_norm", Exploding(max_grad_norm), then=Remedies(remedies), name="grad-norm"),
            Evaluate(WHOLE_TRAIN_SET, prefix="train"),
        ],
        db=db,
        name="exploding-gradients",
        seed=seed,
        checkpoint_every_steps=checkpoint_every,
        checkpoint_every_epochs=None,
        status_interval=0.5,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ptutils-explode"), help="folder for the database")
    parser.add_argument("--db", help="database URL (default: file://OUT/db)")
    parser.add_argument("--remedies", type=parse_remedies, default=parse_remedies("lower_lr:0.1,clip:1.0"),
                        help="comma-separated remedies applied in turn, e.g. lower_lr:0.1,clip:1.0")
    parser.add_argument("--lr", type=float, default=0.075)
    parser.add_argument("--max-grad-norm", type=float, default=30.0, help="gradient norm that counts as exploding")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    args.out.mkdir(parents=True, exist_ok=True)
    db = args.db or (args.out / "db").resolve().as_uri()
    session = build_session(db, lr=args.lr, remedies=args.remedies, max_grad_norm=args.max_grad_norm,
                            checkpoint_every=args.checkpoint_every, epochs=args.epochs, seed=args.seed)
    try:
        first = session.evaluate(WHOLE_TRAIN_SET, prefix="initial")["initial_loss"]
        try:
            session.run()
        except FloatingPointError as exc:  # the remedies ran out; the record says failed, with the reason
            print(f"failed: {exc}")
        record = session.record
        final = record["metrics"].get("train_loss")
        summary = {
            "session": session.id,
            "db": db,
            "state": record["state"],
            "outcome": record["outcome"],
            "steps": record["step"],
            "first_loss": round(first, 4),
            "final_loss": None if final is None or not math.isfinite(final) else round(final, 4),
            "exploded": [{"step": e["step"], "grad_norm": round(e["value"], 2)} for e in session.events("monitor")],
            "restores": [{"to_step": e["restored_step"], "checkpoint": e["checkpoint"]}
                         for e in session.events("restore")],
            "remedies": [e["remedy"] for e in session.events("remedy")],
            "final_lr": session.model.lr,
            "grad_clip": session.model.grad_clip,
        }
    finally:
        session.close()
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["state"] == "complete" else 1)
