"""The README's code runs as written (only the database URL is pointed at a temporary place)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def block(marker: str) -> str:
    """The one README Python block that contains ``marker``."""
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"{len(found)} README blocks contain {marker!r}"
    return found[0]


QUICKSTART = block("except Interrupted as exc:")
STORAGE = block('open_db("mongodb://')
DATA = block("HDF5Reader(")
SUITE = block("BackendSuite")
RESUMING = block("Session.resume(cfg.db")
FINDING = block('keep_best="val_loss", db=db')
METRICS = block("trained.metric_history(")
TUNING = block("Tuning(config, pbt")
TFUTILS = block("train_from_params(**params)")


def run_block(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_quickstart_runs_and_moves_through_both_stages(tmp_path):
    code = QUICKSTART.replace("file:///tmp/ptutils-runs", tmp_path.as_uri())
    ns = run_block(code)
    session = ns["session"]
    assert session.state == "complete"
    assert [h["stage"] for h in session.record["stage_history"]] == ["train", "test"]
    assert session.metrics["test_accuracy"] > 0.9
    assert torch.equal(ns["linear"].weight, session.model.module.weight.cpu())  # Session.load: the final weights
    assert ns["view"].id == session.id and ns["view"].state == "complete"        # the listing's newest session


def test_storage_example_round_trips(db_url):
    code = STORAGE.replace('"mongodb://127.0.0.1:27017/experiments/results"', repr(db_url))
    ns = run_block(code)
    db = ns["db"]
    assert db.count() == 0  # the example deletes what it saved


def test_storage_example_values(tmp_path):
    code = STORAGE.replace('"mongodb://127.0.0.1:27017/experiments/results"', repr(tmp_path.as_uri()))
    code = code.replace("db.delete(doc_id)", "").replace('db.delete({"name": "sweep"})', "")
    ns = run_block(code)
    doc = ns["db"].load_from_id(ns["doc_id"])
    assert doc["epochs"] == 1 and doc["history"] == [0.9]
    assert [(d["_id"], d["lr"]) for d in ns["db"].load({"name": "sweep"}, sort=[("lr", -1)])] == list(zip(ns["sweep"], [0.1, 0.01]))
    assert isinstance(doc["results"][0], np.ndarray) and isinstance(doc["results"][1], torch.Tensor)


def test_data_example_reads_batches_from_hdf5(tmp_path):
    code = DATA.replace("/tmp/ptutils-data.h5", str(tmp_path / "data.h5"))
    ns = run_block(code)
    assert ns["images"].dtype == torch.uint8 and tuple(ns["images"].shape) == (256, 3, 32, 32)
    assert ns["labels"].dtype == torch.int64 and tuple(ns["labels"].shape) == (256,)


def test_the_conformance_suite_example_runs_the_shipped_suite(tmp_path):
    # The README's test module, pointed at SQLite instead of the imaginary vault:// backend.
    module = tmp_path / "test_readme_backend.py"
    module.write_text(SUITE.replace('"vault://127.0.0.1/test"', repr(f"sqlite:///{tmp_path / 'suite.db'}")))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "round_trip or query", str(module)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 10 and "failed" not in result.stdout


def test_resuming_refuses_a_typo_and_an_edited_config_and_applies_overrides(tmp_path, capsys):
    ns = run_block(RESUMING.replace("file:///tmp/ptutils-resume", tmp_path.as_uri()))
    session, out = ns["session"], capsys.readouterr().out
    assert "no session with id" in out and "did you mean" in out
    assert "stages[0].max_epochs: 2 -> 4" in out
    assert (session.state, session.step, session.model.lr) == ("complete", 32, 0.01)
    assert session.record["config_changes"][0]["step"] == 12


def test_finding_lists_sessions_and_gives_the_weights_back(tmp_path):
    ns = run_block(FINDING.replace("file:///tmp/ptutils-finding", tmp_path.as_uri()))
    session = ns["session"]
    assert ns["view"].id == session.id and ns["view"].state == "complete" and ns["dead"] == []
    assert torch.equal(ns["module"].weight, session.model.module.weight)
    assert set(ns["best"]) == {"weight", "bias"}


def test_metrics_are_recorded_per_epoch_and_a_misspelled_request_is_refused_early(tmp_path, capsys):
    ns = run_block(METRICS.replace("file:///tmp/ptutils-metrics", tmp_path.as_uri()))
    trained = ns["trained"]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(trained.metrics)
    assert [p.epoch for p in trained.metric_history("train_loss")] == [1, 2, 3]
    assert "config field 'updates[0]': no dataset 'vall'; known: train, val" in capsys.readouterr().out


def test_tuning_runs_a_population_on_the_pool_and_finds_a_good_child(tmp_path):
    code = TUNING.replace("file:///tmp/ptutils-tuning", tmp_path.as_uri())
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, "README.md", "exec"), namespace)
    tuning = namespace["tuning"]
    assert tuning.session.state == "complete"
    assert [p["state"] for p in tuning.population()] == ["complete"] * 4
    assert tuning.best()["score"] > 0.8
    assert tuning.lineage(tuning.best()["child"])[0]["from_t"] == 0
    assert any(r["action"] == "exploit" for r in tuning.rows())


def test_a_tfutils_params_dict_trains_writes_its_records_and_validates(tmp_path, capsys):
    code = TFUTILS.replace("file:///tmp/ptutils-tfutils", tmp_path.as_uri())
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), namespace)
    count, filters, summary = capsys.readouterr().out.strip().splitlines()[-3:]
    assert (count, filters) == ("9", "[0, 40, 80]")  # the README's comments
    assert namespace["summary"][0]["val"]["top1"] > 0.9
