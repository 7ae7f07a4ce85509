"""The loop's position and exact resume: snapshots, restores, the loader positioned before the RNG."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from ptutils.checkpoint import CheckpointStore, deserialize, serialize
from ptutils.data import DatasetProvider
from ptutils.errors import CheckpointError
from ptutils.position import LoopPosition, capture, restore, resume_from, stages_to_replay
from ptutils.update import Plateau

from .support.sessionkit import model, same_weights


def loader(seed: int = 3):
    data = TensorDataset(torch.arange(40).float().unsqueeze(1), torch.arange(40))
    return DatasetProvider({"d": data}, default={"batch_size": 4, "shuffle": True, "seed": seed}).get_dataloader("d")


def test_a_snapshot_round_trips_and_keeps_only_storable_data_requests():
    pos = LoopPosition("train", attempt=2, step=17, stage_step=7, stage_epoch=1, batch_in_epoch=3,
                       data_override={"dataset": "val"}, eval_count=2, eval_sums={"loss": torch.tensor(1.5)})
    again = LoopPosition("other")
    again.load(pos.snapshot(), rng={"torch": None})
    assert (again.attempt, again.stage, again.step, again.stage_step, again.stage_epoch, again.batch_in_epoch) == (
        2, "train", 17, 7, 1, 3)
    assert again.data_override == {"dataset": "val"} and again.eval_count == 2
    assert torch.equal(again.eval_sums["loss"], torch.tensor(1.5))
    assert again.pending_rng == {"torch": None}
    pos.data_override = lambda session: "computed"  # a callable request is rebuilt by the stage, not stored
    assert pos.snapshot()["data_override"] is None


def test_entering_a_stage_and_a_new_attempt_reset_what_they_should():
    pos = LoopPosition("train", step=10, stage_step=10, stage_epoch=2, batch_in_epoch=1, data_override="x")
    pos.enter_stage("test")
    assert (pos.stage, pos.step, pos.stage_step, pos.stage_epoch, pos.batch_in_epoch, pos.data_override) == (
        "test", 10, 0, 0, 0, None)
    pos.next_attempt("train")
    assert (pos.attempt, pos.stage, pos.step) == (2, "train", 0)


def test_iterate_continues_an_epoch_at_its_batch_with_the_same_order():
    whole = [labels.tolist() for _, labels in LoopPosition("d", stage_epoch=1).iterate(loader(), "s")]
    pos = LoopPosition("d", stage_epoch=1, batch_in_epoch=4)
    rest = [labels.tolist() for _, labels in pos.iterate(loader(), "s")]
    assert rest == whole[4:]


def test_iterate_restores_a_checkpoints_rng_after_positioning_the_loader():
    torch.manual_seed(0)
    pos = LoopPosition("d", batch_in_epoch=2)
    pos.load(pos.snapshot(), rng=_rng_after(lambda: torch.manual_seed(5)))
    torch.manual_seed(123)  # whatever the process did before the resume
    it = pos.iterate(loader(), "s")
    assert pos.pending_rng is None
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))  # the draws after the loader are the checkpoint's
    assert len(list(it)) == 10 - 2


def _rng_after(seed) -> dict:
    from ptutils.checkpoint import rng_state

    seed()
    return rng_state()


def test_capture_and_restore_bring_back_weights_position_and_update_states():
    m, plateau = model(seed=1), Plateau(patience=2)
    plateau(1.0), plateau(2.0)
    pos = LoopPosition("train", step=5)
    state = deserialize(serialize(capture(m, pos, {"val_loss": 0.5}, [plateau, lambda s: s])))  # as a checkpoint holds it
    before = {k: v.clone() for k, v in m.module.state_dict().items()}
    with torch.no_grad():
        for p in m.module.parameters():
            p.add_(1.0)
    m.grad_norm = torch.tensor(3.0)
    fresh_plateau, fresh_pos = Plateau(patience=2), LoopPosition("other")
    metrics = restore(state, m, fresh_pos, [fresh_plateau, None], with_updates=False)
    assert same_weights(before, m.module.state_dict()) and m.grad_norm is None
    assert metrics == {"val_loss": 0.5} and fresh_pos.step == 5
    assert fresh_plateau.state_dict() != plateau.state_dict()  # kept unless asked for
    restore(state, m, fresh_pos, [fresh_plateau, None], with_updates=True)
    assert fresh_plateau.state_dict() == plateau.state_dict()


def test_a_resume_starts_from_the_newest_checkpoint_of_its_attempt(tmp_path):
    from ptutils import open_db

    store = CheckpointStore(open_db(tmp_path.as_uri()), "s1", keep=5)
    with pytest.raises(CheckpointError, match="'s1' is paused but has no usable checkpoint"):
        resume_from(store, 1, "s1")
    m = model()
    for attempt, step in ((1, 4), (1, 8), (2, 2)):
        store.write(serialize(capture(m, LoopPosition("train", attempt=attempt, step=step), {}, [])),
                    attempt=attempt, step=step, stage="train", reason="periodic")
    assert resume_from(store, 1, "s1")[1]["step"] == 8
    assert resume_from(store, 2, "s1")[1]["step"] == 2
    assert resume_from(store, 3, "s1")[1]["attempt"] == 2  # none of its own: the newest of any attempt


@pytest.mark.parametrize(("history", "until", "replayed"), [
    ([], "train", ["train"]),
    (["train", "finetune"], "finetune", ["train", "finetune"]),
    (["a", "b", "a", "c"], "a", ["a", "b", "a"]),
    (["a", "b"], "c", ["a", "b"]),
])
def test_the_setups_replayed_before_a_resume_are_those_of_the_stages_gone_through(history, until, replayed):
    assert stages_to_replay(history, until) == replayed
