"""Property tests of the document codec: exact round trips, plain-JSON output, and no pickle ever."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

from ptutils import codec
from ptutils.codec import TAG, blob_refs, decode, encode
from ptutils.errors import CodecError, CorruptionError, NotFoundError, StorageError
from ptutils.testing.assertions import assert_identical

from .support.storage_helpers import Detonator

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ strategies
numpy_dtypes = st.one_of(
    npst.scalar_dtypes(),
    npst.byte_string_dtypes(max_len=6),
    npst.unicode_string_dtypes(max_len=6),
    npst.integer_dtypes(endianness=">") | npst.floating_dtypes(endianness=">") | npst.complex_number_dtypes(endianness=">"),
)
numpy_arrays = numpy_dtypes.flatmap(
    lambda d: npst.arrays(d, npst.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
)
TORCH_DTYPES = sorted(codec._TORCH_DTYPES.values(), key=str)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Any dtype the codec knows, any shape incl. 0-d and empty, arbitrary bit patterns (NaN payloads too)."""
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(npst.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    if not raw:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    if draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous
    return t


timezones = st.one_of(
    st.none(),
    st.just(dt.timezone.utc),
    st.builds(dt.timezone, st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23))),
)
keys = st.text(max_size=8).filter(lambda k: not k.startswith("$") and "\x00" not in k)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: beyond 64 bits too
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=40),
    st.binary(max_size=40).map(bytearray),
    st.datetimes(timezones=timezones),
    numpy_arrays,
    tensors(),
    numpy_arrays.filter(lambda a: a.ndim > 0 and a.size > 0).map(lambda a: a.reshape(-1)[0]),  # numpy scalars
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(keys, inner, max_size=4),
    ),
    max_leaves=12,
)
documents = st.dictionaries(keys, values, max_size=5)


