"""Search spaces: sampling within bounds, Ray-style perturbation, storage round trips and path checks."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from ptutils.config import Config
from ptutils.errors import ConfigError
from ptutils.spaces import (
    Choice,
    Grid,
    IntUniform,
    LogUniform,
    SearchSpace,
    Uniform,
    space_from_dict,
)

ALL = [Uniform(-1.0, 2.0), LogUniform(1e-4, 1.0), IntUniform(1, 5), IntUniform(1, 1000, log=True),
       Choice(["sgd", "adam", "rmsprop"]), Grid([1, 2, 4])]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def tiny_config() -> Config:
    return Config.from_dict({
        "model": {"module": {"cls": "torch.nn.Linear", "in_features": 4, "out_features": 2},
                  "optimizer": {"cls": "torch.optim.SGD", "lr": 0.1}},
        "stages": [{"name": "train", "data": "train", "max_epochs": 1}],
    })


@pytest.mark.parametrize("space", ALL, ids=repr)
def test_samples_stay_inside_the_space(space):
    r = rng()
    draws = [space.sample(r) for _ in range(2000)]
    assert all(space.contains(v) for v in draws)


def test_int_uniform_includes_high_and_returns_ints():
    draws = {IntUniform(1, 3).sample(rng(s)) for s in range(200)}
    assert draws == {1, 2, 3} and all(type(v) is int for v in draws)


def test_log_uniform_spreads_over_decades():
    r = rng()
    draws = np.array([LogUniform(1e-4, 1.0).sample(r) for _ in range(4000)])
    assert 0.45 < np.mean(draws < 1e-2) < 0.55  # two of the four decades lie below 1e-2


@pytest.mark.parametrize("space", ALL, ids=repr)
def test_same_seed_same_draws(space):
    a, b, c = rng(7), rng(7), rng(8)
    first = [space.sample(a) for _ in range(20)]
    assert first == [space.sample(b) for _ in range(20)]
    assert first != [space.sample(c) for _ in range(20)]


def test_perturb_multiplies_by_a_factor():
    seen = {Uniform(0.0, 10.0).perturb(1.0, rng(s), resample_probability=0) for s in range(50)}
    assert seen == {(1.2, "* 1.2"), (0.8, "* 0.8")}


def test_perturb_keeps_ints_ints_rounding_half_up():
    seen = {IntUniform(1, 100).perturb(10, rng(s), resample_probability=0) for s in range(50)}
    assert seen == {(12, "* 1.2"), (8, "* 0.8")}
    value, _ = IntUniform(1, 100).perturb(5, rng(0), factors=(1.5,), resample_probability=0)
    assert value == 8 and type(value) is int  # 7.5 rounds up


def test_perturb_clips_at_the_bounds_and_says_so():
    value, op = Uniform(0.0, 1.0).perturb(0.9, rng(), factors=(1.2,), resample_probability=0)
    assert (value, op) == (1.0, "* 1.2 (clipped)")
    value, op = IntUniform(2, 10).perturb(2, rng(), factors=(0.4,), resample_probability=0)
    assert (value, op) == (2, "* 0.4 (clipped)")
    value, op = LogUniform(1e-3, 1.0).perturb(0.9, rng(), factors=(1.2,), resample_probability=0, clip=False)
    assert (value, op) == (pytest.approx(1.08), "* 1.2")  # Ray's behaviour: bounds ignored


def test_categorical_shifts_to_a_neighbour_and_is_a_noop_at_the_ends():
    space = Choice([10, 20, 40])
    middle = {space.perturb(20, rng(s), resample_probability=0) for s in range(50)}
    assert middle == {(10, "shift left"), (40, "shift right")}
    left_end = {space.perturb(10, rng(s), resample_probability=0) for s in range(50)}
    assert left_end == {(10, "shift left (noop)"), (20, "shift right")}
    right_end = {Grid([10, 20, 40]).perturb(40, rng(s), resample_probability=0) for s in range(50)}
    assert right_end == {(20, "shift left"), (40, "shift right (noop)")}


def test_categorical_value_not_listed_is_resampled():
    value, op = Choice(["a", "b"]).perturb("c", rng(), resample_probability=0)
    assert op == "resample" and value in ("a", "b")
    assert Choice([0, 1]).perturb(True, rng(), resample_probability=0)[1] == "resample"  # True is not 1 here


def test_resample_probability_one_always_resamples():
    for space in ALL:
        value, op = space.perturb(space.sample(rng(1)), rng(2), resample_probability=1.0)
        assert op == "resample" and space.contains(value)


def test_perturb_draws_the_coin_first_then_the_factor():
    space, ops = Uniform(0.0, 10.0), set()
    for seed in range(20):
        r = rng(seed)
        if r.random() < 0.25:
            expected = (space.sample(r), "resample")
        else:
            factor = (1.2, 0.8)[int(r.integers(2))]
            expected = (factor, f"* {factor}")
        ops.add(expected[1])
        assert space.perturb(1.0, rng(seed)) == expected
    assert ops == {"resample", "* 1.2", "* 0.8"}


@pytest.mark.parametrize("space", ALL, ids=repr)
def test_to_dict_round_trip(space):
    assert space_from_dict(space.to_dict()) == space
    assert space_from_dict(space.to_dict()).to_dict() == space.to_dict()


def test_to_dict_layout():
    assert LogUniform(1e-4, 1.0).to_dict() == {"type": "log_uniform", "low": 1e-4, "high": 1.0}
    assert IntUniform(1, 8, log=True).to_dict() == {"type": "int_uniform", "low": 1, "high": 8, "log": True}
    assert Choice(["a", "b"]).to_dict() == {"type": "choice", "values": ["a", "b"]}


@pytest.mark.parametrize("make", [
    lambda: Uniform(1.0, 1.0), lambda: Uniform(2.0, 1.0), lambda: Uniform(0.0, float("inf")),
    lambda: Uniform("0", 1), lambda: LogUniform(0.0, 1.0), lambda: IntUniform(1.5, 3),
    lambda: IntUniform(0, 4, log=True), lambda: Choice([]), lambda: Choice([1, 1]), lambda: Choice([object()]),
    lambda: Grid("abc"),
])
def test_bad_constructor_arguments_raise_config_error(make):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == "space"


def test_space_from_dict_names_an_unknown_type():
    with pytest.raises(ConfigError, match="'normal'"):
        space_from_dict({"type": "normal", "mean": 0})
    with pytest.raises(ConfigError, match="no argument"):
        space_from_dict({"type": "uniform", "low": 0, "high": 1, "q": 0.1})


def test_search_space_is_an_ordered_immutable_mapping():
    space = SearchSpace({"b": [1, 2], "a": Uniform(0.0, 1.0), "model": {"optimizer": {"lr": LogUniform(1e-3, 1.0)}}})
    assert list(space) == ["a", "b", "model.optimizer.lr"]
    assert space["b"] == Choice([1, 2])
    with pytest.raises(TypeError):
        space["c"] = Choice([1])  # type: ignore[index]
    assert SearchSpace.from_dict(space.to_dict()) == space


def test_search_space_names_the_path_of_a_bad_entry():
    with pytest.raises(ConfigError) as info:
        SearchSpace({"model.optimizer.lr": {"type": "uniform", "low": 1, "high": 0}})
    assert info.value.field == "model.optimizer.lr"
    with pytest.raises(ConfigError, match="callable") as info:
        SearchSpace({"c": lambda: 1})
    assert info.value.field == "c"


def test_sample_is_seeded_and_in_sorted_path_order():
    space = SearchSpace({"z": Uniform(0.0, 1.0), "a": IntUniform(0, 100)})
    values = space.sample(rng(5))
    assert list(values) == ["a", "z"] and values == space.sample(rng(5))
    r = rng(5)
    assert values == {"a": int(r.integers(0, 100, endpoint=True)), "z": float(r.uniform(0.0, 1.0))}


def test_grid_is_the_product_of_grid_entries_only():
    space = SearchSpace({"b": Grid([1, 2]), "a": Grid(["x", "y", "z"]), "lr": Uniform(0.0, 1.0)})
    points = space.grid()
    assert len(points) == 6 and points[0] == {"a": "x", "b": 1} and points[1] == {"a": "x", "b": 2}
    assert SearchSpace({"lr": Uniform(0.0, 1.0)}).grid() == [{}]


def test_check_accepts_real_config_paths():
    SearchSpace({"model.optimizer.lr": LogUniform(1e-4, 1.0), "stages.train.max_epochs": IntUniform(1, 3),
                 "seed": Choice([0, 1])}).check(tiny_config())


@pytest.mark.parametrize("path", ["model.optimiser.lr", "model.optimizer.lrr", "stages.test.max_epochs"])
def test_check_names_a_bad_path(path):
    with pytest.raises(ConfigError) as info:
        SearchSpace({path: Uniform(0.1, 1.0)}).check(tiny_config())
    assert info.value.field == path and path in str(info.value)


def test_check_names_the_path_of_a_value_the_config_refuses():
    with pytest.raises(ConfigError) as info:
        SearchSpace({"stages.train.max_epochs": Choice([1, "two"])}).check(tiny_config())
    assert info.value.field == "stages.train.max_epochs" and "'two'" in str(info.value)


def test_check_refuses_two_paths_to_one_field():
    with pytest.raises(ConfigError, match="same field"):
        SearchSpace({"stages.train.max_epochs": IntUniform(1, 3),
                     "stages[0].max_epochs": IntUniform(1, 3)}).check(tiny_config())


def test_check_values_names_the_path_of_an_out_of_bounds_value():
    space = SearchSpace({"model.optimizer.lr": LogUniform(1e-4, 1.0), "opt": Choice(["sgd", "adam"])})
    space.check_values({"model.optimizer.lr": 0.5, "opt": "adam", "other.fixed": 3})
    with pytest.raises(ConfigError) as info:
        space.check_values({"model.optimizer.lr": 2.0})
    assert info.value.field == "model.optimizer.lr"
    with pytest.raises(ConfigError) as info:
        space.check_values({"opt": "adagrad"})
    assert info.value.field == "opt"


@pytest.mark.parametrize("module", ["spaces.py", "searchers.py"])
def test_pure_modules_import_neither_torch_nor_storage(module):
    path = Path(__file__).parent.parent / "ptutils" / module
    if not path.exists():
        pytest.skip(f"{module} not written yet")
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    banned = ("torch", "database", "backends", "records", "session", "checkpoint", "sqlite3")
    assert not [n for n in names if any(part in banned for part in n.split("."))]
