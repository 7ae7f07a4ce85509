"""ptutils.support.train_from_params / test_from_params end to end, on the filesystem backend and on a
MongoDB-wire server: the records TFUtils' analysis scripts count follow the closed-form schedule."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pymongo
import pytest
import torch

from ptutils.support import (
    HiLossError, SaveGroup, load_gfs_items, mean_dict, open_records, test_from_params, train_from_params,
)
from ptutils.support.schedule import cache_steps, expected_counts, filter_steps, recent_kept

from .support import services
from .support import tfutils_params as tp

FREQS = {"save_metrics_freq": 3, "save_valid_freq": 6, "save_filters_freq": 12, "cache_filters_freq": 4,
         "cache_max_num": 2}
SG = SaveGroup(**FREQS)


@pytest.fixture(scope="module", params=["fs", "mongo"])
def where(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Location keys of save_params for one backend (a fresh collname per test comes from ``loc``)."""
    if request.param == "fs":
        yield {"db": tmp_path_factory.mktemp("tfdb").as_uri()}
    else:
        with services.mongo_database(tmp_path_factory) as url:
            parts = urlsplit(url)
            yield {"host": parts.hostname, "port": parts.port, "dbname": parts.path.strip("/")}


@pytest.fixture
def loc(where: dict) -> dict:
    return {**where, "collname": f"c{uuid.uuid4().hex[:8]}"}


class Analysis:
    """What a TFUtils analysis script asks: pymongo on MongoDB, the same query through the DBInterface elsewhere."""

    def __init__(self, loc: dict):
        self.loc = loc
        if "db" in loc:
            self.store = open_records(loc)
        else:
            self.client = pymongo.MongoClient(loc["host"], loc["port"])
            self.files = self.client[loc["dbname"]][loc["collname"] + ".files"]

    def count(self, exp_id: str) -> int:
        if "db" in self.loc:
            return self.store.count({"exp_id": exp_id})
        return self.files.count_documents({"exp_id": exp_id})

    def filter_steps(self, exp_id: str) -> list[int]:
        if "db" in self.loc:
            return sorted({r["step"] for r in self.store.find({"exp_id": exp_id, "saved_filters": True})})
        return sorted(self.files.find({"exp_id": exp_id, "saved_filters": True}).distinct("step"))

    def find(self, query: dict) -> list[dict]:
        if "db" in self.loc:
            return self.store.find(query, newest_first=False)
        return list(self.files.find(query, sort=[("_id", 1)]))

    def recent_steps(self, exp_id: str) -> list[int]:
        store = open_records(self.loc)
        try:
            return [r["step"] for r in store.recent(exp_id)]
        finally:
            store.close()


def params(loc: dict, exp_id: str, num_steps: int, **changes) -> dict:
    out = {
        "save_params": {**loc, "exp_id": exp_id, **FREQS},
        "model_params": {"func": tp.alexnet_model},
        "train_params": {"data_params": {"func": tp.image_data, "batch_size": 8, "shuffle": True},
                         "num_steps": num_steps},
        "learning_rate_params": {"learning_rate": 0.05, "decay_steps": 5, "decay_rate": 0.9, "staircase": True},
        "optimizer_params": {"optimizer_class": torch.optim.SGD, "optimizer_kwargs": {"momentum": 0.9}},
        "validation_params": {"v": {"data_params": {"func": tp.image_data, "group": "val", "batch_size": 8},
                                    "targets": {"func": tp.in_top_k}, "num_steps": 2, "agg_func": mean_dict}},
    }
    for key, value in changes.items():
        out[key] = value
    return out


