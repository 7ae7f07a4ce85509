"""Exact equality of stored values: types, dtypes, shapes and bits, not just ``==``.

A backend that hands back an int for a float, a float32 array for a float64
one, ``0.0`` for ``-0.0`` or a copy of a tensor on another device compares
equal under ``==`` (or fails to compare at all) yet has lost something;
:func:`assert_identical` names the path where the two values part.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values (bitwise comparison works for every dtype)."""
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def numpy_bytes(value: np.ndarray | np.generic) -> bytes:
    """The bytes that carry a numpy value (x87 long doubles have padding bytes that do not)."""
    arr = np.asarray(value)
    if arr.dtype.type in (np.longdouble, np.clongdouble):
        return repr([str(v) for v in arr.reshape(-1)]).encode() + arr.dtype.str.encode()
    return arr.tobytes()


def assert_identical(expected: Any, actual: Any, path: str = "doc") -> None:
    """Assert ``actual`` has exactly ``expected``'s types, dtypes, shapes and (bitwise) values.

    Mapping key order is not compared: JSON stores may reorder keys.
    """
    assert type(actual) is type(expected), f"{path}: type {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.device.type == "cpu", f"{path}: restored on {actual.device}"
        assert actual.requires_grad == expected.requires_grad, f"{path}: requires_grad differs"
        assert tensor_bytes(actual) == tensor_bytes(expected), f"{path}: values differ"
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert actual.dtype.str == expected.dtype.str, f"{path}: dtype {actual.dtype.str} != {expected.dtype.str}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert numpy_bytes(actual) == numpy_bytes(expected), f"{path}: values {actual!r} != {expected!r}"
    elif isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{path}: {actual!r} is not nan"
        else:
            assert actual == expected and math.copysign(1, actual) == math.copysign(1, expected), (
                f"{path}: {actual!r} != {expected!r}"
            )
    elif isinstance(expected, Mapping):
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_identical(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_identical(e, a, f"{path}[{i}]")
    elif isinstance(expected, dt.datetime):
        assert actual == expected and actual.utcoffset() == expected.utcoffset(), f"{path}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def stored_body(doc: Mapping[str, Any]) -> dict:
    """A loaded document without the store's ``_id`` and ``_version``."""
    return {k: v for k, v in doc.items() if k not in ("_id", "_version")}
