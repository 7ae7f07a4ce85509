"""Documents holding numpy arrays and torch tensors <-> a portable JSON form.

Every backend stores the output of :func:`encode`: plain JSON values (dicts with
string keys, lists, strings, finite numbers, booleans, null).  Anything else is
written as a tagged object ``{"$ptutils": kind, ...}``: arrays and tensors as
raw bytes + dtype + shape (inline base64 when small, an out-of-line blob with a
SHA-256 when large), tuples, bytes, datetimes, non-finite floats and integers
beyond 64 bits.  :func:`decode` restores the same types, dtypes, shapes and
values.  Nothing here ever uses pickle: bytes are only ever interpreted as the
numeric dtype recorded beside them.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .errors import CodecError, CorruptionError, StorageError

TAG = "$ptutils"
BLOB_THRESHOLD = 64 * 1024
"""Arrays, tensors and bytes larger than this many bytes go out of line as blobs."""

_INT64 = 2**63
_NUMPY_KINDS = "biufcmMSU"
_TORCH_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16,
        torch.float32, torch.float64, torch.complex32, torch.complex64, torch.complex128,
        torch.float8_e4m3fn, torch.float8_e5m2,
    )
}

PutBlob = Callable[[bytes], str]
GetBlob = Callable[[str], bytes]


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _pack(data: bytes, put_blob: PutBlob | None, threshold: int, path: str) -> dict:
    """Bytes inline (base64) or, when large and a blob store is given, as a blob ref."""
    if put_blob is not None and len(data) > threshold:
        return {"blob": put_blob(data), "nbytes": len(data), "sha256": _sha256(data)}
    return {"data": base64.b64encode(data).decode("ascii")}


def _unpack(obj: Mapping, get_blob: GetBlob | None, path: str) -> bytes:
    if "data" in obj:
        try:
            return base64.b64decode(obj["data"], validate=True)
        except (ValueError, TypeError) as exc:
            raise CorruptionError(path or "<root>", f"inline data is not valid base64 ({exc})") from exc
    if "blob" not in obj:
        raise CodecError(path, "tagged value has neither 'data' nor 'blob'")
    if get_blob is None:
        raise CodecError(path, f"value is stored in blob {obj['blob']!r} but no blob store was given")
    data = get_blob(obj["blob"])
    if len(data) != obj.get("nbytes") or _sha256(data) != obj.get("sha256"):
        raise CorruptionError(f"blob {obj['blob']!r} at {path or '<root>'}", "checksum mismatch (torn or corrupt)")
    return data


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def encode(value: Any, *, put_blob: PutBlob | None = None, threshold: int = BLOB_THRESHOLD, _path: str = "") -> Any:
    """Encode ``value`` into the portable form; large payloads go through ``put_blob``."""
    kind = type(value)
    if kind is str or kind is bool or value is None:  # exact types first: the common case, no ABC checks
        return value
    if kind is float and math.isfinite(value):
        return value
    if kind is int and -_INT64 <= value < _INT64:
        return value
    enc = lambda v, p: encode(v, put_blob=put_blob, threshold=threshold, _path=p)  # noqa: E731
    if isinstance(value, np.generic):
        # Before the Python scalars: np.float64, np.str_ and np.bytes_ subclass them.
        arr = np.asarray(value)
        if arr.dtype.kind not in _NUMPY_KINDS:
            raise CodecError(_path, f"numpy scalar of dtype {arr.dtype} cannot be stored")
        return {TAG: "npscalar", "dtype": arr.dtype.str, "data": base64.b64encode(arr.tobytes()).decode()}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if -_INT64 <= value < _INT64:
            return int(value)
        try:
            return {TAG: "int", "value": str(value)}
        except ValueError as exc:
            raise CodecError(_path, f"integer too large to store ({exc})") from exc
    if isinstance(value, float):
        value = float(value)
        return value if math.isfinite(value) else {TAG: "float", "value": repr(value)}
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError(_path, f"dict keys must be strings, got {type(key).__name__} {key!r}")
            if key.startswith("$") or "\x00" in key:
                raise CodecError(_key_path(_path, key), "keys may not start with '$' or contain NUL")
            kind = type(item)
            if (
                kind is str
                or kind is bool
                or item is None
                or (kind is float and math.isfinite(item))
                or (kind is int and -_INT64 <= item < _INT64)
            ):
                out[key] = item  # a plain JSON scalar: no call per value
            else:
                out[key] = enc(item, _key_path(_path, key))
        return out
    if isinstance(value, list):
        return [enc(v, f"{_path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [enc(v, f"{_path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, torch.Tensor):
        return _encode_tensor(value, put_blob, threshold, _path)
    if isinstance(value, np.ndarray):
        return _encode_ndarray(value, put_blob, threshold, _path)
    if isinstance(value, (bytes, bytearray)):
        return {TAG: "bytes", "type": type(value).__name__, **_pack(bytes(value), put_blob, threshold, _path)}
    if isinstance(value, _dt.datetime):
        return {TAG: "datetime", "iso": value.isoformat()}
    raise CodecError(_path, f"cannot store a {type(value).__module__}.{type(value).__qualname__}")


def _encode_ndarray(arr: np.ndarray, put_blob: PutBlob | None, threshold: int, path: str) -> dict:
    if arr.dtype.kind not in _NUMPY_KINDS or arr.dtype.fields is not None:
        raise CodecError(path, f"numpy arrays of dtype {arr.dtype} cannot be stored (no object/structured arrays)")
    data = np.ascontiguousarray(arr).tobytes()
    return {TAG: "ndarray", "dtype": arr.dtype.str, "shape": list(arr.shape), **_pack(data, put_blob, threshold, path)}


def _encode_tensor(t: torch.Tensor, put_blob: PutBlob | None, threshold: int, path: str) -> dict:
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        kind = "nested" if t.is_nested else "quantized" if t.is_quantized else str(t.layout)
        raise CodecError(path, f"only dense tensors can be stored, got a {kind} tensor")
    if t.is_meta:
        raise CodecError(path, "a tensor on the meta device has no values to store")
    name = str(t.dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise CodecError(path, f"tensors of dtype {t.dtype} cannot be stored")
    flat = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    out = {TAG: "tensor", "dtype": name, "shape": list(t.shape), **_pack(data, put_blob, threshold, path)}
    if isinstance(t, torch.nn.Parameter):
        out["parameter"] = True
    if t.requires_grad:
        out["requires_grad"] = True
    return out


_PLAIN = (str, int, float, bool, type(None))
"""Types decode() returns unchanged (checked by exact type: the common case, without ABC checks)."""


class Untagged(dict):
    """A stored document that its backend has seen to hold no tagged value: :func:`decode` only copies it.

    Backends build it when a cheap check on the serialized form proves there is
    nothing to decode (for JSON text: neither ``"$ptutils"`` nor any backslash
    escape occurs in it), which spares walking every value of every result.
    """

    __slots__ = ()


def decode(value: Any, *, get_blob: GetBlob | None = None, _path: str = "") -> Any:
    """Rebuild the original value from its portable form, fetching blobs with ``get_blob``."""
    if type(value) in _PLAIN:
        return value
    if type(value) is Untagged:
        return dict(value)
    if isinstance(value, list):
        return [decode(v, get_blob=get_blob, _path=f"{_path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, Mapping):
        return value
    kind = value.get(TAG)
    if kind is None:
        return {
            k: v if type(v) in _PLAIN else decode(v, get_blob=get_blob, _path=_key_path(_path, k))
            for k, v in value.items()
        }
    try:
        return _decode_tagged(kind, value, get_blob, _path)
    except StorageError:  # CodecError, CorruptionError, and get_blob's NotFoundError or disk errors
        raise
    except (LookupError, TypeError, ValueError, ArithmeticError, RuntimeError) as exc:
        raise CorruptionError(_path or "<root>", f"malformed {kind!r} value: {exc}") from exc


_OFFSET = re.compile(r"([+-])(\d\d):(\d\d)(?::(\d\d)(?:\.(\d{6}))?)?$")


def _datetime_from_iso(iso: str) -> _dt.datetime:
    """``datetime.fromisoformat``, with the UTC offset parsed here: Python 3.11 reads ``+00:00:00.000001`` as UTC."""
    value = _dt.datetime.fromisoformat(iso)
    offset = _OFFSET.search(iso) if value.tzinfo is not None else None
    if offset is None:
        return value
    sign, hours, minutes, seconds, micros = offset.groups()
    delta = _dt.timedelta(
        hours=int(hours), minutes=int(minutes), seconds=int(seconds or 0), microseconds=int(micros or 0)
    )
    return value.replace(tzinfo=_dt.timezone(-delta if sign == "-" else delta))


def _decode_tagged(kind: str, obj: Mapping, get_blob: GetBlob | None, path: str) -> Any:
    if kind == "tuple":
        return tuple(decode(v, get_blob=get_blob, _path=f"{path}[{i}]") for i, v in enumerate(obj["items"]))
    if kind == "int":
        if not isinstance(obj["value"], str):
            raise TypeError(f"expected the digits as a string, got {type(obj['value']).__name__}")
        return int(obj["value"])
    if kind == "float":
        if obj["value"] not in ("nan", "inf", "-inf"):
            raise ValueError(f"not a non-finite float: {obj['value']!r}")
        return float(obj["value"])
    if kind == "datetime":
        return _datetime_from_iso(obj["iso"])
    if kind == "bytes":
        data = _unpack(obj, get_blob, path)
        return bytearray(data) if obj.get("type") == "bytearray" else data
    if kind == "npscalar":
        dtype = _numpy_dtype(obj["dtype"], path)
        return np.frombuffer(base64.b64decode(obj["data"], validate=True), dtype=dtype)[0]
    if kind == "ndarray":
        dtype = _numpy_dtype(obj["dtype"], path)
        shape = _shape(obj["shape"], path)
        data = _unpack(obj, get_blob, path)
        _check_size(len(data), dtype.itemsize, shape, path)
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if kind == "tensor":
        dtype = _TORCH_DTYPES.get(obj["dtype"])
        if dtype is None:
            raise CodecError(path, f"unknown tensor dtype {obj['dtype']!r}")
        shape = _shape(obj["shape"], path)
        data = _unpack(obj, get_blob, path)
        itemsize = torch.empty((), dtype=dtype).element_size()
        _check_size(len(data), itemsize, shape, path)
        if data:
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
        else:
            t = torch.empty(shape, dtype=dtype)
        if obj.get("parameter"):
            return torch.nn.Parameter(t, requires_grad=bool(obj.get("requires_grad")))
        return t.requires_grad_(True) if obj.get("requires_grad") else t
    raise CodecError(path, f"unknown tagged kind {kind!r}")


def _numpy_dtype(text: Any, path: str) -> np.dtype:
    dtype = np.dtype(str(text))
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None:
        raise CodecError(path, f"refusing stored dtype {text!r}")
    return dtype


def _shape(shape: Any, path: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CorruptionError(path or "<root>", f"invalid shape {shape!r}")
    return tuple(shape)


def _check_size(nbytes: int, itemsize: int, shape: tuple[int, ...], path: str) -> None:
    expected = itemsize * math.prod(shape)
    if nbytes != expected:
        raise CorruptionError(path or "<root>", f"holds {nbytes} bytes, shape {list(shape)} needs {expected}")


def untagged_json(text: str) -> bool:
    """Whether JSON ``text`` certainly decodes to values without tags (no ``$ptutils``, no escapes at all)."""
    return TAG not in text and "\\" not in text


def blob_refs(encoded: Any) -> set[str]:
    """Ids of every blob an encoded document points to (to delete them with it)."""
    refs: set[str] = set()
    if type(encoded) is Untagged:
        return refs
    stack = [encoded]
    while stack:
        cur = stack.pop()
        if isinstance(cur, list):
            stack.extend(cur)
        elif isinstance(cur, Mapping):
            if TAG in cur and isinstance(cur.get("blob"), str):
                refs.add(cur["blob"])
            stack.extend(v for k, v in cur.items() if k != "blob")
    return refs
