"""The progress bar update: one bar per stage with its budget, the loss and metrics at epoch ends."""

from __future__ import annotations

import io

from ptutils.progress import Progress
from ptutils.update import Evaluate

from .support.sessionkit import session


def test_progress_shows_each_stage_with_its_budget(tmp_path):
    out = io.StringIO()
    bar = Progress(disable=False, file=out, mininterval=0.0, ascii=True)
    s = session(tmp_path.as_uri(), updates=[Evaluate("val"), bar],
                stages=[{"name": "train", "data": "train", "max_epochs": 2},
                        {"name": "test", "data": "val", "mode": "eval", "max_epochs": 1}],
                transitions=[{"trigger": "stage_done", "source": "train", "dest": "test"}]).run()
    bar.close()
    text = out.getvalue()
    assert s.state == "complete"
    assert "train" in text and "10/10" in text  # 2 epochs x 5 batches
    assert "test" in text and "2/2" in text  # 24 validation samples / 16 per batch
    assert "val_loss" in text and "loss" in text
