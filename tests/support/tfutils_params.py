"""Real users' TFUtils params dicts (spec §7), with tiny PyTorch callables in place of the TensorFlow ones.

Each function returns a fresh dict shaped exactly as the user's script built it:
A is cs375's E1 AlexNet script, B LocalAggregation's E3 ``param_setter.py``, C unsup_vvs'
E3 neural fitting, D an E1/E2 four-model script.  Only the callables are swapped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ptutils.support import ClipOptimizer, mean_dict

N_TRAIN, N_VAL = 64, 32


class _DictDataset(TensorDataset):
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        images, labels = super().__getitem__(index)
        return {"images": images, "labels": labels}


class ImagesLinear(nn.Module):
    """A linear layer over ``inputs['images']``: TFUtils' model funcs take the batch dict, so these modules do too."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.linear = nn.Linear(4, num_classes)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(inputs["images"])


def image_data(group: str = "train", batch_size: int = 8, **_kwargs: Any) -> _DictDataset:
    """A Dataset of 4-feature 'images' with labels in 0..2 (stands for ImageNetDataProvider and friends)."""
    gen = torch.Generator().manual_seed(0 if group == "train" else 1)
    count = N_TRAIN if group == "train" else N_VAL
    return _DictDataset(torch.randn(count, 4, generator=gen), torch.randint(0, 3, (count,), generator=gen))


def alexnet_model(num_classes: int = 3, **_kwargs: Any) -> nn.Module:
    """A one-layer 'AlexNet' (``model_params['func']``)."""
    return ImagesLinear(num_classes)


def return_outputs(inputs: dict[str, torch.Tensor], outputs: torch.Tensor, targets: list[str]) -> dict[str, Any]:
    """cs375's train targets func: the named inputs, passed through."""
    return {t: inputs[t] for t in targets}


def in_top_k(inputs: dict[str, torch.Tensor], outputs: torch.Tensor, k: int = 1) -> dict[str, torch.Tensor]:
    """Top-k accuracy per batch (for ``tf.nn.in_top_k``)."""
    top = outputs.topk(k, dim=1).indices
    return {"top1": (top == inputs["labels"][:, None]).any(dim=1).float().mean()}


def online_agg_mean(agg: dict[str, list[Any]] | None, res: dict[str, Any], step: int) -> dict[str, list[Any]]:
    """cs375's online aggregation: per key, the list of batch values."""
    agg = {} if agg is None else agg
    for key, value in res.items():
        agg.setdefault(key, []).append(float(value))
    return agg


def agg_mean(x: dict[str, list[float]]) -> dict[str, float]:
    """cs375's final aggregation: per key, the mean."""
    return {k: sum(v) / len(v) for k, v in x.items()}


