"""Config: validation names the field path, round trips, TOML, and same config -> same run."""

from __future__ import annotations

import re

import attrs
import pytest
import torch

from ptutils.config import Config, build, import_object
from ptutils.errors import ConfigError, SessionError
from ptutils.model import Model, accuracy
from ptutils.session import Session

BASE = {
    "name": "cfg",
    "seed": 3,
    "model": {
        "module": {"cls": "torch.nn.Linear", "in_features": 8, "out_features": 2},
        "criterion": {"cls": "torch.nn.CrossEntropyLoss"},
        "optimizer": {"cls": "torch.optim.SGD", "lr": 0.1},
        "device": "cpu",
    },
    "data": {"cls": "tests.support.sessionkit.provider"},
    "stages": [{"name": "train", "data": "train", "max_epochs": 2}],
    "checkpoint": {"every_epochs": 1, "keep": 2},
}


def with_change(path: str, value):
    import copy

    cfg = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    cur = cfg
    for p in parents:
        cur = cur[int(p)] if isinstance(cur, list) else cur[p]
    cur[last] = value
    return cfg


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("seed", "three", "seed"),
        ("name", 5, "name"),
        ("status_interval", -1.0, "status_interval"),
        ("checkpoint.keep", 0, "checkpoint.keep"),
        ("checkpoint.every_steps", "often", "checkpoint.every_steps"),
        ("checkpoint.keep_best", 3, "checkpoint.keep_best"),
        ("checkpoint.best_mode", "lowest", "checkpoint.best_mode"),
        ("model.device", 0, "model.device"),
        ("model.optimizer", {"lr": 0.1}, "model.optimizer"),
        ("model.grad_clip", True, "model.grad_clip"),
        ("stages.0.max_epochs", "x", "stages[0].max_epochs"),
        ("stages.0.mode", "training", "stages[0].mode"),
        ("stages.0.colour", "red", "stages[0].colour"),
        ("model.optimiser", {"cls": "torch.optim.SGD"}, "model.optimiser"),
        ("learning_rate", 0.1, "learning_rate"),
    ],
)
def test_validation_error_names_the_field_path(path, value, field):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(with_change(path, value))
    assert err.value.field == field
    assert repr(field) in str(err.value)


def test_missing_required_field():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"name": "x"})
    assert err.value.field == "model"


def test_spec_kwargs_are_checked_against_the_signature_when_built():
    params = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ConfigError) as err:
        build({"cls": "torch.optim.SGD", "lr": "fast"}, "model.optimizer", params)
    assert err.value.field == "model.optimizer.lr"
    with pytest.raises(ConfigError) as err:
        build({"cls": "torch.optim.SGD", "lr": 0.1, "momentun": 0.9}, "model.optimizer", params)
    assert err.value.field == "model.optimizer.momentun"


def test_import_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.module.cls"):
        build({"cls": "torch.nn.NoSuchLayer"}, "model.module")
    with pytest.raises(ConfigError, match="cannot import module"):
        import_object("no_such_package.Thing", "data.cls")


def test_round_trip_through_dict_and_toml(tmp_path):
    cfg = Config.from_dict(BASE)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.rebuildable
    toml = tmp_path / "exp.toml"
    toml.write_text(
        'name = "cfg"\nseed = 3\n\n[model]\ndevice = "cpu"\n'
        '[model.module]\ncls = "torch.nn.Linear"\nin_features = 8\nout_features = 2\n'
        '[model.criterion]\ncls = "torch.nn.CrossEntropyLoss"\n'
        '[model.optimizer]\ncls = "torch.optim.SGD"\nlr = 0.1\n'
        '[data]\ncls = "tests.support.sessionkit.provider"\n'
        '[checkpoint]\nevery_epochs = 1\nkeep = 2\n'
        '[[stages]]\nname = "train"\ndata = "train"\nmax_epochs = 2\n'
    )
    assert Config.from_toml(toml) == cfg


def test_invalid_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        Config.from_toml(bad)


def test_python_objects_are_allowed_and_recorded_by_type():
    cfg = Config.from_dict(with_change("model.module", torch.nn.Linear(8, 2)))
    described = cfg.to_dict()["model"]["module"]
    assert described["object"] == "torch.nn.modules.linear.Linear"
    assert not cfg.rebuildable


def test_same_config_and_seed_give_the_same_run(tmp_path):
    a = Session.from_config(BASE, db=(tmp_path / "a").as_uri()).run()
    b = Session.from_config(BASE, db=(tmp_path / "b").as_uri()).run()
    assert a.state == b.state == "complete"
    for key, value in a.model.module.state_dict().items():
        assert torch.equal(value, b.model.module.state_dict()[key])
    assert a.record["config"] == Config.from_dict(BASE).to_dict()


