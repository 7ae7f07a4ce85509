"""The TensorBoard update, checked by reading its event files back with TensorBoard's own reader."""

from __future__ import annotations

import copy
import time

import pytest

pytest.importorskip("tensorboard")

from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from ptutils.session import Session  # noqa: E402
from ptutils.tensorboard import TensorBoard, flatten_hparams  # noqa: E402

from .support import crashkit, tbkit  # noqa: E402
from .test_config import BASE  # noqa: E402

TOTAL_STEPS = crashkit.STEPS_PER_EPOCH * crashkit.EPOCHS
METRICS = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]


def finished(tmp_path, name: str, every: str = "epoch"):
    s, tb = tbkit.build((tmp_path / name / "db").as_uri(), None, str(tmp_path / name / "tb"), every=every)
    s.run()
    tb.close()
    return s, tb


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's scalars (every="step") and metric history."""
    tmp = tmp_path_factory.mktemp("tb-reference")
    s, tb = finished(tmp, "ref", every="step")
    assert s.state == "complete" and s.step == TOTAL_STEPS
    return tbkit.read_scalars(tb.run_dir), tbkit.history(s)


# ---------------------------------------------------------------------- one process
def test_scalars_read_back_equal_the_metric_history_step_for_step(tmp_path):
    s, tb = finished(tmp_path, "a")
    scalars, hist = tbkit.read_scalars(tb.run_dir), tbkit.history(s)
    assert sorted(hist) == sorted(METRICS)
    for name in METRICS:
        assert scalars[name] == hist[name]  # exact: written in double precision
        assert [step for step, _ in scalars[name]] == [5, 10, 15, 20]
    assert [step for step, _ in scalars["lr"]] == [5, 10, 15, 20]  # every="epoch": the lr at epoch ends, no step loss
    assert "loss" not in scalars


def test_every_step_adds_the_training_loss_and_lr_at_every_step(tmp_path, reference):
    scalars, hist = reference
    assert [step for step, _ in scalars["loss"]] == list(range(1, TOTAL_STEPS + 1))
    assert [step for step, _ in scalars["lr"]] == list(range(1, TOTAL_STEPS + 1))
    assert all(value == pytest.approx(0.1) for _, value in scalars["lr"])
    for name in METRICS:
        assert scalars[name] == hist[name]


def test_every_epoch_writes_nothing_at_training_steps(tmp_path):
    """The per-step path does no work beyond a comparison: scalars are queued only for metric events and epoch ends."""
    s, tb = tbkit.build((tmp_path / "db").as_uri(), None, str(tmp_path / "tb"))
    queued = []

    def count(session):
        if tb.writer is not None and not hasattr(tb.writer, "_counted"):
            original = tb.writer.add_scalar

            def add_scalar(tag, *a, **k):
                queued.append((tag, session.step))
                return original(tag, *a, **k)
            tb.writer.add_scalar, tb.writer._counted = add_scalar, True
        return session

    s.updates.insert(1, count)
    s.run()
    tb.close()
    epoch_ends = [5 * e for e in range(1, crashkit.EPOCHS + 1)]
    assert sorted({step for _, step in queued}) == epoch_ends
    assert len(queued) == crashkit.EPOCHS * (len(METRICS) + 1)


def test_hparams_are_in_the_run_itself_one_run_per_session(tmp_path):
    cfg = copy.deepcopy(BASE)
    cfg["metadata"] = {"note": "x"}
    log_dir = tmp_path / "tb"
    tb = TensorBoard(log_dir, hparams={"nesterov": True, "tag": "baseline"})
    s = Session.from_config(cfg, db=(tmp_path / "db").as_uri(), updates=[tb]).run()
    tb.close()
    assert tbkit.runs(log_dir) == [s.id]  # no timestamped sub-run, as SummaryWriter.add_hparams makes
    assert [p.name for p in log_dir.iterdir()] == [s.id]
    hp = tbkit.read_hparams(log_dir / s.id)
    assert hp["hparams"]["model.optimizer.lr"] == pytest.approx(0.1)
    assert hp["hparams"]["seed"] == 3
    assert hp["hparams"]["model.module.cls"] == "torch.nn.Linear"
    assert hp["hparams"]["nesterov"] is True and hp["types"]["nesterov"] == "DATA_TYPE_BOOL"  # not a number
    assert hp["hparams"]["tag"] == "baseline"
    assert "stages" not in hp["hparams"]  # lists are not hparams
    assert hp["metrics"] == ["train_loss"]  # Linear model, no metrics: the one the session computes
    assert hp["status"] == "STATUS_SUCCESS"
    assert set(tbkit.read_scalars(log_dir / s.id)) == {"train_loss", "lr"}