def cross_entropy_named(outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """cs375's loss: named ``outputs``/``inputs`` arguments, as its ``loss_per_case_func_params`` maps them."""
    return F.cross_entropy(outputs, inputs, reduction="none")


def piecewise_constant(global_step: int, x: Any, boundaries: list[int], values: list[float]) -> float:
    """``tf.train.piecewise_constant`` (cs375 passes an unrelated ``x`` and gets ``global_step`` too)."""
    for boundary, value in zip(boundaries, values):
        if global_step <= boundary:
            return value
    return values[-1]


def cs375_alexnet() -> dict[str, Any]:
    """A: github neuroailab/cs375 ``2017/assignment1/train_imagenet.py`` (E1, queue era)."""
    return {
        "train_params": {
            "data_params": {"func": image_data, "data_path": "/datasets/imagenet", "group": "train", "crop_size": 227,
                            "file_pattern": "train*.tfrecords", "batch_size": 256, "shuffle": False,
                            "shuffle_seed": 0, "file_grab_func": None, "n_threads": 4},
            "queue_params": {"queue_type": "random", "batch_size": 256, "seed": 0, "capacity": 2560,
                             "min_after_dequeue": 1280},
            "targets": {"func": return_outputs, "targets": []},
            "num_steps": 1281167 / 256 * 90,
            "thres_loss": 1000,
            "validate_first": False,
        },
        "validation_params": {
            "topn_val": {
                "data_params": {"func": image_data, "data_path": "/datasets/imagenet", "group": "val",
                                "crop_size": 227, "batch_size": 256, "n_threads": 4},
                "queue_params": {"queue_type": "fifo", "batch_size": 256, "seed": 0, "capacity": 2560},
                "targets": {"func": in_top_k},
                "num_steps": math.ceil(50000 / 256),
                "agg_func": agg_mean,
                "online_agg_func": online_agg_mean,
            },
        },
        "model_params": {"func": alexnet_model},
        "loss_params": {
            "targets": ["labels"],
            "agg_func": torch.mean,
            "loss_per_case_func": cross_entropy_named,
            "loss_per_case_func_params": {"_outputs": "outputs", "_targets_$all": "inputs"},
            "loss_func_kwargs": {},
        },
        "learning_rate_params": {"func": piecewise_constant, "x": 0, "boundaries": [150000, 300000, 450000],
                                 "values": [0.01, 0.005, 0.001, 0.0005]},
        "optimizer_params": {"func": ClipOptimizer, "optimizer_class": torch.optim.SGD, "clip": False,
                             "momentum": 0.9},
        "save_params": {"host": "localhost", "port": 24444, "dbname": "imagenet", "collname": "alexnet",
                        "exp_id": "experiment_1", "save_valid_freq": 10000, "save_filters_freq": 30000,
                        "cache_filters_freq": 50000, "save_metrics_freq": 200, "save_initial_filters": False,
                        "save_to_gfs": []},
        "load_params": {"host": "localhost", "port": 24444, "dbname": "imagenet", "collname": "alexnet",
                        "exp_id": "experiment_1", "do_restore": False, "load_query": None},
    }


def build_output(num_classes: int = 3, **_kwargs: Any) -> nn.Module:
    """LocalAggregation's model func (``build_output(inputs, train, **kw)`` in TF)."""
    return ImagesLinear(num_classes)


def rep_loss_func(inputs: dict[str, torch.Tensor], outputs: torch.Tensor, gpu_offset: int = 0) -> dict[str, Any]:
    """LocalAggregation's train targets: a representation norm."""
    return {"rep_norm": outputs.norm(dim=1).mean()}


def reg_loss(loss: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """LocalAggregation's agg_func: mean loss (weight decay lives in the optimizer in torch)."""
    return loss.mean()


def la_loss_func(output: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """LocalAggregation's loss_func(output, *a, **k): no targets (``pred_targets: []``)."""
    return output.pow(2).mean(dim=1)


def get_lr_from_boundary(global_step: int, init_lr: float, NUM_BATCHES_PER_EPOCH: int,
                         boundaries: list[int] | None) -> float:
    """LocalAggregation's learning rate: init_lr divided by 10 at each epoch boundary passed."""
    epoch = global_step // NUM_BATCHES_PER_EPOCH
    return init_lr * 0.1 ** sum(epoch >= b for b in (boundaries or []))


def valid_perf_func(inputs: dict[str, torch.Tensor], outputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """LocalAggregation's validation targets."""
    return {"top1": (outputs.argmax(dim=1) == inputs["labels"]).float().mean()}


def online_agg(agg: dict[str, list[Any]] | None, res: dict[str, Any], step: int) -> dict[str, list[Any]]:
    """LocalAggregation's online aggregation (a list per key)."""
    return online_agg_mean(agg, res, step)


def local_aggregation() -> dict[str, Any]:
    """B: github neuroailab/LocalAggregation ``param_setter.py`` (E3, 2019), on two GPUs."""
    location = {"host": "localhost", "port": 27009, "dbname": "la", "collname": "res18", "exp_id": "la_1"}
    return {
        "save_params": {**location, "do_save": True, "save_initial_filters": True, "save_metrics_freq": 1000,
                        "save_valid_freq": 10009, "save_filters_freq": 10009, "cache_filters_freq": 10009,
                        "cache_dir": "/tmp/la_cache"},
        "load_params": {**location, "do_restore": True, "query": None},
        "model_params": {"func": build_output, "num_gpus": 2, "devices": ["/gpu:0", "/gpu:1"]},
        "train_params": {
            "validate_first": False,
            "data_params": {"func": image_data, "image_dir": "/data/imagenet", "process_img_func": None,
                            "is_train": True, "q_cap": 51200, "batch_size": 128},
            "thres_loss": float("inf"),
            "num_steps": float("inf"),
            "train_loop": {"func": lambda sess, train_targets, **kw: None},
            "targets": {"func": rep_loss_func, "gpu_offset": 0},
        },
        "loss_params": {"pred_targets": [], "agg_func": reg_loss, "agg_func_kwargs": {"weight_decay": 1e-4},
                        "loss_func": la_loss_func},
        "learning_rate_params": {"func": get_lr_from_boundary, "init_lr": 0.03, "NUM_BATCHES_PER_EPOCH": 10009,
                                 "boundaries": [160, 190]},
        "optimizer_params": {"optimizer": torch.optim.SGD, "momentum": 0.9},
        "validation_params": {
            "topn": {"data_params": {"func": image_data, "group": "val", "batch_size": 100},
                     "targets": {"func": valid_perf_func}, "num_steps": 50000 // 100,
                     "agg_func": lambda x: {k: sum(v) / len(v) for k, v in x.items()},
                     "online_agg_func": online_agg},
        },
        "log_device_placement": False,
        "skip_check": True,
    }


def fit_model(layer: str = "fc", **_kwargs: Any) -> nn.Module:
    """unsup_vvs' neural-fitting model func (one of ~30 kwargs shown)."""
    return ImagesLinear(3)


def neural_loss(outputs: torch.Tensor, labels: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """unsup_vvs' per-case loss, old style (``loss_per_case_func``)."""
    return scale * F.cross_entropy(outputs, labels, reduction="none")


def unsup_vvs_neural_fit() -> dict[str, Any]:
    """C: github neuroailab/unsup_vvs ``neural_fit/fit_neural_data.py`` (E3), Adam variant with minibatching."""
    location = {"host": "localhost", "port": 27009, "dbname": "neuralfit", "collname": "v4", "exp_id": "fit_v4"}
    model_kwargs = {f"cfg_kwarg_{i}": i for i in range(28)}
    return {
        "save_params": {**location, "do_save": True, "save_metrics_freq": 50, "save_valid_freq": 500,
                        "save_filters_freq": 1000, "cache_filters_freq": 500, "cache_dir": "/tmp/fit",
                        "save_to_gfs": []},
        "load_params": {**location, "exp_id": "pretrained_res18", "do_restore": True,
                        "query": {"exp_id": "pretrained_res18", "saved_filters": True, "step": 320000},
                        "from_ckpt": None},
        "model_params": {"func": fit_model, "layer": "conv4", **model_kwargs, "num_gpus": 1, "devices": ["/gpu:0"]},
        "train_params": {
            "data_params": {"func": image_data, "batch_size": 64},
            "minibatch_size": 32,
            "thres_loss": float("inf"),
            "num_steps": 4000,
        },
        "loss_params": {"targets": ["labels"], "loss_per_case_func": neural_loss, "loss_per_case_func_params": {},
                        "loss_func_kwargs": {"scale": 2.0}},
        "learning_rate_params": {"learning_rate": 0.001, "decay_steps": 39, "decay_rate": 0.95, "staircase": True},
        "optimizer_params": {"func": ClipOptimizer, "optimizer_class": torch.optim.Adam, "clip": True,
                             "betas": (0.9, 0.999)},
        "validation_params": {"v4": {"data_params": {"func": image_data, "group": "val", "batch_size": 32},
                                     "targets": {"func": in_top_k, "k": 1}, "num_steps": 1,
                                     "agg_func": mean_dict}},
        "skip_check": True,
    }


def unsup_vvs_extract() -> dict[str, Any]:
    """C in test mode: feature extraction, ``{save_params, load_params, model_params, validation_params, skip_check, dont_run}``."""
    params = unsup_vvs_neural_fit()
    return {k: params[k] for k in ("save_params", "load_params", "model_params", "validation_params", "skip_check")} | {
        "dont_run": True}


def jerk_models_four() -> dict[str, Any]:
    """D: an E1/E2 script running four models over four GPUs: most groups lists of 4, one train_params."""
    base = {"host": "localhost", "port": 27017, "dbname": "future_pred", "collname": "jerk"}
    return {
        "save_params": [{**base, "exp_id": f"otrnn{i}", "save_to_gfs": ["pred"]} for i in range(1, 5)],
        "load_params": [{**base, "exp_id": f"otrnn{i}", "do_restore": True} for i in range(1, 5)],
        "model_params": [{"func": alexnet_model, "devices": [f"/gpu:{i}"]} for i in range(4)],
        "loss_params": [{"targets": ["labels"], "loss_per_case_func": neural_loss, "agg_func": torch.mean}] * 4,
        "learning_rate_params": [{"learning_rate": 1e-3, "decay_steps": 1000, "decay_rate": 0.95}] * 4,
        "optimizer_params": [{"func": ClipOptimizer, "optimizer_class": torch.optim.Adam, "clip": True}] * 4,
        "validation_params": [{"valid0": {"data_params": {"func": image_data, "group": "val", "batch_size": 8},
                                          "targets": {"func": in_top_k}, "num_steps": 2,
                                          "agg_func": lambda x: x}}] * 4,
        "train_params": {"data_params": {"func": image_data, "batch_size": 8, "n_threads": 4},
                         "queue_params": {"queue_type": "random", "batch_size": 8, "capacity": 80},
                         "num_steps": float("inf")},
        "inter_op_parallelism_threads": 500,
    }
