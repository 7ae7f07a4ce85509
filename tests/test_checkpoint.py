"""The checkpoint format: safetensors round trips, interoperability, the zero-copy load, strict parsing."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import safetensors.torch
import torch

from ptutils import checkpoint as ckpt
from ptutils import open_db
from ptutils.checkpoint import CheckpointStore, deserialize, serialize, serialize_parts
from ptutils.errors import CorruptionError


def mixed_state() -> dict:
    """Every dtype family, odd sizes (so the layout needs care to stay aligned), views and nesting."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return {
        "bytes3": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "f64": base,
        "f32_view": base.t().float(),
        "strided": base[:, ::2],
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(3, generator=g).half(),
        "i8": torch.tensor([-1, 5, 7], dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "c128": torch.randn(2, generator=g, dtype=torch.complex128),  # no safetensors dtype: stored as bytes
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "i64": torch.arange(5),
        "opt": {0: {"step": torch.tensor(10.0), "exp_avg": torch.ones(3)}, 1: (torch.zeros(2), "x", 2.5)},
        "rng": np.random.RandomState(1).get_state(),
    }


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    else:
        assert a == b


def tensors_of(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def test_round_trip_keeps_dtypes_shapes_values_and_structure() -> None:
    state = mixed_state()
    loaded = deserialize(serialize(state))
    rng = loaded.pop("rng")
    expected_rng = state.pop("rng")
    assert rng[0] == expected_rng[0] and np.array_equal(rng[1], expected_rng[1]) and tuple(rng[2:]) == expected_rng[2:]
    assert_same(state, loaded)


def test_loaded_tensors_share_one_writable_buffer_each_aligned_and_disjoint() -> None:
    buf = bytearray(serialize(mixed_state()))
    loaded = deserialize(buf)
    spans = []
    for t in tensors_of(loaded):
        if t.numel():
            assert t.data_ptr() % t.element_size() == 0, t.dtype
            spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two tensors overlap
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    assert all(base <= start and end <= base + len(buf) for start, end in spans)  # no copy was made
    loaded["i64"].add_(1)  # writable, and a write lands in the buffer only
    assert torch.equal(loaded["i64"], torch.arange(1, 6))
    assert torch.equal(deserialize(bytes(buf))["i64"], torch.arange(1, 6))


def test_read_only_input_is_copied_so_tensors_stay_writable() -> None:
    data = serialize({"w": torch.arange(4.0)})
    loaded = deserialize(data)
    loaded["w"].mul_(2)
    assert torch.equal(deserialize(data)["w"], torch.arange(4.0))


def test_serialize_is_a_snapshot_and_the_parts_are_the_same_bytes() -> None:
    state = {"w": torch.arange(6.0), "n": 3}
    parts = serialize_parts(state)
    data = serialize(state)
    assert b"".join(parts) == data and data.readonly
    state["w"].add_(100)
    assert torch.equal(deserialize(data)["w"], torch.arange(6.0))
    assert torch.equal(deserialize(b"".join(parts))["w"], torch.arange(6.0) + 100)  # parts alias the tensors


def test_files_interoperate_with_the_safetensors_library() -> None:
    state = {"a": torch.arange(3, dtype=torch.int16), "b": torch.ones(2, 2), "c": torch.tensor([1.0], dtype=torch.float64)}
    ours = bytes(serialize(state))
    theirs = safetensors.torch.load(ours)
    assert sorted(theirs) == ["t0", "t1", "t2"] and torch.equal(theirs["t1"], state["b"])
    structure = {k: {"$ptutils": "ref", "key": f"t{i}"} for i, k in enumerate(state)}
    written = safetensors.torch.save(
        {f"t{i}": t for i, t in enumerate(state.values())},
        metadata={"format": ckpt.FORMAT, "structure": json.dumps(structure)},
    )
    assert_same(state, deserialize(written))


def safetensors_bytes(entries: dict, payload: bytes, metadata: dict | None = None) -> bytes:
    header = {"__metadata__": metadata or {"format": ckpt.FORMAT, "structure": json.dumps({})}, **entries}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + payload


MALFORMED = {
    "gap between tensors": safetensors_bytes(
        {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]}},
        b"\0" * 5,
    ),
    "overlapping tensors": safetensors_bytes(
        {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}},
        b"\0" * 4,
    ),
    "size does not match the shape": safetensors_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "unknown dtype": safetensors_bytes({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
    "negative dimension": safetensors_bytes({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b""),
    "offsets reversed": safetensors_bytes({"a": {"dtype": "U8", "shape": [0], "data_offsets": [2, 0]}}, b""),
    "bool byte other than 0/1": safetensors_bytes({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02"),
    "trailing bytes": safetensors_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0\0"),
    "header length past the end": struct.pack("<Q", 1 << 40) + b"{}",
    "header not an object": struct.pack("<Q", 8) + b"[]      ",
    "header not UTF-8": struct.pack("<Q", 8) + b'{"\xff":1}  ',
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_are_corruption(case: str) -> None:
    with pytest.raises(CorruptionError, match="malformed-case"):
        deserialize(MALFORMED[case], "malformed-case")


def test_a_store_loads_what_it_saved_and_the_tensors_are_writable(tmp_path) -> None:
    store = CheckpointStore(open_db(tmp_path.as_uri()), "s", keep=2)
    state = mixed_state()
    state.pop("rng")
    big = torch.randn(600_000)  # over the size hashed on a helper thread
    first = store.save({**state, "big": big}, step=1)
    assert first["nbytes"] == len(serialize({**state, "big": big}))
    loaded, record = store.load_latest()
    assert record["_id"] == first["_id"]
    assert_same({**state, "big": big}, loaded)
    loaded["big"].zero_()
    assert torch.equal(store.read(first)["big"], big)


def _draws() -> tuple:
    return random.random(), float(np.random.random()), float(torch.rand(1))


def test_seed_everything_seeds_as_torch_manual_seed_does() -> None:
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    expected = _draws()
    ckpt.seed_everything(7)
    assert _draws() == expected
    ckpt.seed_everything(8)
    assert _draws() != expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seed_everything_seeds_every_cuda_device() -> None:
    torch.manual_seed(7)
    expected = torch.rand(4, device="cuda")
    ckpt.seed_everything(8)
    ckpt.seed_everything(7)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


@pytest.mark.parametrize("python_state", ["array", "ints (older checkpoints)"])
def test_rng_state_round_trips_through_a_checkpoint(python_state: str) -> None:
    ckpt.seed_everything(3)
    _draws()
    state = ckpt.rng_state()
    if python_state != "array":
        state["python"] = random.getstate()  # how older checkpoints stored the Mersenne Twister words
    stored = deserialize(bytes(serialize({"rng": state})))["rng"]
    expected = _draws()
    ckpt.seed_everything(99)
    ckpt.set_rng_state(stored)
    assert _draws() == expected


def test_a_store_keeps_the_newest_unpinned_checkpoints_of_its_own_session_only(tmp_path) -> None:
    db = open_db(tmp_path.as_uri())
    first = CheckpointStore(db, "s", keep=2)
    other = CheckpointStore(db, "other", keep=2)
    first.save({"w": torch.zeros(2)}, pinned=True, step=0, reason="initial")
    for step in range(1, 4):
        first.save({"w": torch.full((2,), float(step))}, step=step)
        other.save({"w": torch.ones(2)}, step=step)
    assert [r["step"] for r in first.records()] == [3, 2, 0]
    assert [r["step"] for r in other.records()] == [3, 2]

    resumed = CheckpointStore(db, "s", keep=2)  # a new process picks the session up
    resumed.save({"w": torch.full((2,), 4.0)}, step=4)
    assert [r["step"] for r in resumed.records()] == [4, 3, 0]
    assert len(list((tmp_path / "checkpoints" / "blobs").iterdir())) == 3 + 2
    state, record = resumed.load_latest()
    assert record["step"] == 4 and torch.equal(state["w"], torch.full((2,), 4.0))


@pytest.mark.parametrize("mode, values, best", [("min", [0.5, 0.2, 0.4, 0.3, 0.6], 2), ("max", [0.5, 0.9, 0.4, 0.3, 0.6], 2)])
def test_keep_best_keeps_the_best_checkpoint_beside_the_last_k_through_pruning_and_resume(
    tmp_path, mode: str, values: list[float], best: int
) -> None:
    db = open_db(tmp_path.as_uri())
    store = CheckpointStore(db, "s", keep=2, keep_best="val_loss", best_mode=mode)
    for step, value in enumerate(values[:4], start=1):
        store.save({"w": torch.full((2,), float(step))}, step=step, metrics={"val_loss": value, "loss": 9.0})
    assert [r["step"] for r in store.records()] == [4, 3, best]
    assert store.find("best")["best_by"] == {"metric": "val_loss", "mode": mode, "value": values[best - 1]}

    resumed = CheckpointStore(db, "s", keep=2, keep_best="val_loss", best_mode=mode)  # a new process
    resumed.save({"w": torch.full((2,), 5.0)}, step=5, metrics={"val_loss": values[4]})
    resumed.save({"w": torch.full((2,), 6.0)}, step=6, metrics={"val_loss": float("nan")})  # unranked
    assert [r["step"] for r in resumed.records()] == [6, 5, best]
    assert torch.equal(resumed.read(resumed.find("best"))["w"], torch.full((2,), float(best)))
    assert len(list((tmp_path / "checkpoints" / "blobs").iterdir())) == 3


def test_a_new_best_lets_the_old_one_be_pruned(tmp_path) -> None:
    store = CheckpointStore(open_db(tmp_path.as_uri()), "s", keep=1, keep_best="acc", best_mode="max")
    for step, acc in enumerate([0.5, 0.4, 0.7, 0.6], start=1):
        store.save({"w": torch.zeros(1)}, step=step, metrics={"acc": acc})
    assert [r["step"] for r in store.records()] == [4, 3]
    with pytest.raises(ValueError, match="best_mode must be 'min' or 'max', got 'lowest'"):
        CheckpointStore(open_db(tmp_path.as_uri()), "s", keep_best="acc", best_mode="lowest")


@pytest.mark.parametrize("garbled", [
    "junk",
    {"metric": "val_loss", "mode": "min"},
    {"metric": 1, "mode": "min", "value": 0.1},
    {"metric": "val_loss", "mode": "low", "value": 0.1},
])
def test_a_garbled_ranking_is_no_best_checkpoint(tmp_path, garbled) -> None:
    store = CheckpointStore(open_db(tmp_path.as_uri()), "s", keep=1)
    store.save({"w": torch.zeros(1)}, step=1, best_by=garbled)
    with pytest.raises(ckpt.CheckpointError, match="ranked no checkpoint"):
        store.find("best")
    ranked = CheckpointStore(open_db(tmp_path.as_uri()), "s", keep=1, keep_best="val_loss")  # a new process
    ranked.save({"w": torch.ones(1)}, step=2, metrics={"val_loss": 0.5})
    assert ranked.find("best")["step"] == 2


# ---------------------------------------------------------------------- clones: one blob, two sessions
def test_a_clone_points_at_the_donors_blob_and_applies_its_values(tmp_path):
    db = open_db((tmp_path / "db").as_uri())
    donor = CheckpointStore(db, "donor", keep=1)
    donor_record = donor.save({"w": torch.arange(4.0)}, step=8, attempt=1, stage="train")
    recipient = CheckpointStore(db, "recipient", keep=1)
    recipient.save({"w": torch.zeros(4)}, step=8, attempt=1, stage="train")
    clone = recipient.clone(donor_record, decision="r0", attempt=1, apply={"model.optimizer.lr": 0.5})
    assert clone["blob"] == donor_record["blob"] and clone["seq"] == 1
    assert clone["cloned_from"]["checkpoint"] == donor_record["_id"] and clone["apply"] == {"model.optimizer.lr": 0.5}
    state, record = recipient.load_latest()
    assert record["_id"] == clone["_id"] and torch.equal(state["w"], torch.arange(4.0))
    assert recipient.clone(donor_record, decision="r0", attempt=1)["_id"] == clone["_id"]  # redone: no new record
    assert len(recipient.records()) == 2


def test_a_held_checkpoint_outlives_pruning_until_the_holder_has_its_own(tmp_path):
    db = open_db((tmp_path / "db").as_uri())
    donor = CheckpointStore(db, "donor", keep=1)
    held = donor.save({"w": torch.ones(2)}, step=4, attempt=1)
    recipient = CheckpointStore(db, "recipient", keep=1)
    recipient.clone(held, decision="r0", attempt=1)
    donor.save({"w": torch.full((2,), 2.0)}, step=8, attempt=1)  # would prune the held one
    assert db.collection("checkpoints").exists(held["_id"])
    assert ckpt.release_holds(db, "recipient") == []  # the recipient still continues from it
    recipient.save({"w": torch.full((2,), 3.0)}, step=8, attempt=1)  # its own: prunes the clone, not the blob
    assert db.collection("checkpoints").get_blob(held["blob"])
    assert ckpt.release_holds(db, "recipient") == [held["_id"]]
    donor.save({"w": torch.full((2,), 4.0)}, step=12, attempt=1)
    assert not db.collection("checkpoints").exists(held["_id"])
    assert [r["step"] for r in donor.records()] == [12]