def test_a_built_from_config_update_writes_to_its_log_dir(tmp_path):
    cfg = copy.deepcopy(BASE)
    cfg["updates"] = [{"cls": "ptutils.tensorboard.TensorBoard", "log_dir": str(tmp_path / "tb")}]
    s = Session.from_config(cfg, db=(tmp_path / "db").as_uri()).run()
    s.updates[0].close()
    assert tbkit.read_scalars(tmp_path / "tb" / s.id)["train_loss"] == tbkit.history(s)["train_loss"]


def test_two_sessions_are_two_runs(tmp_path):
    log_dir = tmp_path / "tb"
    ids = []
    for seed in (0, 1):
        s, tb = tbkit.build((tmp_path / "db").as_uri(), None, str(log_dir))
        s.seed = seed
        s.run()
        tb.close()
        ids.append(s.id)
        assert tbkit.read_scalars(tb.run_dir)["train_loss"] == tbkit.history(s)["train_loss"]
    assert tbkit.runs(log_dir) == sorted(ids)


def test_one_update_serves_one_session(tmp_path):
    tb = TensorBoard(tmp_path / "tb")
    crashkit.build((tmp_path / "db").as_uri(), updates=[tb]).run()
    with pytest.raises(RuntimeError, match="a TensorBoard of its own"):
        crashkit.build((tmp_path / "db").as_uri(), updates=[tb]).run()
    tb.close()


def test_a_failed_session_ends_with_status_failure(tmp_path):
    def explode(session):
        if session.step == 7:
            raise ValueError("boom")
        return session

    s, tb = tbkit.build((tmp_path / "db").as_uri(), None, str(tmp_path / "tb"), extra=[explode])
    with pytest.raises(ValueError):
        s.run()
    tb.close()
    assert tbkit.read_hparams(tb.run_dir)["status"] == "STATUS_FAILURE"
    assert tbkit.read_scalars(tb.run_dir)["train_loss"] == tbkit.history(s)["train_loss"]


def test_pause_and_resume_in_one_process_show_each_step_once(tmp_path, reference):
    s, tb = tbkit.build((tmp_path / "db").as_uri(), None, str(tmp_path / "tb"), every="step")
    s.run(until_step=7)
    s.run(until_step=13)
    s.run()
    tb.close()
    assert tbkit.read_scalars(tb.run_dir) == reference[0]


def test_a_restart_replaces_the_earlier_attempts_curves(tmp_path, reference):
    s, tb = tbkit.build((tmp_path / "db").as_uri(), None, str(tmp_path / "tb"), every="step")
    s.run()
    s.restart()
    s.run()
    tb.close()
    assert s.attempt == 2
    assert tbkit.read_scalars(tb.run_dir) == reference[0]


def test_flatten_hparams_keeps_numbers_strings_bools():
    assert flatten_hparams({"a": {"b": 1, "c": [1, 2], "d": {"e": True}}, "f": "x", "g": None, "h": 0.5}) == {
        "a.b": 1, "a.d.e": True, "f": "x", "h": 0.5}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="every"):
        TensorBoard(every="batch")
    with pytest.raises(ValueError, match="every_n_steps"):
        TensorBoard(every_n_steps=0)


# ---------------------------------------------------------------------- TensorBoard's purge semantics
def _write(run_dir, purge_step, steps, value):
    w = SummaryWriter(str(run_dir), purge_step=purge_step)
    for step in steps:
        w.add_scalar("x", value, step, new_style=True, double_precision=True)
    w.close()
    time.sleep(1.05)  # the next file's name (its second) sorts after this one's


