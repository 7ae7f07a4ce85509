"""A training session run in a child process, with faults injected on request.

    python -m tests.support.crashkit URL SESSION_ID [--kill-at-step K] [--kill-in-checkpoint-write N]
                                            [--kill-in-status-write N] [--step-sleep S]
                                            [--disk-full-at-step K DIR] [--drop-root-at-step K]
                                            [--no-epoch-checkpoints] [--store-events-first]
                                            [--signal-self-at-step K N]

``--kill-*`` end the process with SIGKILL at that exact point: at step K (a
background write may be in flight), half-way through writing the Nth
checkpoint blob, or half-way through writing the Nth status record.
``--signal-self-at-step K N`` sends the process N real SIGINTs during step K
(as N presses of Ctrl-C would); the ``Interrupted`` that ``run()`` raises is
printed, and the process ends normally.  The run
is the one ``reference()`` builds, so a test can compare final weights.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

STEPS_PER_EPOCH = 5
EPOCHS = 4


def build(url: str, session_id: str | None = None, updates: list | None = None, **kwargs: Any):
    """The session every reliability run trains (20 steps, dropout, a checkpoint every 3 steps)."""
    from tests.support.sessionkit import session

    kwargs.setdefault("stages", [{"name": "train", "data": "train", "max_epochs": EPOCHS}])
    kwargs.setdefault("checkpoint_every_steps", 3)
    kwargs.setdefault("status_interval", 0.0)
    return session(url, session_id=session_id, dropout=0.3, updates=updates or [], **kwargs)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_inside_fs_write(nth: int, is_target) -> None:
    """Patch the filesystem backend so the nth matching file write dies half-way through."""
    from ptutils.backends import filesystem

    original = filesystem._write_all
    seen = {"count": 0}

    def write_all(fd: int, data: bytes | memoryview) -> None:
        if is_target(data):
            seen["count"] += 1
            if seen["count"] == nth:
                original(fd, data[: len(data) // 2])
                _kill()
        original(fd, data)

    filesystem._write_all = write_all


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("session_id")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-checkpoint-write", type=int)
    parser.add_argument("--kill-in-status-write", type=int)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--disk-full-at-step", nargs=2, metavar=("K", "DIR"))
    parser.add_argument("--leave-free", type=int, default=0, help="bytes left free by --disk-full-at-step")
    parser.add_argument("--checkpoint-padding", type=int, default=0, help="bytes of a model buffer every checkpoint holds")
    parser.add_argument("--drop-root-at-step", type=int)
    parser.add_argument("--no-epoch-checkpoints", action="store_true", help="checkpoint every 3 steps only")
    parser.add_argument("--store-events-first", action="store_true", help="with --kill-at-step: store events, then kill")
    parser.add_argument("--signal-self-at-step", nargs=2, type=int, metavar=("K", "N"))
    args = parser.parse_args(argv)

    if args.kill_in_checkpoint_write:
        _kill_inside_fs_write(args.kill_in_checkpoint_write, lambda data: bytes(data[:8]) != b"ptutils-"
                              and len(data) > 4096 and b'"format":"ptutils-checkpoint/1"' in bytes(data[:4096]))
    if args.kill_in_status_write:
        _kill_inside_fs_write(args.kill_in_status_write, lambda data: b'"kind":"session"' in bytes(data))

    def faults(session):
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if session.event != "step":
            return session
        if args.kill_at_step is not None and session.step == args.kill_at_step:
            if args.store_events_first:
                session.events()  # every event logged so far is stored, as a heartbeat would have done
            _kill()
        if args.disk_full_at_step and session.step == int(args.disk_full_at_step[0]):
            session.drain()  # writes begun before step K (and the pruning after them) land before the disk fills
            filler = os.path.join(args.disk_full_at_step[1], "filler")
            with open(filler, "wb", buffering=0) as fh:  # take every free byte of the small file system
                try:
                    while True:
                        fh.write(b"\0" * 4096)
                except OSError:
                    pass
                if args.leave_free:
                    fh.truncate(max(0, fh.tell() - args.leave_free))
        if args.signal_self_at_step and session.step == args.signal_self_at_step[0]:
            for _ in range(args.signal_self_at_step[1]):
                os.kill(os.getpid(), signal.SIGINT)
        if args.drop_root_at_step is not None and session.step == args.drop_root_at_step:
            os.setgid(65534)
            os.setuid(65534)
        return session

    options = {"checkpoint_every_epochs": None} if args.no_epoch_checkpoints else {}
    session = build(args.url, args.session_id, updates=[faults], **options)
    if args.checkpoint_padding:
        import torch

        session.model.module.register_buffer("padding", torch.zeros(args.checkpoint_padding, dtype=torch.uint8))
    from ptutils.errors import Interrupted

    try:
        session.run()
    except Interrupted as exc:
        print(f"interrupted signal={exc.signal} aborted={exc.aborted}", flush=True)
    finally:
        print(f"state={session.state} step={session.step}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
