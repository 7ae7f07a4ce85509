"""ptutils.support.normalize: TFUtils' params dicts of every era, normalised as TFUtils' parse_params does (spec §2, §3, §7)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch

from ptutils.errors import ConfigError
from ptutils.support import (
    ClipOptimizer, append_and_return, check_arguments, compute_loss, cross_entropy_per_case, exponential_decay,
    get_loss_dict, identity_func, mean_dict, mean_loss, model_kwargs, normalize, reduce_mean_dict,
)
from tests.support import tfutils_params as real


def data(**kw):
    return list(range(4))


def net(**kw):
    return torch.nn.Linear(4, 3)


def minimal(**overrides):
    """The smallest train params: a model, data with a batch size, num_steps, an exponential decay."""
    params = {
        "save_params": {"exp_id": "exp"},
        "model_params": {"func": net},
        "train_params": {"data_params": {"func": data, "batch_size": 8}, "num_steps": 10},
        "learning_rate_params": {"learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.9},
    }
    params.update(overrides)
    return params


# --- top-level arguments: the entry point's signature ---------------------------------------------------


def test_an_unknown_top_level_key_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="train_from_params.*'validation_parms'"):
        normalize("train", **minimal(validation_parms={}))


def test_test_mode_has_no_train_params_argument():
    with pytest.raises(TypeError, match="test_from_params.*'train_params'"):
        check_arguments("test", {"load_params": {}, "model_params": {}, "validation_params": {}, "train_params": {}})


def test_a_missing_required_argument_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="train_params"):
        check_arguments("train", {"save_params": {}, "model_params": {}})


def test_every_eras_top_level_keys_are_accepted_and_the_tensorflow_ones_reported():
    params = normalize("train", **minimal(inter_op_parallelism_threads=40, log_device_placement=True,
                                          skip_check=True, dont_run=True, use_estimator=False))
    assert params.skip_check and params.dont_run and params.log_device_placement
    assert any(note.startswith("inter_op_parallelism_threads:") for note in params.ignored)
    assert any(note.startswith("log_device_placement:") for note in params.ignored)


def test_the_estimator_path_is_refused_by_name():
    with pytest.raises(ConfigError, match="use_estimator"):
        normalize("train", **minimal(use_estimator=True))


# --- §2: falsy groups, lists per model ------------------------------------------------------------------


def test_a_falsy_group_takes_tfutils_defaults():
    params = normalize("train", **minimal(save_params=None, load_params={}, loss_params=None, optimizer_params=None))
    save, load, loss, opt = params.save[0], params.load[0], params.loss[0], params.optimizer[0]
    assert (save.save_metrics_freq, save.save_valid_freq, save.save_filters_freq) == (100, 3000, 30000)
    assert (save.cache_filters_freq, save.cache_max_num, save.save_initial_filters) == (3000, 6, True)
    assert (save.save_to_gfs, save.do_save, save.exp_id) == ((), True, None)
    assert (load.do_restore, load.from_ckpt, load.restore_global_step, load.query) == (True, None, True, None)
    assert (loss.pred_targets, loss.loss_func, loss.agg_func) == (("labels",), cross_entropy_per_case, mean_loss)
    assert (opt.optimizer_class, opt.optimizer_kwargs, opt.clip) == (torch.optim.SGD, {"momentum": 0.9}, True)
    assert params.validation == ({},)


def test_a_single_group_is_deep_copied_once_per_model():
    shared = {"func": data, "batch_size": 8, "cfg": {"depth": 3}}
    params = normalize("train", **minimal(model_params=[{"func": net}, {"func": net}],
                                          save_params={"exp_id": "e"},
                                          train_params={"data_params": shared, "num_steps": 5}))
    first, second = params.train
    assert first.data_params.kwargs == second.data_params.kwargs == {"batch_size": 8, "cfg": {"depth": 3}}
    assert first.data_params.kwargs["cfg"] is not second.data_params.kwargs["cfg"]
    assert shared["cfg"] is not first.data_params.kwargs["cfg"]


def test_a_length_one_list_is_repeated_for_every_model():
    params = normalize("train", **minimal(model_params=[{"func": net}] * 3,
                                          loss_params=[{"pred_targets": ["y"]}]))
    assert [loss.pred_targets for loss in params.loss] == [("y",)] * 3


def test_a_list_of_the_wrong_length_names_its_group():
    with pytest.raises(ValueError, match="loss_params.*2 entries.*3"):
        normalize("train", **minimal(model_params=[{"func": net}] * 3, loss_params=[{}, {}]))


def test_the_callers_dicts_are_left_as_they_were():
    params = minimal(train_params={"data_params": {"func": data, "batch_size": 64}, "num_steps": 3,
                                   "minibatch_size": 32})
    before = copy.deepcopy(params)
    normalize("train", **params)
    assert params == before


# --- §2.3 model_params ----------------------------------------------------------------------------------


def test_model_defaults_follow_the_mode():
    train = normalize("train", **minimal()).model[0]
    test = normalize("test", load_params={"exp_id": "e"}, model_params={"func": net}, validation_params={}).model[0]
    assert (train.seed, train.prefix, train.train, train.trainable_scopes) == (0, "model_0", True, None)
    assert (train.devices, train.num_gpus) == (("/gpu:0",), 1)
    assert test.train is False


def test_devices_are_handed_out_in_turn_to_the_models_without_any():
    models = [{"func": net, "devices": [3]}, {"func": net}, {"func": net}, {"func": net}, {"func": net},
              {"func": net}]
    params = normalize("train", **minimal(model_params=models, save_params={}))
    assert [m.devices for m in params.model] == [("/gpu:3",), ("/gpu:0",), ("/gpu:1",), ("/gpu:2",), ("/gpu:3",),
                                                 ("/gpu:4",)]
    assert [m.prefix for m in params.model] == [f"model_{i}" for i in range(6)]


def test_devices_are_normalised_to_sorted_unique_gpu_strings():
    model = normalize("train", **minimal(model_params={"func": net, "devices": ["/gpu:1", 0, "gpu1", "/cpu:0"]})).model[0]
    assert model.devices == ("/gpu:0", "/gpu:1")
    assert model.num_gpus == 2


def test_a_num_gpus_that_does_not_match_the_devices_is_refused():
    with pytest.raises(ConfigError, match="model_params.num_gpus"):
        normalize("train", **minimal(model_params={"func": net, "devices": [0, 1], "num_gpus": 1}))


def test_a_model_without_func_is_refused_by_name():
    with pytest.raises(ConfigError, match="model_params.func"):
        normalize("train", **minimal(model_params={"seed": 1}))


def test_user_model_keys_become_the_funcs_kwargs():
    model = normalize("train", **minimal(model_params={"func": net, "seed": 5, "cfg_initial": {"a": 1},
                                                       "num_classes": 10, "trainable_scopes": ["fc"]})).model[0]
    assert model_kwargs(model) == {"cfg_initial": {"a": 1}, "num_classes": 10}
    assert (model.seed, model.trainable_scopes) == (5, ["fc"])


def test_tpu_model_keys_are_reported_and_a_tpu_name_refused():
    params = normalize("train", **minimal(model_params={"func": net, "num_shards": 8, "tpu_zone": "z"}))
    assert model_kwargs(params.model[0]) == {}
    assert "model_params.num_shards: TPU estimator only" in params.ignored
    with pytest.raises(ConfigError, match="model_params.tpu_name"):
        normalize("train", **minimal(model_params={"func": net, "tpu_name": "tpu-1"}))


# --- §2.4 train_params ----------------------------------------------------------------------------------


def test_train_defaults():
    train = normalize("train", **minimal()).train[0]
    assert (train.num_steps, train.thres_loss, train.validate_first) == (10, 100, True)
    assert (train.minibatch_size, train.num_minibatches, train.targets, train.train_loop) == (8, 1, None, None)


def test_a_missing_num_steps_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="train_params.num_steps") as error:
        normalize("train", **minimal(train_params={"data_params": {"func": data, "batch_size": 8}}))
    assert error.value.field == "train_params.num_steps"


def test_num_steps_may_be_infinite():
    assert normalize("train", **minimal(train_params={"data_params": {"func": data},
                                                      "num_steps": float("inf")})).train[0].num_steps == math.inf


def test_minibatch_size_splits_the_batch_and_overwrites_data_params_batch_size():
    train = normalize("train", **minimal(train_params={"data_params": {"func": data, "batch_size": 64},
                                                       "num_steps": 3, "minibatch_size": 30})).train[0]
    assert (train.num_minibatches, train.minibatch_size, train.data_params.kwargs["batch_size"]) == (2, 32, 32)


def test_a_minibatch_size_that_cannot_split_the_batch_evenly_is_refused():
    with pytest.raises(ConfigError, match="train_params.minibatch_size"):
        normalize("train", **minimal(train_params={"data_params": {"func": data, "batch_size": 64},
                                                   "num_steps": 3, "minibatch_size": 25}))


def test_queue_params_are_accepted_and_reported():
    params = normalize("train", **minimal(train_params={"data_params": {"func": data}, "num_steps": 1,
                                                        "queue_params": {"queue_type": "fifo"}}))
    assert any(note.startswith("train_params.queue_params:") for note in params.ignored)
    assert "queue_params" not in params.train[0].extra


# --- §2.5 exp_ids of several models ---------------------------------------------------------------------


def test_a_shared_exp_id_gets_each_models_prefix():
    params = normalize("train", **minimal(model_params=[{"func": net}, {"func": net, "prefix": "b"}],
                                          save_params={"exp_id": "training0"}, load_params={"exp_id": "old"}))
    assert [s.exp_id for s in params.save] == ["training0_model_0", "training0_b"]
    assert [s.exp_id for s in params.load] == ["old_model_0", "old_b"]


def test_distinct_exp_ids_are_kept_and_a_repeat_among_them_refused():
    models = [{"func": net}] * 3
    params = normalize("train", **minimal(model_params=models,
                                          save_params=[{"exp_id": "a"}, {"exp_id": "b"}, {"exp_id": "c"}]))
    assert [s.exp_id for s in params.save] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="save_params.exp_id"):
        normalize("train", **minimal(model_params=models,
                                     save_params=[{"exp_id": "a"}, {"exp_id": "a"}, {"exp_id": "c"}]))


def test_one_model_keeps_its_exp_id_and_missing_ones_stay_missing():
    assert normalize("train", **minimal()).save[0].exp_id == "exp"
    params = normalize("train", **minimal(model_params=[{"func": net}] * 2, save_params={}))
    assert [s.exp_id for s in params.save] == [None, None]


# --- §3 groups ------------------------------------------------------------------------------------------


def test_save_frequencies_must_be_positive_step_counts():
    with pytest.raises(ConfigError, match="save_params.save_filters_freq"):
        normalize("train", **minimal(save_params={"exp_id": "e", "save_filters_freq": 0}))


def test_load_query_is_ignored_as_tfutils_ignores_it():
    params = normalize("train", **minimal(load_params={"exp_id": "e", "load_query": {"step": 5}}))
    assert params.load[0].query is None
    assert any(note.startswith("load_params.load_query:") for note in params.ignored)


def test_the_deprecated_loss_names_are_read_and_win_as_in_tfutils():
    loss = normalize("train", **minimal(loss_params={"targets": "y", "pred_targets": ["z"],
                                                     "loss_per_case_func": torch.sub})).loss[0]
    assert (loss.pred_targets, loss.loss_func) == (("y",), torch.sub)


def test_optimizer_e3_shape():
    opt = normalize("train", **minimal(optimizer_params={"optimizer_class": torch.optim.Adam,
                                                         "optimizer_kwargs": {"betas": (0.8, 0.9)}})).optimizer[0]
    assert (opt.optimizer_class, opt.optimizer_kwargs, opt.clip) == (torch.optim.Adam, {"betas": (0.8, 0.9)}, True)


def test_optimizer_e1_flat_shape():
    opt = normalize("train", **minimal(optimizer_params={"func": ClipOptimizer, "optimizer_class": torch.optim.SGD,
                                                         "clip": False, "momentum": 0.5})).optimizer[0]
    assert (opt.optimizer_class, opt.optimizer_kwargs, opt.clip) == (torch.optim.SGD, {"momentum": 0.5}, False)


def test_optimizer_direct_class_shape_does_not_clip():
    opt = normalize("train", **minimal(optimizer_params={"optimizer": torch.optim.SGD, "momentum": 0.9})).optimizer[0]
    assert (opt.optimizer_class, opt.optimizer_kwargs, opt.clip) == (torch.optim.SGD, {"momentum": 0.9}, False)


def test_the_optimizer_may_not_set_its_own_learning_rate():
    with pytest.raises(ConfigError, match="optimizer_params.lr"):
        normalize("train", **minimal(optimizer_params={"optimizer": torch.optim.SGD, "lr": 0.1}))


def test_the_default_learning_rate_is_tfs_exponential_decay():
    lr = normalize("train", **minimal()).learning_rate[0]
    assert lr.func is exponential_decay
    assert exponential_decay(global_step=78, learning_rate=0.1, decay_steps=39, decay_rate=0.95,
                             staircase=True) == pytest.approx(0.1 * 0.95**2)
    assert exponential_decay(global_step=20, learning_rate=0.1, decay_steps=40, decay_rate=0.5) == pytest.approx(
        0.1 * 0.5**0.5)
    with pytest.raises(ConfigError, match="learning_rate_params.learning_rate"):
        normalize("train", **minimal(learning_rate_params=None))


def test_validation_sets_take_tfutils_defaults():
    sets = normalize("train", **minimal(validation_params={"val": {"data_params": {"func": data}}})).validation[0]
    val = sets["val"]
    assert (val.name, val.num_steps, val.agg_func, val.online_agg_func) == ("val", None, identity_func,
                                                                           append_and_return)
    assert val.targets.func is get_loss_dict and val.targets.kwargs["pred_targets"] == ["labels"]


def test_a_validation_set_without_data_func_is_named():
    with pytest.raises(ConfigError, match="validation_params.val.data_params.func"):
        normalize("train", **minimal(validation_params={"val": {"data_params": {"batch_size": 3}}}))


def test_test_mode_has_no_training_groups():
    params = normalize("test", load_params={"exp_id": "e"}, model_params={"func": net}, validation_params={})
    assert (params.train, params.loss, params.learning_rate, params.optimizer) == (None, None, None, None)
    assert "train_params" not in params.as_tfutils()


def test_as_tfutils_gives_each_models_parsed_params_in_tfutils_shape():
    parsed = normalize("train", **minimal(model_params={"func": net, "width": 3})).as_tfutils(0)
    assert set(parsed) == {"dont_run", "skip_check", "log_device_placement", "save_params", "load_params",
                           "model_params", "validation_params", "train_params", "loss_params",
                           "learning_rate_params", "optimizer_params"}
    assert parsed["model_params"] == {"func": net, "width": 3, "seed": 0, "prefix": "model_0", "devices": ["/gpu:0"],
                                      "num_gpus": 1, "train": True, "trainable_scopes": None}
    assert parsed["train_params"]["data_params"] == {"func": data, "batch_size": 8}
    assert parsed["save_params"]["save_metrics_freq"] == 100 and parsed["save_params"]["exp_id"] == "exp"


# --- loss call conventions ------------------------------------------------------------------------------


def test_the_loss_is_called_as_tfutils_calls_it():
    inputs = {"labels": torch.tensor([0, 2]), "w": torch.tensor([1.0, 3.0])}
    outputs = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    default = compute_loss(inputs, outputs, pred_targets=["labels"], loss_func=cross_entropy_per_case,
                           agg_func=mean_loss)
    assert default == pytest.approx(torch.nn.functional.cross_entropy(outputs, inputs["labels"]).item())
    e1 = compute_loss(inputs, outputs, pred_targets=["labels"], loss_func=real.cross_entropy_named,
                      agg_func=torch.mean, loss_per_case_func_params={"_outputs": "outputs", "_targets_$all": "inputs"})
    assert e1 == pytest.approx(default.item())
    as_dict = compute_loss(inputs, outputs, pred_targets=[], loss_func=lambda o, i: (o.sum(1) * i["w"]),
                           inputs_as_dict=True, agg_func=lambda loss, which_device: loss.sum() + which_device,
                           which_device=10)
    assert as_dict.item() == pytest.approx(2.0 * 1 + 2.0 * 3 + 10)


def test_the_default_validation_target_is_the_loss():
    inputs, outputs = {"labels": torch.tensor([1])}, torch.tensor([[0.0, 5.0, 0.0]])
    result = get_loss_dict(inputs, outputs, pred_targets=["labels"], loss_func=cross_entropy_per_case,
                           agg_func=mean_loss)
    assert set(result) == {"loss"} and result["loss"].item() < 0.02


# --- aggregation helpers --------------------------------------------------------------------------------


def test_without_agg_funcs_a_record_holds_the_list_of_batch_dicts():
    agg = None
    for step, value in enumerate([torch.tensor(1.0), torch.tensor(3.0)]):
        agg = append_and_return(agg, {"top1": value, "ids": torch.tensor([step, step])}, step)
    assert identity_func(agg) == {"result": [{"top1": 1.0, "ids": [0, 0]}, {"top1": 3.0, "ids": [1, 1]}]}
    assert identity_func({"top1": torch.tensor(0.5)}) == {"top1": 0.5}


def test_mean_dict_and_reduce_mean_dict_agree():
    batches = [{"loss": torch.tensor(v), "validation_step": i} for i, v in enumerate([1.0, 2.0, 6.0])]
    running = None
    for step, batch in enumerate(batches):
        running = reduce_mean_dict(running, batch, step)
    assert mean_dict(batches) == {"loss": pytest.approx(3.0), "validation_step": [0, 2]}
    assert running == {"loss": pytest.approx(3.0), "validation_step": [0, 2]}
    assert type(running["loss"]) is float and type(mean_dict(batches)["loss"]) is float


def test_mean_dict_averages_arrays_over_every_element():
    assert mean_dict([{"x": torch.tensor([1.0, 3.0])}, {"x": torch.tensor([5.0, 7.0])}]) == {"x": 4.0}


# --- §7 real users' params ------------------------------------------------------------------------------


def test_cs375_e1_params_normalise():
    params = normalize("train", **real.cs375_alexnet())
    train, loss, opt, save = params.train[0], params.loss[0], params.optimizer[0], params.save[0]
    assert train.num_steps == 1281167 / 256 * 90 and train.validate_first is False and train.thres_loss == 1000
    assert train.data_params.kwargs["n_threads"] == 4 and train.targets.kwargs == {"targets": []}
    assert (loss.pred_targets, loss.loss_func) == (("labels",), real.cross_entropy_named)
    assert loss.loss_per_case_func_params == {"_outputs": "outputs", "_targets_$all": "inputs"}
    assert (opt.optimizer_class, opt.optimizer_kwargs, opt.clip) == (torch.optim.SGD, {"momentum": 0.9}, False)
    assert (save.save_metrics_freq, save.cache_filters_freq, save.save_initial_filters) == (200, 50000, False)
    assert params.load[0].do_restore is False and params.load[0].query is None
    assert params.learning_rate[0].kwargs["boundaries"] == [150000, 300000, 450000]
    assert params.validation[0]["topn_val"].num_steps == 196
    assert {n.split(":")[0] for n in params.ignored} == {
        "train_params.queue_params", "validation_params.topn_val.queue_params", "load_params.load_query"}


def test_local_aggregation_e3_params_normalise():
    params = normalize("train", **real.local_aggregation())
    model, train, loss, opt = params.model[0], params.train[0], params.loss[0], params.optimizer[0]
    assert (model.devices, model.num_gpus) == (("/gpu:0", "/gpu:1"), 2)
    assert train.num_steps == math.inf and train.thres_loss == math.inf and train.train_loop is not None
    assert train.targets.kwargs == {"gpu_offset": 0}
    assert (loss.pred_targets, loss.agg_func_kwargs) == ((), {"weight_decay": 1e-4})
    assert (opt.optimizer_class, opt.optimizer_kwargs, opt.clip) == (torch.optim.SGD, {"momentum": 0.9}, False)
    assert params.save[0].save_filters_freq == 10009 and params.skip_check is True
    assert params.load[0].query is None and params.ignored == ()


def test_unsup_vvs_e3_params_normalise_in_both_modes():
    params = normalize("train", **real.unsup_vvs_neural_fit())
    train, loss, opt, load = params.train[0], params.loss[0], params.optimizer[0], params.load[0]
    assert (train.num_minibatches, train.data_params.kwargs["batch_size"]) == (2, 32)
    assert (loss.loss_func, loss.loss_func_kwargs, loss.loss_per_case_func_params) == (
        real.neural_loss, {"scale": 2.0}, {})
    assert (opt.optimizer_class, opt.optimizer_kwargs, opt.clip) == (torch.optim.Adam, {"betas": (0.9, 0.999)}, True)
    assert load.query == {"exp_id": "pretrained_res18", "saved_filters": True, "step": 320000}
    assert len(model_kwargs(params.model[0])) == 29
    test = normalize("test", **real.unsup_vvs_extract())
    assert test.dont_run is True and test.model[0].train is False and test.train is None
    assert test.validation[0]["v4"].agg_func is mean_dict


def test_four_model_e1_params_normalise():
    params = normalize("train", **real.jerk_models_four())
    assert params.num_models == 4
    assert [s.exp_id for s in params.save] == ["otrnn1", "otrnn2", "otrnn3", "otrnn4"]
    assert [m.devices for m in params.model] == [(f"/gpu:{i}",) for i in range(4)]
    assert all(t.num_steps == math.inf for t in params.train)
    assert all(s.save_to_gfs == ("pred",) for s in params.save)
    assert params.train[0] is not params.train[1]
    assert "inter_op_parallelism_threads: a TensorFlow thread-pool size (E1/E2)" in params.ignored


# --- packaging ------------------------------------------------------------------------------------------


def test_importing_support_loads_no_database_driver():
    code = "import sys, ptutils.support; print(sorted(m for m in ('pymongo', 'h5py', 'sqlalchemy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