def test_train_then_continue_follow_the_schedule(loc: dict) -> None:
    a = Analysis(loc)
    ids = train_from_params(**params(loc, "e1", 20))
    counts = expected_counts(SG, 0, 20)
    assert len(ids[0]) == a.count("e1") == counts.records == 11
    assert a.filter_steps("e1") == filter_steps(SG, 0, 20) == [0, 12]
    assert a.recent_steps("e1") == recent_kept(cache_steps(SG, 0, 20), 2) == [16, 20]
    valid = [r["step"] for r in a.find({"exp_id": "e1", "validation_results": {"$exists": True}})]
    assert valid == [0, 6, 12, 18]
    rec12 = a.find({"exp_id": "e1", "step": 12})[0]
    assert [r["learning_rate"] for r in rec12["train_results"]] == pytest.approx([0.045, 0.0405, 0.0405])
    assert rec12["checkpoint"]["session_id"] == "e1"

    more = train_from_params(**params(loc, "e1", 30))
    again = expected_counts(SG, 20, 30)
    assert len(more[0]) == again.records == 5
    assert a.count("e1") == counts.records + again.records
    assert a.filter_steps("e1") == [0, 12, 24]
    assert a.recent_steps("e1") == recent_kept([16, 20] + cache_steps(SG, 20, 30), 2) == [20, 28]
    # Already there: TFUtils' "Training cancelled", nothing written.
    assert train_from_params(**params(loc, "e1", 30)) is None
    assert a.count("e1") == 16


def test_branch_from_another_exp_id_keeps_its_step(loc: dict) -> None:
    a = Analysis(loc)
    train_from_params(**params(loc, "base", 20))
    branch = params(loc, "branch", 26, load_params={**loc, "exp_id": "base"})
    ids = train_from_params(**branch)
    # base's newest checkpoint (by uploadDate, __RECENT included) is step 20's; the branch goes on from 20.
    assert len(ids[0]) == a.count("branch") == expected_counts(SG, 20, 26, restored=True).records == 2
    assert a.filter_steps("branch") == filter_steps(SG, 20, 26, restored=True) == [24]
    # A query picks one checkpoint: step 12's, permanent; restore_global_step False starts the count at 0.
    at12 = params(loc, "from12", 6, load_params={**loc, "exp_id": "base", "restore_global_step": False,
                                                 "query": {"exp_id": "base", "step": 12}})
    train_from_params(**at12)
    assert a.count("from12") == expected_counts(SG, 0, 6, restored=True).records == 4
    assert a.filter_steps("from12") == filter_steps(SG, 0, 6, restored=True) == []
    # do_restore False appends a fresh run to the same exp_id (duplicate steps, as TFUtils).
    fresh = params(loc, "base", 6, load_params={"do_restore": False})
    train_from_params(**fresh)
    assert a.count("base") == 11 + expected_counts(SG, 0, 6).records


def test_test_from_params_validates_the_loaded_record(loc: dict) -> None:
    a = Analysis(loc)
    train_from_params(**params(loc, "t1", 12))
    perm = a.find({"exp_id": "t1", "saved_filters": True, "step": 12})[0]
    summary, ids = test_from_params(
        load_params={**loc, "exp_id": "t1"}, save_params={"exp_id": "t1_val"},
        model_params={"func": tp.alexnet_model},
        validation_params={"v": {"data_params": {"func": tp.image_data, "group": "val", "batch_size": 8},
                                 "targets": {"func": tp.in_top_k}, "num_steps": 3, "agg_func": mean_dict}})
    assert len(ids[0]) == 1 and a.count("t1_val") == 1
    rec = a.find({"exp_id": "t1_val"})[0]
    assert rec["validates"] == perm["_id"] and rec["step"] is None and rec["saved_filters"] is False
    assert rec["validation_results"]["v"]["top1"] == pytest.approx(summary[0]["v"]["top1"])
    # save_intermediate_freq: ceil(3/2) + 1 records.
    test_from_params(
        load_params={**loc, "exp_id": "t1"}, save_params={"exp_id": "t1_int", "save_intermediate_freq": 2},
        model_params={"func": tp.alexnet_model},
        validation_params={"v": {"data_params": {"func": tp.image_data, "group": "val", "batch_size": 8},
                                 "targets": {"func": tp.in_top_k}, "num_steps": 3}})
    assert a.count("t1_int") == 3
    args = test_from_params(load_params={**loc, "exp_id": "t1"}, save_params={"exp_id": "x"},
                            model_params={"func": tp.alexnet_model}, dont_run=True,
                            validation_params={"v": {"data_params": {"func": tp.image_data}}})
    assert set(args) >= {"dbinterface", "validation_targets", "save_intermediate_freq"}
    assert a.count("x") == 0
    for store in args["dbinterface"]:
        store.close()