def test_session_from_config_rebuilds_from_the_stored_record(tmp_path):
    url = (tmp_path / "db").as_uri()
    first = Session.from_config(BASE, db=url)
    stored = first.record["config"]
    again = Session.from_config(stored, db=url, session_id=first.id)
    assert again.id == first.id and again.state == "pending"


def test_metrics_are_specs_in_the_config(tmp_path):
    toml = tmp_path / "exp.toml"
    toml.write_text(
        '[model.module]\ncls = "torch.nn.Linear"\nin_features = 8\nout_features = 2\n'
        '[model.optimizer]\ncls = "torch.optim.SGD"\nlr = 0.1\n'
        '[model.metrics]\naccuracy = "ptutils.model.accuracy"\n'
        'top = { cls = "tests.test_config.correct_above", threshold = 0.5 }\n'
        '[data]\ncls = "tests.support.sessionkit.provider"\n'
    )
    cfg = Config.from_toml(toml)
    assert Config.from_dict(cfg.to_dict()) == cfg
    s = Session.from_config(cfg, db=(tmp_path / "db").as_uri())
    assert s.model.metrics["accuracy"] is accuracy
    values = s.evaluate("val")
    assert set(values) == {"val_loss", "val_accuracy", "val_top"} and 0 <= values["val_top"] <= 1


def correct_above(outputs: torch.Tensor, targets: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """A metric with an option: the fraction of rows whose target class gets a probability above ``threshold``."""
    return (outputs.softmax(-1).gather(1, targets[:, None]) > threshold).float().mean()


@pytest.mark.parametrize(
    "metric, field",
    [
        ("ptutils.model.no_such_metric", "model.metrics.acc"),
        (5, "model.metrics.acc"),
        ({"threshold": 0.5}, "model.metrics.acc"),
        ({"cls": "tests.test_config.correct_above", "limit": 1}, "model.metrics.acc.limit"),
    ],
)
def test_a_bad_metric_spec_names_its_field(metric, field):
    with pytest.raises(ConfigError) as err:
        Model.from_config(Config.from_dict(with_change("model.metrics", {"acc": metric})).model)
    assert err.value.field == field


def test_overrides_vary_fields_by_dotted_path(tmp_path):
    s = Session.from_config(BASE, db=(tmp_path / "db").as_uri(),
                            overrides={"model.optimizer.lr": 0.3, "stages.train.max_epochs": 5})
    assert s.model.lr == 0.3 and s.current_stage.max_epochs == 5
    stored = s.record["config"]
    assert stored["model"]["optimizer"]["lr"] == 0.3 and stored["stages"][0]["max_epochs"] == 5
    assert BASE["model"]["optimizer"]["lr"] == 0.1  # the config given is not changed
    cfg = Config.from_dict(BASE)
    assert cfg.with_overrides({"stages[0].max_epochs": 5}) == cfg.with_overrides({"stages.0.max_epochs": 5})
    provider = AttrsProvider()
    assert Config.from_dict({**BASE, "data": provider}).with_overrides({"seed": 4}).data is provider


@attrs.define
class AttrsProvider:
    """A Python object as a config part (an attrs class, like the config's own parts): kept as it is."""

    batch_size: int = 16


@pytest.mark.parametrize(
    "overrides, field, message",
    [
        ({"model.optimiser.lr": 0.3}, "model.optimiser.lr", "model has no field 'optimiser'"),
        ({"model.optimizer.lr": "fast"}, "model.optimizer.lr", "expected float"),
        ({"model.optimizer.lrate": 0.3}, "model.optimizer.lrate", "unknown argument of SGD"),
        ({"model.scheduler.step_size": 2}, "model.scheduler.step_size", "model.scheduler is not set"),
        ({"stages.test.max_epochs": 1}, "stages.test.max_epochs", "no entry named 'test'"),
        ({"stages[1].max_epochs": 1}, "stages[1].max_epochs", "has 1 entries"),
        ({"stages.train.max_epochs": 0}, "stages[0].max_epochs", "from overrides['stages.train.max_epochs']"),
        ({"seed.value": 1}, "seed.value", "not a table"),
    ],
)
def test_a_bad_override_names_its_path(tmp_path, overrides, field, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        Session.from_config(BASE, db=(tmp_path / "db").as_uri(), overrides=overrides)
    assert err.value.field == field
    assert not (tmp_path / "db").exists()  # refused before anything is stored


@pytest.mark.parametrize("keyword, path", [("lr", "model.optimizer.lr"), ("metrics", "model.metrics"),
                                           ("max_epochs", "stages[0].max_epochs")])
def test_a_keyword_that_is_no_session_argument_points_to_overrides(tmp_path, keyword, path):
    with pytest.raises(SessionError) as err:
        Session.from_config(BASE, db=(tmp_path / "db").as_uri(), **{keyword: 1})
    assert f"unexpected keyword {keyword!r}" in str(err.value) and f"overrides={{{path!r}: ...}}" in str(err.value)