def test_purge_step_keeps_the_steps_below_it_and_drops_from_it_on():
    """What purge_step=T means to TensorBoard's reader: earlier files keep steps < T; T itself is dropped."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        _write(d, 0, range(1, 9), 1.0)  # a first process, killed after step 8
        _write(d, 6, range(6, 11), 2.0)  # resumed from the checkpoint at step 5: purge_step = 5 + 1
        assert tbkit.read_scalars(d)["x"] == [(s, 1.0) for s in range(1, 6)] + [(s, 2.0) for s in range(6, 11)]
    with tempfile.TemporaryDirectory() as d:
        _write(d, 0, range(1, 9), 1.0)
        _write(d, 5, range(6, 11), 2.0)  # purge_step = the checkpoint's step: its own point is lost
        assert [s for s, _ in tbkit.read_scalars(d)["x"]] == [1, 2, 3, 4] + list(range(6, 11))


def test_the_first_start_of_a_run_purges_nothing():
    """TensorBoard skips a run's first SessionLog.START: a first process writing none makes the first resume purge nothing."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        _write(d, None, range(1, 9), 1.0)  # a plain SummaryWriter: no START
        _write(d, 6, range(6, 11), 2.0)
        steps = [s for s, _ in tbkit.read_scalars(d)["x"]]
        assert steps != sorted(set(steps))  # steps 6, 7, 8 twice


# ---------------------------------------------------------------------- across processes: kill -9 and resume
@pytest.mark.parametrize("kill_at, options", [
    (8, []),  # checkpoint at 6: steps 7, 8 purged and run again
    (11, ["--no-epoch-checkpoints"]),  # checkpoint at 9: epoch 2's metrics (step 10) were written, then purged
    (14, []),  # checkpoint at 12, mid-epoch 3
])
def test_sigkill_mid_epoch_then_resume_shows_every_step_once(tmp_path, reference, kill_at, options):
    url, log_dir = (tmp_path / "db").as_uri(), str(tmp_path / "tb")
    killed = tbkit.run_child(url, "victim", log_dir, "--every", "step", "--kill-at-step", str(kill_at),
                             "--flush-before-kill", *options)
    assert killed.returncode == -9, killed.stderr
    before = tbkit.read_scalars(tmp_path / "tb" / "victim")
    assert max(step for step, _ in before["loss"]) == kill_at  # the dead process's steps past its checkpoint are on disk
    resumed = tbkit.run_child(url, "victim", log_dir, "--every", "step", *options)
    assert resumed.returncode == 0, resumed.stderr
    assert f"state=complete step={TOTAL_STEPS}" in resumed.stdout
    scalars = tbkit.read_scalars(tmp_path / "tb" / "victim")
    ref_scalars, ref_history = reference
    for tag, points in scalars.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: a step shows twice: {steps}"
    assert scalars == ref_scalars  # value for value, step for step, as the uninterrupted run
    s = crashkit.build(url, "victim")
    assert tbkit.history(s) == ref_history
    assert {name: scalars[name] for name in METRICS} == tbkit.history(s)
    assert tbkit.runs(log_dir) == ["victim"]
    hp = tbkit.read_hparams(tmp_path / "tb" / "victim")
    assert hp["status"] == "STATUS_SUCCESS" and sorted(hp["metrics"]) == sorted(METRICS)
    s.close()


def test_sigkill_with_every_epoch_then_resume(tmp_path):
    url, log_dir = (tmp_path / "db").as_uri(), str(tmp_path / "tb")
    assert tbkit.run_child(url, "v", log_dir, "--kill-at-step", "12", "--flush-before-kill").returncode == -9
    assert tbkit.run_child(url, "v", log_dir).returncode == 0
    ref, ref_tb = finished(tmp_path, "ref")
    assert tbkit.read_scalars(tmp_path / "tb" / "v") == tbkit.read_scalars(ref_tb.run_dir)
