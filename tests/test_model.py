"""Model: its state round trip, optimizer state on load, and the LR scheduler's policy."""

from __future__ import annotations

import pytest
import torch

from ptutils.checkpoint import deserialize, serialize

from .support.sessionkit import model, same_weights, session


def test_a_model_loaded_from_a_checkpoint_owns_its_optimizer_state():
    trained = model(seed=1)
    trained.train_step((torch.randn(4, 8), torch.tensor([0, 1, 0, 1])))  # momentum buffers now exist
    state = deserialize(serialize(trained.state_dict()))  # its tensors share the checkpoint's one buffer
    first, second = model(seed=2), model(seed=3)
    first.load_state_dict(state)
    second.load_state_dict(state)
    loaded = [list(m.optimizer.state.values())[0]["momentum_buffer"] for m in (first, second)]
    saved = list(state["optimizer"]["state"].values())[0]["momentum_buffer"]
    assert all(torch.equal(b, saved) for b in loaded)
    loaded[0].add_(1.0)  # the first optimizer's next step
    assert torch.equal(loaded[1], saved) and not torch.equal(loaded[0], saved)


def test_model_state_dict_round_trip():
    a, b = model(seed=1), model(seed=2)
    b.load_state_dict(a.state_dict())
    assert same_weights({k: v for k, v in a.module.state_dict().items()}, b.module.state_dict())


def test_scheduler_steps_every_epoch_by_default(url):
    m = model()
    m.set_scheduler({"cls": "torch.optim.lr_scheduler.StepLR", "step_size": 1, "gamma": 0.5})
    s = session(url, model=m).run()
    assert s.model.lr == pytest.approx(0.1 * 0.5**3)


def test_scheduler_can_step_every_step_or_on_a_metric(url, tmp_path):
    from ptutils.model import Model

    base = model()
    per_step = Model(base.module, base.criterion, {"cls": "torch.optim.SGD", "lr": 0.1},
                     {"cls": "torch.optim.lr_scheduler.StepLR", "step_size": 1, "gamma": 0.9},
                     device="cpu", scheduler_interval="step")
    s = session(url, model=per_step, stages=[{"name": "train", "data": "train", "max_steps": 4}]).run()
    assert s.model.lr == pytest.approx(0.1 * 0.9**4)
    on_metric = Model(model().module, base.criterion, {"cls": "torch.optim.SGD", "lr": 0.1},
                      {"cls": "torch.optim.lr_scheduler.ReduceLROnPlateau", "patience": 0, "factor": 0.5},
                      device="cpu", scheduler_metric="val_loss")
    from ptutils.update import Evaluate

    s = session((tmp_path / "b").as_uri(), model=on_metric, updates=[Evaluate("val")]).run()
    assert s.model.lr <= 0.1  # stepped with val_loss once it existed, never without it


def test_a_per_step_scheduler_on_a_metric_waits_for_it_then_steps_with_it():
    from ptutils.model import Model

    base = model()
    m = Model(base.module, base.criterion, {"cls": "torch.optim.SGD", "lr": 0.1},
              {"cls": "torch.optim.lr_scheduler.ReduceLROnPlateau", "patience": 0, "factor": 0.5},
              device="cpu", scheduler_interval="step", scheduler_metric="val_loss")
    assert m.steps_scheduler_every("step") and not m.steps_scheduler_every("epoch")
    m.step_scheduler({})  # no val_loss yet: ReduceLROnPlateau is not stepped without its value
    assert m.lr == pytest.approx(0.1)
    for _ in range(3):
        m.step_scheduler({"val_loss": 1.0})  # no improvement after the first: halved twice
    assert m.lr == pytest.approx(0.025)


def test_a_session_steps_a_per_step_metric_scheduler_once_the_metric_exists(url):
    from ptutils.model import Model
    from ptutils.update import Evaluate

    base = model()
    m = Model(base.module, base.criterion, {"cls": "torch.optim.SGD", "lr": 0.1},
              {"cls": "torch.optim.lr_scheduler.ReduceLROnPlateau", "patience": 0, "factor": 0.5},
              device="cpu", scheduler_interval="step", scheduler_metric="val_loss")
    s = session(url, model=m, updates=[Evaluate("val")],
                stages=[{"name": "train", "data": "train", "max_epochs": 2}]).run()
    assert s.state == "complete"
    assert s.model.lr < 0.1  # every step of epoch 2 saw the same val_loss: a plateau


def dict_batch_step(m, batch):
    """A step function for dict batches, returning the targets so that metrics can use them."""
    outputs = m.module(batch["features"])
    return m.criterion(outputs, batch["class"]), outputs, batch["class"]


def dict_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"features": torch.randn(4, 8, generator=g), "class": torch.tensor([0, 1, 1, 0])} for _ in range(n)]


def test_a_step_function_returns_the_targets_for_the_metrics():
    from ptutils.model import Model, accuracy

    base = model()
    m = Model(base.module, base.criterion, {"cls": "torch.optim.SGD", "lr": 0.1}, device="cpu",
              step_fn=dict_batch_step, metrics={"accuracy": accuracy})
    batch = dict_batches(1)[0]
    m.train_step(batch)
    assert m.step_metrics.keys() == {"accuracy"} and 0.0 <= float(m.step_metrics["accuracy"]) <= 1.0
    _, values = m.eval_step(batch)
    assert values["accuracy"] == accuracy(m.module(batch["features"]), batch["class"])


def test_a_step_function_without_targets_is_refused_for_metrics_at_the_first_step():
    from ptutils.errors import ConfigError
    from ptutils.model import Model, accuracy

    def no_targets(m, batch):
        loss, outputs, _ = dict_batch_step(m, batch)
        return loss, outputs

    base = model()
    plain = Model(base.module, base.criterion, {"cls": "torch.optim.SGD", "lr": 0.1}, device="cpu", step_fn=no_targets)
    assert plain.train_step(dict_batches(1)[0]).dim() == 0  # without metrics, (loss, outputs) will do
    m = Model(base.module, base.criterion, {"cls": "torch.optim.SGD", "lr": 0.1}, device="cpu",
              step_fn=no_targets, metrics={"accuracy": accuracy})
    with pytest.raises(ConfigError, match=r"'model.metrics': metrics accuracy need targets.*return \(loss, outputs, "
                                          r"targets\)"):
        m.train_step(dict_batches(1)[0])
    with pytest.raises(ConfigError, match="need targets"):
        m.eval_step(dict_batches(1)[0])


def test_train_metrics_can_be_turned_off_to_save_their_per_step_cost():
    from ptutils.model import Model, accuracy

    base = model()
    m = Model(base.module, base.criterion, {"cls": "torch.optim.SGD", "lr": 0.1}, device="cpu",
              metrics={"accuracy": accuracy}, train_metrics=False)
    m.train_step((torch.randn(4, 8), torch.tensor([0, 1, 0, 1])))
    assert m.step_metrics == {}
    assert m.eval_step((torch.randn(4, 8), torch.tensor([0, 1, 0, 1])))[1].keys() == {"accuracy"}