def outputs_target(inputs, outputs):
    return {"pred": outputs, "mean_out": outputs.mean()}


def test_save_to_gfs_round_trip(loc: dict) -> None:
    a = Analysis(loc)
    p = params(loc, "g1", 6, train_params={"data_params": {"func": tp.image_data, "batch_size": 8},
                                           "num_steps": 6, "targets": {"func": outputs_target}})
    p["save_params"]["save_to_gfs"] = ["pred"]
    train_from_params(**p)
    assert a.count("g1") == expected_counts(SG, 0, 6).records == 4  # the blob doc has no exp_id
    rec = a.find({"exp_id": "g1", "step": 3})[0]
    assert all("pred" not in r and "mean_out" in r for r in rec["train_results"])
    items = load_gfs_items({k: v for k, v in loc.items()}, rec)
    assert [t.shape for t in items["train_results"]["pred"]] == [torch.Size([8, 3])] * 3


def test_two_models_on_model_0s_data(loc: dict) -> None:
    a = Analysis(loc)
    p = params(loc, "mm", 12)
    p["model_params"] = [{"func": tp.alexnet_model}, {"func": tp.alexnet_model, "seed": 1}]
    ids = train_from_params(**p)
    assert len(ids) == 2
    for i in range(2):
        assert a.count(f"mm_model_{i}") == len(ids[i]) == expected_counts(SG, 0, 12).records
        assert a.filter_steps(f"mm_model_{i}") == [0, 12]


def test_thres_loss_fails_the_session_naming_it(loc: dict) -> None:
    p = params(loc, "hi", 6)
    p["train_params"]["thres_loss"] = 1e-6
    with pytest.raises(HiLossError, match="thres_loss"):
        train_from_params(**p)


def test_dont_run_returns_train_args_without_training(loc: dict) -> None:
    a = Analysis(loc)
    args = train_from_params(**params(loc, "dr", 6), dont_run=True)
    assert args["global_step"] == [0] and args["num_steps"] == [6]
    assert a.count("dr") == 0
    for session in args["session"]:
        session.close()
    for store in args["dbinterface"]:
        store.close()


def _relocate(p: dict, loc: dict, num_steps: int) -> dict:
    p = copy.copy(p)
    keys = ("host", "port", "dbname", "collname", "db")

    def moved(group: dict) -> dict:
        out = {k: v for k, v in group.items() if k not in keys}
        return {**out, **loc}

    for name in ("save_params", "load_params"):
        if isinstance(p.get(name), list):
            p[name] = [moved(g) for g in p[name]]
        elif p.get(name) is not None:
            p[name] = moved(p[name])
    for group in p["save_params"] if isinstance(p["save_params"], list) else [p["save_params"]]:
        group.update(FREQS)
    p["train_params"] = {**p["train_params"], "num_steps": num_steps}
    return p


def _small_validation(p: dict) -> None:
    for sets in p["validation_params"] if isinstance(p["validation_params"], list) else [p["validation_params"]]:
        for vset in sets.values():
            vset["num_steps"] = 2