def is_plain_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, str)):
        return type(value) in (type(None), bool, str)
    if type(value) is int:
        return -(2**63) <= value < 2**63
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is list:
        return all(is_plain_json(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and is_plain_json(v) for k, v in value.items())
    return False


class BlobStore(dict):
    """A dict blob store: put returns a fresh id, get raises NotFoundError like a DBInterface."""

    def put(self, data: bytes) -> str:
        blob_id = f"b{len(self)}"
        self[blob_id] = bytes(data)
        return blob_id

    def get(self, blob_id: str) -> bytes:  # type: ignore[override]
        if blob_id not in self:
            raise NotFoundError("blob", blob_id)
        return self[blob_id]


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("offset", [dt.timedelta(microseconds=1), dt.timedelta(microseconds=-1), dt.timedelta(hours=-3, microseconds=5),
                                    dt.timedelta(seconds=30), dt.timedelta(0)])
def test_a_datetime_keeps_its_utc_offset_to_the_microsecond(offset):
    when = dt.datetime(2000, 1, 1, tzinfo=dt.timezone(offset))  # Python 3.11 parses +00:00:00.000001 back as UTC
    assert_identical(when, decode(encode(when)))


@SETTINGS
@given(documents)
def test_round_trip_in_memory_is_exact(doc: dict) -> None:
    assert_identical(doc, decode(encode(doc)))


@SETTINGS
@given(documents, st.integers(0, 64))
def test_round_trip_through_json_text_and_blobs_is_exact(doc: dict, threshold: int) -> None:
    store = BlobStore()
    encoded = encode(doc, put_blob=store.put, threshold=threshold)
    assert is_plain_json(encoded)
    text = json.dumps(encoded, allow_nan=False)
    restored = json.loads(text)
    assert blob_refs(restored) == set(store)
    assert_identical(doc, decode(restored, get_blob=store.get))


@SETTINGS
@given(numpy_arrays)
def test_arrays_over_the_threshold_go_to_blobs_and_smaller_ones_stay_inline(arr: np.ndarray) -> None:
    store = BlobStore()
    threshold = 16
    encoded = encode({"a": arr}, put_blob=store.put, threshold=threshold)["a"]
    assert encoded[TAG] == "ndarray" and encoded["dtype"] == arr.dtype.str and encoded["shape"] == list(arr.shape)
    if arr.nbytes > threshold:
        assert set(store) == {encoded["blob"]} and encoded["nbytes"] == arr.nbytes
        assert encoded["sha256"] == hashlib.sha256(store[encoded["blob"]]).hexdigest()
        assert "data" not in encoded
    else:
        assert not store and base64.b64decode(encoded["data"]) == np.ascontiguousarray(arr).tobytes()


def test_threshold_boundary_is_exclusive() -> None:
    store = BlobStore()
    at = encode(np.zeros(8, np.uint8), put_blob=store.put, threshold=8)
    over = encode(np.zeros(9, np.uint8), put_blob=store.put, threshold=8)
    assert "data" in at and "blob" in over and len(store) == 1


def test_specific_values_keep_their_exact_types() -> None:
    doc = {
        "np_float64_nan": np.float64("nan"),  # a nan loss must not make the record unloadable
        "np_float64": np.float64(1.5),
        "np_float32": np.float32(-0.0),
        "np_int64": np.int64(-(2**63)),
        "np_uint64": np.uint64(2**64 - 1),
        "np_bool": np.bool_(True),
        "np_str": np.str_("ü"),
        "np_bytes": np.bytes_(b"ab"),
        "np_datetime": np.datetime64("2024-02-29T12:00", "m"),
        "np_complex": np.complex64(1 - 2j),
        "py_numbers": [1, 1.0, True],
        "int_edges": [2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**100],
        "floats": [float("nan"), float("inf"), -float("inf"), -0.0, 5e-324],
        "conj": torch.complex(torch.ones(2), torch.arange(2.0)).conj(),
        "bf16_0d": torch.tensor(3.5, dtype=torch.bfloat16),
        "param": torch.nn.Parameter(torch.ones(2)),
        "tuple_of_tuple": ((), (1,), ((2,),)),
        "naive": dt.datetime(2020, 1, 1, 0, 0, 0, 1),
    }
    restored = decode(json.loads(json.dumps(encode(doc), allow_nan=False)))
    doc["conj"] = doc["conj"].resolve_conj()
    assert_identical(doc, restored)
    assert type(restored["int_edges"][2]) is int and type(restored["py_numbers"][1]) is float


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_restored_on_cpu() -> None:
    t = torch.arange(6.0, device="cuda").reshape(2, 3).to(torch.bfloat16)
    restored = decode(encode({"t": t}))["t"]
    assert restored.device.type == "cpu"
    assert_identical(t.cpu(), restored)


# ------------------------------------------------------------------ refusals
class Opaque:
    pass


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (lambda: {"a": {"b": [1, Opaque()]}}, "a.b[1]"),
        (lambda: {"a": (1, {2, 3})}, "a[1]"),
        (lambda: {"x": 1 + 2j}, "x"),
        (lambda: {"f": print}, "f"),
        (lambda: {"arr": np.array([None], dtype=object)}, "arr"),
        (lambda: {"rec": np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])}, "rec"),
        (lambda: {"v": np.void(b"\x00\x01")}, "v"),
        (lambda: {"sparse": torch.eye(2).to_sparse()}, "sparse"),
        (lambda: {"csr": torch.eye(3).to_sparse_csr()}, "csr"),
        (lambda: {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)}, "q"),
        (lambda: {"nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}, "nested"),
        (lambda: {"meta": torch.empty(3, device="meta")}, "meta"),
        (lambda: {"a": {"$where": 1}}, "a.$where"),
        (lambda: {"a": {"nul\x00key": 1}}, "a.nul\x00key"),
        (lambda: {"a": {1: "int key"}}, "a"),
        (lambda: {"big": 10**5000}, "big"),
        (lambda: {"date_only": dt.date(2020, 1, 1)}, "date_only"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unstorable_values_raise_codec_error_with_the_key_path(make: Any, path: str) -> None:
    with pytest.raises(CodecError) as info:
        encode(make())
    assert info.value.path == path


@SETTINGS
@given(st.lists(keys.filter(bool), min_size=1, max_size=4))
def test_codec_error_path_names_the_nested_key(path: list[str]) -> None:
    doc: Any = Opaque()
    for key in reversed(path):
        doc = {key: doc}
    with pytest.raises(CodecError) as info:
        encode(doc)
    assert info.value.path == ".".join(path)


# ------------------------------------------------------------------ hostile stored data
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=6))
field_values = st.one_of(
    json_scalars,
    st.lists(st.integers(-3, 10), max_size=4),
    st.sampled_from(["<f8", "|u1", "O", "V8", "i4,i4", "(2,)i4", "float32", "bfloat16", "object", "M8[D]", "nan", "AAAA", "!!"]),
    st.binary(max_size=24).map(lambda b: base64.b64encode(b).decode()),
)
tagged = st.fixed_dictionaries(
    {TAG: st.sampled_from(["ndarray", "tensor", "npscalar", "bytes", "tuple", "int", "float", "datetime", "pickle", "object", "", "x"])},
    optional={
        k: field_values for k in ("dtype", "shape", "data", "blob", "nbytes", "sha256", "items", "value", "iso", "type")
    },
)
hostile = st.recursive(
    st.one_of(json_scalars, tagged),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile)
def test_decoding_arbitrary_stored_data_only_ever_raises_storage_errors(stored: Any) -> None:
    store = BlobStore(x=b"\x00" * 8, AAAA=pickle.dumps([1, 2]))
    try:
        decode(stored, get_blob=store.get)
    except StorageError:
        pass


@pytest.mark.parametrize(
    "stored",
    [
        {TAG: "npscalar", "dtype": "<f8", "data": ""},
        {TAG: "int", "value": float("inf")},
        {TAG: "int", "value": 1e300},
        {TAG: "int", "value": "1" * 5000},
        {TAG: "float", "value": "1.5"},
        {TAG: "datetime", "iso": "yesterday"},
        {TAG: "ndarray", "dtype": "<f8", "shape": [-1], "data": ""},
        {TAG: "tensor", "dtype": "float32", "shape": [2], "data": "AAAA"},
    ],
    ids=repr,
)
def test_malformed_tagged_values_are_corruption(stored: dict) -> None:
    with pytest.raises(CorruptionError):
        decode({"k": stored})


def test_blob_checksum_and_size_are_verified() -> None:
    data = np.arange(100, dtype=np.float64).tobytes()
    ref = {TAG: "ndarray", "dtype": "<f8", "shape": [100], "blob": "b", "nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert decode(ref, get_blob=lambda _: data).sum() == 4950
    flipped = bytearray(data)
    flipped[5] ^= 1
    for bad in (bytes(flipped), data[:-8], data + b"\x00" * 8):
        with pytest.raises(CorruptionError, match="blob 'b'"):
            decode(ref, get_blob=lambda _, bad=bad: bad)
    with pytest.raises(CodecError):
        decode(ref)  # no blob store given
    with pytest.raises(NotFoundError):  # a missing blob stays a NotFoundError for the caller to judge
        decode(ref, get_blob=BlobStore().get)


def test_a_planted_pickle_payload_is_never_executed(tmp_path: Path, no_unpickling: None) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Detonator(marker))
    # the payload is live: real unpickling would create the marker (checked in a throwaway copy)
    probe = tmp_path / "probe"
    pickle._loads(pickle.dumps(Detonator(probe)))  # type: ignore[attr-defined]  # the pure-Python unpickler
    assert probe.exists()
    probe.unlink()

    digest = hashlib.sha256(payload).hexdigest()
    store = BlobStore(evil=payload)
    inline = base64.b64encode(payload).decode()
    blob = {"blob": "evil", "nbytes": len(payload), "sha256": digest}
    attempts = {
        "ndarray_u1_blob": {TAG: "ndarray", "dtype": "|u1", "shape": [len(payload)], **blob},
        "ndarray_u1_inline": {TAG: "ndarray", "dtype": "|u1", "shape": [len(payload)], "data": inline},
        "tensor_u8_blob": {TAG: "tensor", "dtype": "uint8", "shape": [len(payload)], **blob},
        "bytes_blob": {TAG: "bytes", **blob},
        "ndarray_object": {TAG: "ndarray", "dtype": "O", "shape": [1], **blob},
        "ndarray_object_inline": {TAG: "ndarray", "dtype": "|O", "shape": [1], "data": inline},
        "npscalar_object": {TAG: "npscalar", "dtype": "O", "data": inline},
        "ndarray_f8_wrong_size": {TAG: "ndarray", "dtype": "<f8", "shape": [3], **blob},
        "tensor_unknown_dtype": {TAG: "tensor", "dtype": "object", "shape": [1], **blob},
        "unknown_kind_pickle": {TAG: "pickle", "data": inline},
        "unknown_kind_torch": {TAG: "torch.save", **blob},
        "tuple_of_pickle": {TAG: "tuple", "items": [{TAG: "pickle", "data": inline}]},
    }
    outcomes = {}
    for name, stored in attempts.items():
        try:
            result = decode({"x": stored}, get_blob=store.get)["x"]
        except (CodecError, CorruptionError) as exc:
            outcomes[name] = type(exc).__name__
        else:
            outcomes[name] = type(result).__name__
            if isinstance(result, (np.ndarray, torch.Tensor)):  # plain numbers: the payload's bytes, inert
                assert bytes(np.asarray(result).astype(np.uint8).tobytes()) == payload
            else:
                assert result == payload
    assert not marker.exists()
    assert outcomes == {
        "ndarray_u1_blob": "ndarray",
        "ndarray_u1_inline": "ndarray",
        "tensor_u8_blob": "Tensor",
        "bytes_blob": "bytes",
        "ndarray_object": "CodecError",
        "ndarray_object_inline": "CodecError",
        "npscalar_object": "CodecError",
        "ndarray_f8_wrong_size": "CorruptionError",
        "tensor_unknown_dtype": "CodecError",
        "unknown_kind_pickle": "CodecError",
        "unknown_kind_torch": "CodecError",
        "tuple_of_pickle": "CodecError",
    }


# ------------------------------------------------------------------ untagged fast path
def test_untagged_documents_decode_to_equal_plain_dicts() -> None:
    stored = codec.Untagged({"_id": "a", "metrics": {"loss": 0.5}, "tags": ["x", 1, None]})
    out = decode(stored)
    assert type(out) is dict and out == stored
    assert blob_refs(stored) == set()


@pytest.mark.parametrize(
    "text, untagged",
    [
        ('{"a":1,"b":{"c":"d"}}', True),
        ('{"a":{"$ptutils":"tuple","items":[]}}', False),
        ('{"a":{"\\u0024ptutils":"tuple","items":[]}}', False),  # an escaped tag still takes the full decode
        ('{"a":"line\\nbreak"}', False),
        ('{"note":"mentions $ptutils"}', False),  # a false alarm only costs the full decode
    ],
)
def test_untagged_json_is_only_claimed_when_certain(text: str, untagged: bool) -> None:
    assert codec.untagged_json(text) is untagged
    if not untagged:
        assert decode(json.loads(text)) is not None
