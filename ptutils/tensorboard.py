"""TensorBoard: an update that writes a session's metric events and hyperparameters into one run directory.

``updates=[TensorBoard("tb")]`` writes to ``tb/<session id>`` (one run per
session, whatever the number of processes it takes):

- every ``metrics`` event the session logs (``train_loss``, ``train_accuracy``,
  ``val_loss`` ...), once, at the step it was computed after, as the session's
  :meth:`~ptutils.session.Session.metric_history` has it.  The values are written
  in double precision, so they read back equal to the recorded ones;
- the learning rate (tag ``lr``) at every epoch end, or with ``every="step"``
  the training loss (tag ``loss``) and the learning rate every
  ``every_n_steps`` training steps;
- the hyperparameters (the config's numbers, strings and bools, flattened to
  dotted names, with ``hparams=`` added) and the metric names, as the HParams
  plugin reads them, in the run itself (``SummaryWriter.add_hparams`` would
  make a second run per call); :meth:`close` adds the session's end status.

A resumed process opens the run with ``purge_step`` = the restored
checkpoint's step + 1: TensorBoard then drops what earlier processes wrote at
the steps run again, so every step shows once.  TensorBoard ignores the first
``SessionLog.START`` of a run, so the first process writes one too (at step 0),
or the first resume would purge nothing.  Before each checkpoint is captured
the writer is flushed (``state_dict``), so what a killed process wrote up to
its checkpoint is on disk and the steps after it are purged and written again.

With ``every="epoch"`` (the default) a training step costs one comparison: no
scalar, no file I/O.  ``every="step"`` reads the loss (a device sync on a GPU)
and queues two scalars every ``every_n_steps`` steps; a background thread
writes them.  Needs the ``tensorboard`` package (``pip install ptutils[tensorboard]``).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("ptutils")

DEFAULT_LOG_DIR = os.path.join("ptutils-runs", "tensorboard")
"""Where runs go without ``log_dir``: beside the default filesystem database (``tensorboard --logdir`` it)."""

__all__ = ["TensorBoard", "flatten_hparams", "DEFAULT_LOG_DIR"]


def flatten_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | str | bool]:
    """Nested config dicts as ``{"model.optimizer.lr": 0.1, ...}``: numbers, strings and bools only."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
    return flat


def _summaries(hparams: Mapping[str, Any], metrics: Iterable[str]) -> tuple[Any, Any]:
    """The HParams plugin's experiment and session-start summaries (bools stay bools, unlike torch's ``hparams()``)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    infos = []
    for name, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value, kind = value, "DATA_TYPE_BOOL"
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value, kind = float(value), "DATA_TYPE_FLOAT64"
        else:
            start.hparams[name].string_value, kind = str(value), "DATA_TYPE_STRING"
        infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(kind)))
    experiment = api_pb2.Experiment(
        time_created_secs=time.time(), hparam_infos=infos,
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in metrics],
    )

    def summary(tag: str, **data: Any) -> Any:
        content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
        return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(content))])

    return (summary(metadata.EXPERIMENT_TAG, experiment=experiment),
            summary(metadata.SESSION_START_INFO_TAG, session_start_info=start))


def _end_summary(status: str) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(status), end_time_secs=time.time())
    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, session_end_info=end)
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG,
                                        metadata=metadata.create_summary_metadata(content))])


def _end_status(session: Any) -> str | None:
    """The HParams status of a session that has ended; None while it can go on (running, paused)."""
    if session.state == "failed":
        return "STATUS_FAILURE"
    if session.state == "complete":
        return "STATUS_SUCCESS" if session.outcome == "success" else "STATUS_FAILURE"
    return None


def _newest_file_second(run_dir: Path) -> int:
    """The newest timestamp in the run's event file names (``events.out.tfevents.<seconds>.<host>.<pid>...``)."""
    newest = 0
    for path in run_dir.glob("events.out.tfevents.*"):
        parts = path.name.split(".")
        if len(parts) > 3 and parts[3].isdigit():
            newest = max(newest, int(parts[3]))
    return newest


