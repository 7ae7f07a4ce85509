"""Atomic, checksummed checkpoints in any DBInterface, and the RNG state for exact resume.

*What* is saved is a nested dict (model/optimizer/scheduler state, RNG states,
loop position, update states); *where* is a DBInterface (its blob store holds
the bytes, a small record in its ``checkpoints`` collection points to them) —
Ignite's split between the objects and the save handler.

A checkpoint blob is a safetensors file: every tensor is a safetensors entry,
and the rest of the structure (numbers, strings, numpy RNG arrays) is JSON from
:mod:`ptutils.codec` in the safetensors metadata.  Loading parses it with
``safetensors`` — never pickle.  The record, written *after* the blob, carries
the blob's SHA-256 and size: a torn, truncated or bit-flipped checkpoint fails
verification and the previous one is used instead (with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import struct
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import safetensors.torch
import torch

from . import codec
from .database import DBInterface
from .errors import CheckpointError, CorruptionError, NotFoundError, StorageError

log = logging.getLogger("ptutils")

FORMAT = "ptutils-checkpoint/1"
_ST_DTYPES = {dtype: name for name, dtype in safetensors.torch._TYPES.items()}
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptutils-hash")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
_REF = "$ptutils"


def _flatten(obj: Any, tensors: list[torch.Tensor], path: str) -> Any:
    """Replace tensors by references into ``tensors``; encode everything else with the codec."""
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise CheckpointError(f"{path}: only dense tensors can be checkpointed")
        ref: dict[str, Any] = {_REF: "ref", "key": f"t{len(tensors)}"}
        if obj.dtype not in _ST_DTYPES:
            ref.update(dtype=str(obj.dtype).removeprefix("torch."), shape=list(obj.shape))
        tensors.append(obj)
        return ref
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        # Non-string keys (an optimizer's per-parameter state is keyed by int).
        items = [[codec.encode(k, _path=path), _flatten(v, tensors, f"{path}[{k!r}]")] for k, v in obj.items()]
        return {_REF: "items", "items": items}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {_REF: "tuple", "items": [_flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    return codec.encode(obj, _path=path)


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if not isinstance(obj, Mapping):
        return obj
    kind = obj.get(_REF)
    if kind is None:
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if kind == "ref":
        t = tensors[obj["key"]]
        if "dtype" in obj:
            t = t.view(codec._TORCH_DTYPES[obj["dtype"]]).reshape(obj["shape"])
        return t
    if kind == "items":
        return {codec.decode(k): _unflatten(v, tensors) for k, v in obj["items"]}
    if kind == "tuple":
        return tuple(_unflatten(v, tensors) for v in obj["items"])
    return codec.decode(obj)


def serialize(state: Mapping[str, Any]) -> bytes:
    """A safetensors file holding ``state``: tensors as entries, the rest as JSON metadata."""
    tensors: list[torch.Tensor] = []
    structure = _flatten(state, tensors, "")
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "structure": json.dumps(structure)}}
    views: list[Any] = []
    offset = 0
    for i, t in enumerate(tensors):
        t = t.detach().to("cpu").contiguous()
        name = _ST_DTYPES.get(t.dtype)
        shape = list(t.shape)
        if name is None:
            t, name, shape = t.reshape(-1).view(torch.uint8), "U8", [t.numel() * t.element_size()]
        nbytes = t.numel() * t.element_size()
        header[f"t{i}"] = {"dtype": name, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        if nbytes:
            views.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return b"".join([struct.pack("<Q", len(head)), head, *views])


def deserialize(data: bytes, where: str = "checkpoint") -> dict[str, Any]:
    """Parse :func:`serialize` output with safetensors; CorruptionError if it is not one."""
    try:
        tensors = safetensors.torch.load(data)
        (size,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + size])["__metadata__"]
    except Exception as exc:  # safetensors raises its own error types on bad input
        raise CorruptionError(where, f"not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptionError(where, f"unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    try:
        return _unflatten(json.loads(meta["structure"]), tensors)
    except CorruptionError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, StorageError) as exc:
        # A readable safetensors file whose structure is garbled: bit rot, or a foreign writer.
        raise CorruptionError(where, f"malformed checkpoint structure ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- the store
class CheckpointStore:
    """Checkpoints of one session in a DBInterface: save, keep the last ``keep``, load with fallback.

    ``on_warning(message)`` is called when a checkpoint had to be skipped, so
    the session can record it in its status.
    """

    def __init__(
        self,
        db: DBInterface,
        session_id: str,
        *,
        keep: int = 3,
        on_warning: Callable[[str], None] | None = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.db = db.collection("checkpoints")
        self.session_id = session_id
        self.keep = keep
        self.on_warning = on_warning
        self._next_seq: int | None = None

    def records(self) -> list[dict]:
        """Checkpoint records of this session, newest first."""
        return self.db.load({"session_id": self.session_id}, sort=[("seq", -1)])

    def save(self, state: Mapping[str, Any], *, pinned: bool = False, **info: Any) -> dict:
        """Write ``state`` (blob first, then its record) and prune old unpinned checkpoints."""
        return self.write(serialize(state), pinned=pinned, **info)

    def write(self, data: bytes, *, pinned: bool = False, **info: Any) -> dict:
        """Store already-serialised checkpoint bytes (see :func:`serialize`); safe from a writer thread."""
        if self._next_seq is None:
            latest = self.db.load_one({"session_id": self.session_id}, sort=[("seq", -1)])
            self._next_seq = 0 if latest is None else latest["seq"] + 1
        seq = self._next_seq
        record_id = f"{self.session_id}.ckpt{seq:08d}"
        # hashlib releases the GIL: the checksum is computed while the backend writes.
        digest = _HASHER.submit(_sha256, data)
        blob_id = self.db.put_blob(data, f"{record_id}.st")
        record = {
            "_id": record_id,
            "session_id": self.session_id,
            "seq": seq,
            "blob": blob_id,
            "nbytes": len(data),
            "sha256": digest.result(),
            "created": time.time(),
            "pinned": pinned,
            **info,
        }
        self.db.save(record)
        self._next_seq = seq + 1
        self._prune()
        return record

    def _prune(self) -> None:
        unpinned = self.db.load({"session_id": self.session_id, "pinned": False}, sort=[("seq", -1)])
        for old in unpinned[self.keep :]:
            self.delete(old)

    def delete(self, record: Mapping[str, Any]) -> None:
        """Remove a checkpoint's record, then its blob."""
        self.db.delete(record["_id"])
        self.db.delete_blob(record["blob"])

    def read(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Load and verify one checkpoint (CorruptionError if torn or altered)."""
        where = f"checkpoint {record['_id']!r} (blob {record['blob']!r})"
        data = self.db.get_blob(record["blob"])
        if len(data) != record["nbytes"]:
            raise CorruptionError(where, f"holds {len(data)} bytes, expected {record['nbytes']} (truncated?)")
        digest = _HASHER.submit(_sha256, data)  # checked in parallel with parsing, before anything is returned
        try:
            state = deserialize(data, where)
        except CorruptionError as exc:
            if digest.result() != record["sha256"]:
                raise CorruptionError(where, "checksum mismatch (torn or corrupt)") from exc
            raise
        if digest.result() != record["sha256"]:
            raise CorruptionError(where, "checksum mismatch (torn or corrupt)")
        return state

    def load_latest(self, **match: Any) -> tuple[dict[str, Any], dict] | None:
        """The newest readable checkpoint (matching ``match`` fields) as ``(state, record)``, or None.

        A checkpoint that is missing, torn or corrupt is skipped with a warning
        and the previous one is tried.
        """
        for record in self.records():
            if any(record.get(k) != v for k, v in match.items()):
                continue
            try:
                return self.read(record), record
            except (CorruptionError, NotFoundError) as exc:
                message = f"skipping unusable checkpoint: {exc}"
                log.warning(message)
                if self.on_warning is not None:
                    self.on_warning(message)
            except StorageError:
                raise
        return None
