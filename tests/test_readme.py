"""The README's code runs as written (only the database URL is pointed at a temporary place)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def run_block(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_quickstart_runs_and_moves_through_both_stages(tmp_path):
    code = BLOCKS[0].replace("file:///tmp/ptutils-runs", tmp_path.as_uri())
    ns = run_block(code)
    session = ns["session"]
    assert session.state == "complete"
    assert [h["stage"] for h in session.record["stage_history"]] == ["train", "test"]
    assert session.metrics["test_accuracy"] > 0.9


def test_storage_example_round_trips(db_url):
    code = BLOCKS[1].replace('"mongodb://127.0.0.1:27017/experiments/results"', repr(db_url))
    ns = run_block(code)
    db = ns["db"]
    assert db.count() == 0  # the example deletes what it saved


def test_storage_example_values(tmp_path):
    code = BLOCKS[1].replace('"mongodb://127.0.0.1:27017/experiments/results"', repr(tmp_path.as_uri()))
    code = code.replace("db.delete(doc_id)", "").replace('db.delete({"name": "sweep"})', "")
    ns = run_block(code)
    doc = ns["db"].load_from_id(ns["doc_id"])
    assert doc["epochs"] == 1 and doc["history"] == [0.9]
    assert [(d["_id"], d["lr"]) for d in ns["db"].load({"name": "sweep"}, sort=[("lr", -1)])] == list(zip(ns["sweep"], [0.1, 0.01]))
    assert isinstance(doc["results"][0], np.ndarray) and isinstance(doc["results"][1], torch.Tensor)


def test_data_example_reads_batches_from_hdf5(tmp_path):
    code = BLOCKS[2].replace("/tmp/ptutils-data.h5", str(tmp_path / "data.h5"))
    ns = run_block(code)
    assert ns["images"].dtype == torch.uint8 and tuple(ns["images"].shape) == (256, 3, 32, 32)
    assert ns["labels"].dtype == torch.int64 and tuple(ns["labels"].shape) == (256,)
