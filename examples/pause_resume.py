"""Pause a running session from another process, resume it later, and get the same weights.

Subcommands (all take ``--id``, and ``--db URL`` or ``--out DIR`` for the
default ``file://OUT/db``):

* ``run``: start the session ``--id`` (a small MLP classifier on synthetic
  data, fixed seed), or continue it if it is paused or was interrupted.  Each
  step sleeps ``--step-delay`` seconds so that a person has time to pause it.
  Prints a JSON summary with the SHA-256 of the final weights.
* ``pause``: write a pause request into the record of the running session
  (``ptutils.status.request_pause``); this process exits at once.  It refuses
  a session that is not running, whose next run the request would pause.
* ``status``: print the record's state, stage, step, progress and ETA.

In one terminal::

    python examples/pause_resume.py run --id exp1

In another, while it runs::

    python examples/pause_resume.py status --id exp1   # state running, step, progress, ETA
    python examples/pause_resume.py pause --id exp1

The running process sees the request at its next heartbeat (every 0.5 s),
checkpoints, and exits cleanly with state ``paused``.  Later::

    python examples/pause_resume.py run --id exp1       # resumes from the pause checkpoint

It completes with exactly the weights of an uninterrupted run (the step delay
changes nothing but the speed): compare its ``weights_sha256`` with::

    python examples/pause_resume.py run --id reference --step-delay 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ptutils import session_record
from ptutils.data import DatasetProvider
from ptutils.errors import SessionNotFound
from ptutils.model import Model, accuracy
from ptutils.session import Session
from ptutils.status import describe, request_pause
from ptutils.update import Evaluate


def make_data(n: int = 1024, features: int = 16, seed: int = 0) -> DatasetProvider:
    """Two classes split by a random hyperplane (with 10% label noise), 3/4 train and 1/4 val."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, generator=g) > 0).long()
    flip = torch.rand(n, generator=g) < 0.1
    y[flip] = 1 - y[flip]
    split = n * 3 // 4
    return DatasetProvider(
        {"train": TensorDataset(x[:split], y[:split]), "val": TensorDataset(x[split:], y[split:])},
        {"train": {"batch_size": 32, "shuffle": True, "seed": seed}},
        default={"batch_size": 256},
    )


def build_session(db: str, session_id: str, *, epochs: int, step_delay: float, seed: int) -> Session:
    """An MLP with dropout (so the resumed run must restore the RNG too), SGD with momentum."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64), nn.ReLU(),
                           nn.Dropout(0.2), nn.Linear(64, 2))
    model = Model(module, nn.CrossEntropyLoss(), {"cls": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9},
                  metrics={"accuracy": accuracy}, device="cpu")

    def slow_down(session: Session) -> Session:
        """Sleep after each step, so there is time to pause by hand."""
        if session.event == "step" and step_delay > 0:
            time.sleep(step_delay)
        return session

    return Session(
        model,
        make_data(seed=seed),
        stages=[{"name": "train", "data": "train", "max_epochs": epochs}],
        updates=[Evaluate("val"), slow_down],
        db=db,
        name="pause-resume",
        session_id=session_id,
        seed=seed,
        checkpoint_every_epochs=1,
        status_interval=0.5,
    )


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer: name, dtype, shape and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def status_of(record: dict[str, Any]) -> dict[str, Any]:
    """What a person wants to see of a status record (an ETA only while it runs)."""
    running = describe(record) == "running"
    return {
        "session": record["_id"],
        "state": describe(record),
        "stage": record.get("stage"),
        "step": record.get("step"),
        "epoch": record.get("epoch"),
        "progress": round(float(record.get("progress") or 0.0), 4),
        "eta_seconds": round(record["eta_seconds"], 1) if running and record.get("eta_seconds") is not None else None,
        "attempt": record.get("attempt"),
        "pause_reason": record.get("pause_reason"),
        "pause_requested": bool((record.get("control") or {}).get("pause")),
        "last_checkpoint_step": (record.get("last_checkpoint") or {}).get("step"),  # where a resume would start
        "outcome": record.get("outcome"),
        "heartbeat_age_s": round(time.time() - float(record.get("heartbeat") or 0.0), 1),
        "metrics": {k: round(v, 4) for k, v in sorted((record.get("metrics") or {}).items())},
    }


def cmd_run(args: argparse.Namespace, db: str) -> int:
    session = build_session(db, args.id, epochs=args.epochs, step_delay=args.step_delay, seed=args.seed)
    try:
        if session.state == "complete":
            print(f"session {args.id} is already complete", file=sys.stderr)
            print(json.dumps(status_of(session.record), indent=2))
            return 0
        resumed = session.state == "paused"
        session.run()
        summary = {
            **status_of(session.record),
            "resumed": resumed,
            "weights_sha256": weights_sha256(session.model.module),
        }
    finally:
        session.close()
    print(json.dumps(summary, indent=2))
    if summary["state"] == "paused":
        print(f"paused; continue with: python {sys.argv[0]} run --id {args.id} --db {db}")
    return 0


def cmd_pause(args: argparse.Namespace, db: str) -> int:
    try:
        state = session_record(db, args.id).state
        # A request left in a record that is not running would pause the next run at once.
        if state != "running":
            print(f"session {args.id} is {state}, not running: nothing to pause", file=sys.stderr)
            return 1
        request_pause(db, args.id, reason=args.reason)
    except SessionNotFound as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"pause requested for {args.id}; it pauses at its next heartbeat")
    return 0


def cmd_status(args: argparse.Namespace, db: str) -> int:
    try:
        record = session_record(db, args.id).record
    except SessionNotFound as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(status_of(record), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--id", required=True, help="the session id")
    common.add_argument("--out", type=Path, default=Path("ptutils-pause"), help="folder of the default database")
    common.add_argument("--db", help="database URL (default: file://OUT/db)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[common], help="start or continue the session")
    run.add_argument("--epochs", type=int, default=6)
    run.add_argument("--step-delay", type=float, default=0.1, help="seconds to sleep after each step")
    run.add_argument("--seed", type=int, default=0)
    pause = commands.add_parser("pause", parents=[common], help="ask the running session to pause")
    pause.add_argument("--reason", default="requested from the command line")
    commands.add_parser("status", parents=[common], help="print the session's status")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.db is None and args.command == "run":
        args.out.mkdir(parents=True, exist_ok=True)
    db = args.db or (args.out / "db").resolve().as_uri()
    return {"run": cmd_run, "pause": cmd_pause, "status": cmd_status}[args.command](args, db)


if __name__ == "__main__":
    sys.exit(main())
