"""Compatibility with TFUtils: its params dicts, defaults and save schedule, for PyTorch callables.

:func:`train_from_params` and :func:`test_from_params` run TFUtils params dicts on ptutils
Sessions and write TFUtils' records (:mod:`.train`, :mod:`.evaluate`, :mod:`.records`).
Underneath: :func:`normalize` turns a TFUtils params
dict (any of its three eras' shapes) into a typed :class:`Params`; :mod:`.schedule`
gives TFUtils' save schedule in closed form; :mod:`.aggregation` has its validation
helpers.  Importing this package needs no database driver.
"""

from .aggregation import append_and_return, identity_func, mean_dict, reduce_mean_dict, to_plain
from .defaults import ClipOptimizer, cross_entropy_per_case, exponential_decay, get_loss_dict, mean_loss
from .groups import (
    FuncSpec, LearningRateGroup, LoadGroup, LossGroup, ModelGroup, OptimizerGroup, SaveGroup, TrainGroup,
    ValidationSet,
)
from .losses import compute_loss
from .params import Params, check_arguments, model_kwargs, normalize

__all__ = [
    "ClipOptimizer", "FuncSpec", "LearningRateGroup", "LoadGroup", "LossGroup", "ModelGroup", "OptimizerGroup",
    "Params", "SaveGroup", "TrainGroup", "ValidationSet", "append_and_return", "check_arguments", "compute_loss",
    "cross_entropy_per_case", "exponential_decay", "get_loss_dict", "identity_func", "mean_dict", "mean_loss",
    "model_kwargs", "normalize", "reduce_mean_dict", "to_plain",
]

from .records import load_gfs_items, open_records  # noqa: E402
from .train import HiLossError, NanLossError, train_from_params  # noqa: E402

__all__ += ["HiLossError", "NanLossError", "load_gfs_items", "open_records", "train_from_params"]
from .evaluate import test_from_params  # noqa: E402

__all__ += ["test_from_params"]