class TensorBoard:
    """An update writing the session's metric events, learning rate and hyperparameters to ``log_dir/<session id>``.

    ``every`` is ``"epoch"`` (metric events and the lr at epoch ends) or
    ``"step"`` (also the training loss and the lr every ``every_n_steps``
    steps).  ``hparams`` adds to (or replaces) the config's flattened values;
    ``metrics`` names the metrics the HParams table shows (default: the
    ``{stage}_*`` and evaluation metrics the session will compute).  One
    instance serves one session.  Put it first in ``updates`` so that, on a
    resume that starts at an epoch end, it sees the evaluations of that epoch.
    Call :meth:`close` (or leave it to interpreter exit) when the session ends.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, every: str = "epoch", every_n_steps: int = 1,
                 hparams: Mapping[str, Any] | None = None, metrics: Iterable[str] | None = None,
                 flush_secs: float = 30.0, max_queue: int = 1000):
        if every not in ("epoch", "step"):
            raise ValueError(f"every must be 'epoch' or 'step', got {every!r}")
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        try:
            import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
        except ImportError as exc:
            raise ImportError("the TensorBoard update needs the tensorboard package: "
                              "pip install 'ptutils[tensorboard]'") from exc
        self.log_dir = Path(log_dir if log_dir is not None else DEFAULT_LOG_DIR)
        self.every, self.every_n_steps = every, every_n_steps
        self.extra_hparams = dict(hparams or {})
        self.metric_names = None if metrics is None else list(metrics)
        self.flush_secs, self.max_queue = flush_secs, max_queue
        self.writer: Any = None
        self.purge_step: int | None = None
        """The ``purge_step`` this process opened the run with (None until it is opened)."""
        self._session: Any = None
        self._attempt: int | None = None
        self._last_step = -1
        self._restored: dict[str, Any] | None = None
        self._hparams_written = False
        self._original_log_event: Any = None
        self._finalizer: Any = None

    # ------------------------------------------------------------------ the update
    def __call__(self, session: Any) -> Any:
        if self._session is not session:
            self._attach(session)
        step = session.step
        if session.attempt != self._attempt or step < self._last_step:
            # A restart (new attempt) or a restore in this process (Remedies): the steps from here replace the old.
            self._reopen(session, purge_step=0 if session.attempt != self._attempt else step)
        self._last_step = step
        if session.event == "step":
            if self.every == "step" and step % self.every_n_steps == 0 and session.current_stage.mode == "train":
                loss = session.loss
                if loss is not None:
                    self.writer.add_scalar("loss", float(loss), step, new_style=True, double_precision=True)
                self.writer.add_scalar("lr", float(session.model.lr), step, new_style=True, double_precision=True)
        elif self.every == "epoch" and session.model is not None:
            self.writer.add_scalar("lr", float(session.model.lr), step, new_style=True, double_precision=True)
        return session

    def state_dict(self) -> dict[str, Any]:
        """The step the checkpoint being captured is at; flushes first, so what was written up to it is on disk."""
        if self.writer is not None:
            self.writer.flush()
        step = self._session.step if self._session is not None else 0
        return {"step": step, "hparams": self._hparams_written}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A resume: the run is reopened at the restored step + 1, dropping what was written after it."""
        self._restored = dict(state)
        if self.writer is not None:  # restored in this process (restore_checkpoint(with_updates=True))
            self._hparams_written = bool(state.get("hparams")) or self._hparams_written
            self._reopen(self._session, purge_step=int(state["step"]) + 1)
            self._last_step = int(state["step"])

    def flush(self) -> None:
        """Write what is queued to the event file now."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the run; a session that has ended gets its HParams end status (success, failure)."""
        if self.writer is None:
            return
        session = self._session
        status = _end_status(session) if session is not None else None
        if status is not None:
            self.writer.file_writer.add_summary(_end_summary(status))
        self.writer.close()
        self.writer = None
        if session is not None and session.__dict__.get("log_event") is self._tap:
            del session.log_event
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def run_dir(self) -> Path | None:
        """``log_dir/<session id>`` once a session has called it."""
        return None if self._session is None else self.log_dir / self._session.id

    # ------------------------------------------------------------------ internals
    def _attach(self, session: Any) -> None:
        if self._session is not None:
            raise RuntimeError(f"this TensorBoard update writes session {self._session.id!r}'s run: "
                               f"give session {session.id!r} a TensorBoard of its own")
        self._session = session
        restored = self._restored
        if restored is not None:
            purge = int(restored["step"]) + 1
            self._hparams_written = bool(restored.get("hparams"))
        elif session.step <= 1:
            purge = 0  # a fresh attempt: nothing of an earlier one stays; and the first START is one TensorBoard skips
        else:
            purge = session.step  # resumed from a checkpoint without this update's state: from the step just run
        self._open(session, purge)
        self._original_log_event = session.log_event
        session.log_event = self._tap
        if session.event == "epoch":
            # The first call of this process is an epoch end (a resume from a checkpoint taken before it):
            # the epoch's means were logged before the tap was in place.
            prefix = f"{session.stage}_"
            self._write_metrics(session.step, {k: v for k, v in session.metrics.items() if k.startswith(prefix)})

    def _tap(self, kind: str, **data: Any) -> None:
        self._original_log_event(kind, **data)
        if kind == "metrics" and self.writer is not None:
            self._write_metrics(data.get("step", self._session.step), data.get("metrics") or {})

    def _write_metrics(self, step: int, values: Mapping[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, float(value), step, new_style=True, double_precision=True)

    def _open(self, session: Any, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        run_dir = self.log_dir / session.id
        run_dir.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a run's files in name order, and the name starts with the second it was made:
        # a file of this process must sort after those of the process it resumes.
        while _newest_file_second(run_dir) >= int(time.time()):
            time.sleep(0.05)
        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step, flush_secs=self.flush_secs,
                                    max_queue=self.max_queue)
        self.writer.file_writer  # noqa: B018  (makes the file and writes the purge START now)
        self.purge_step = purge_step
        self._attempt = session.attempt
        if not self._hparams_written:
            exp, start = _summaries(self._hparams(session), self._metrics(session))
            self.writer.file_writer.add_summary(exp)
            self.writer.file_writer.add_summary(start)
            self.writer.flush()
            self._hparams_written = True
        if self._finalizer is None:
            self._finalizer = weakref.finalize(self, TensorBoard._close_at_exit, weakref.ref(self))
            atexit.register(self._finalizer)

    @staticmethod
    def _close_at_exit(ref: weakref.ref) -> None:
        me = ref()
        if me is not None:
            try:
                me.close()
            except Exception as exc:  # at exit: say so, do not raise
                log.warning("TensorBoard: closing %s failed: %s", me.run_dir, exc)

    def _reopen(self, session: Any, purge_step: int) -> None:
        if self.writer is not None:
            self.writer.close()
        if purge_step == 0:
            self._hparams_written = False
        self._open(session, purge_step)

    def _hparams(self, session: Any) -> dict[str, Any]:
        values: dict[str, Any] = {"seed": session.seed}
        if session.config is not None:
            values.update(flatten_hparams(session.config.to_dict()))
        values.update(self.extra_hparams)
        return {k: v for k, v in values.items()
                if isinstance(v, (bool, int, float, str)) and not (isinstance(v, float) and not math.isfinite(v))}

    def _metrics(self, session: Any) -> list[str]:
        if self.metric_names is not None:
            return list(self.metric_names)
        from .update import Evaluate

        model = session.model
        names = list(model.metrics) if model is not None else []
        found: list[str] = []
        for stage in session.stages.values():
            found += [f"{stage.name}_loss"] + (
                [f"{stage.name}_{m}" for m in names] if stage.mode == "eval" or model.train_metrics else [])
        for update in session.updates:
            if isinstance(update, Evaluate):
                found += [f"{update.prefix}_loss"] + [f"{update.prefix}_{m}" for m in names]
        return list(dict.fromkeys(found))