@pytest.mark.parametrize("shape", ["cs375_alexnet", "local_aggregation", "jerk_models_four"])
def test_real_params_shapes_run(loc: dict, shape: str) -> None:
    a = Analysis(loc)
    p = _relocate(getattr(tp, shape)(), loc, 6)
    _small_validation(p)
    p["train_params"]["data_params"]["batch_size"] = 8
    if "thres_loss" in p["train_params"] and p["train_params"]["thres_loss"] < 10:
        p["train_params"]["thres_loss"] = 1000
    validate_first = p["train_params"].get("validate_first", True)
    ids = train_from_params(**p)
    save = p["save_params"] if isinstance(p["save_params"], list) else [p["save_params"]]
    for i, group in enumerate(save):
        sg = SaveGroup(**{k: group[k] for k in FREQS}, save_initial_filters=group.get("save_initial_filters", True))
        exp_id = group["exp_id"]
        assert a.count(exp_id) == len(ids[i]) == expected_counts(sg, 0, 6, validate_first=validate_first).records
        assert a.filter_steps(exp_id) == filter_steps(sg, 0, 6, validate_first=validate_first)


def test_unsup_vvs_shape_branches_from_a_query(loc: dict) -> None:
    a = Analysis(loc)
    train_from_params(**params(loc, "pretrained_res18", 12))
    p = _relocate(tp.unsup_vvs_neural_fit(), loc, 16)
    p["load_params"]["exp_id"] = "pretrained_res18"
    p["load_params"]["query"] = {"exp_id": "pretrained_res18", "saved_filters": True, "step": 12}
    p["save_params"]["exp_id"] = "fit_v4"
    ids = train_from_params(**p)
    assert a.count("fit_v4") == len(ids[0]) == expected_counts(SG, 12, 16, restored=True).records
    extract = {k: p[k] for k in ("save_params", "load_params", "model_params", "validation_params", "skip_check")}
    extract["load_params"] = {**loc, "exp_id": "fit_v4"}
    args = test_from_params(**extract, dont_run=True)
    assert args["loaded"][0]["exp_id"] == "fit_v4"
    for store in args["dbinterface"]:
        store.close()


def huge_loss(outputs, labels):
    return 1e6 * torch.nn.functional.cross_entropy(outputs, labels, reduction="none")


def test_clip_clamps_gradient_values(loc: dict) -> None:
    """ClipOptimizer's clip=True: each gradient element in [-1, 1], so one plain SGD step moves a weight by <= lr."""
    lr = 0.01
    p = params(loc, "clip", 1, loss_params={"pred_targets": ["labels"], "loss_func": huge_loss},
               learning_rate_params={"func": lambda global_step: lr},
               optimizer_params={"func": tp.ClipOptimizer, "optimizer_class": torch.optim.SGD, "clip": True})
    p["train_params"]["thres_loss"] = float("inf")
    args = train_from_params(**p, dont_run=True)
    model = args["model"][0]
    before = [t.detach().clone() for t in model.module.parameters()]
    args["session"][0].run(until_step=1)
    moved = max(float((t.detach() - b).abs().max()) for t, b in zip(model.module.parameters(), before))
    assert 0 < moved <= lr * (1 + 1e-5)  # unclipped, the 1e6-scaled loss would move it by ~1e3
    for session in args["session"]:
        session.close()
    for store in args["dbinterface"]:
        store.close()


def test_a_data_func_gets_the_loaders_keys_only_if_it_takes_them():
    from ptutils.support.train import _data_kwargs

    def dataset(group):  # a torch-style Dataset factory: the loader batches it
        return group

    def provider(group, batch_size):  # a TFUtils-style provider batching itself
        return group, batch_size

    def anything(**kwargs):
        return kwargs

    kwargs = {"group": "train", "batch_size": 32, "shuffle": True, "num_workers": 2}
    assert _data_kwargs(dataset, kwargs) == {"group": "train"}
    assert _data_kwargs(provider, kwargs) == {"group": "train", "batch_size": 32}
    assert _data_kwargs(anything, kwargs) == kwargs
