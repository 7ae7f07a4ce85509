"""TensorBoard runs read back with TensorBoard's own reader, and a TensorBoard session run in a child process.

    python -m tests.support.tbkit URL SESSION_ID LOG_DIR [--every step|epoch] [--kill-at-step K]
                                  [--flush-before-kill] [--no-epoch-checkpoints]

The child trains :func:`build`'s session (crashkit's run, with an evaluation
every epoch and a TensorBoard update first) and, with ``--kill-at-step``, ends
with SIGKILL at step K (``--flush-before-kill``: after its TensorBoard writer
flushed everything, the worst case for a resume: the steps after the checkpoint
are on disk).  A run to its end closes the writer at interpreter exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def build(url: str, session_id: str | None, log_dir: str, *, every: str = "epoch", extra: list | None = None,
          **kwargs: Any):
    """crashkit's session (4 epochs of 5 steps, checkpoints every 3 steps) + TensorBoard + val evaluation."""
    from ptutils.tensorboard import TensorBoard
    from ptutils.update import Evaluate
    from tests.support import crashkit

    tb = TensorBoard(log_dir, every=every, flush_secs=600)  # flushes only when it must: at checkpoints, at the end
    return crashkit.build(url, session_id, updates=[tb, Evaluate("val"), *(extra or [])], **kwargs), tb


def read_scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the run's scalars, as TensorBoard's server loads them (purges applied)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(str(run_dir), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    found: dict[str, list[tuple[int, float]]] = {}
    for tag in acc.PluginTagToContent("scalars"):
        found[tag] = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto).item())) for e in acc.Tensors(tag)]
    return found


def read_hparams(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The HParams plugin's data in the run: ``{"hparams": {...}, "metrics": [...], "status": ... or None}``."""
    from google.protobuf import json_format
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.plugins.hparams import api_pb2, metadata

    acc = pea.EventAccumulator(str(run_dir), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    out: dict[str, Any] = {"tags": sorted(content), "hparams": {}, "metrics": [], "status": None,
                           "types": {}}
    if metadata.SESSION_START_INFO_TAG in content:
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        out["hparams"] = {k: json_format.MessageToDict(v) for k, v in start.hparams.items()}
    if metadata.EXPERIMENT_TAG in content:
        exp = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
        out["metrics"] = [m.name.tag for m in exp.metric_infos]
        out["types"] = {h.name: api_pb2.DataType.Name(h.type) for h in exp.hparam_infos}
    if metadata.SESSION_END_INFO_TAG in content:
        end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
        out["status"] = api_pb2.Status.Name(end.status)
    return out


def runs(log_dir: str | os.PathLike) -> list[str]:
    """The runs TensorBoard finds under ``log_dir`` (what its run selector lists)."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem

    mux = pem.EventMultiplexer()
    mux.AddRunsFromDirectory(str(log_dir))
    mux.Reload()
    return sorted(mux.Runs())


def history(session: Any) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` of every metric in the session's stored metric events."""
    names = sorted({name for e in session.events("metrics") for name in e["metrics"]})
    return {name: [(p.step, p.value) for p in session.metric_history(name)] for name in names}


def run_child(url: str, session_id: str, log_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.support.tbkit", url, session_id, log_dir, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("session_id")
    parser.add_argument("log_dir")
    parser.add_argument("--every", default="epoch")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--flush-before-kill", action="store_true")
    parser.add_argument("--no-epoch-checkpoints", action="store_true")
    args = parser.parse_args(argv)
    holder: dict[str, Any] = {}

    def kill(session):
        if session.event == "step" and session.step == args.kill_at_step:
            if args.flush_before_kill:
                holder["tb"].flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return session

    options = {"checkpoint_every_epochs": None} if args.no_epoch_checkpoints else {}
    session, holder["tb"] = build(args.url, args.session_id, args.log_dir, every=args.every, extra=[kill], **options)
    session.run()
    print(f"state={session.state} step={session.step}", flush=True)


if __name__ == "__main__":
    main()
