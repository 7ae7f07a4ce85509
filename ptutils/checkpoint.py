"""Atomic, checksummed checkpoints in any DBInterface, and the RNG state for exact resume.

*What* is saved is a nested dict (model/optimizer/scheduler state, RNG states,
loop position, update states); *where* is a DBInterface (its blob store holds
the bytes, a small record in its ``checkpoints`` collection points to them) —
Ignite's split between the objects and the save handler.

A checkpoint blob is a safetensors file: every tensor is a safetensors entry,
and the rest of the structure (numbers, strings, numpy RNG arrays) is JSON from
:mod:`ptutils.codec` in the safetensors metadata.  Loading parses it with a
strict safetensors reader — never pickle.  The record, written *after* the
blob, carries the blob's SHA-256 and size: a torn, truncated or bit-flipped
checkpoint fails verification and the previous one is used instead (with a
warning).

The bytes are hashed once on each side: :meth:`DBInterface.put_blob_sha256`
hashes them while they are written (the filesystem backend streams the
tensors' own memory, without joining it into one copy) and
:meth:`DBInterface.get_blob_sha256` while they are read into one buffer, which
the loaded tensors then share (tensors are laid out by decreasing element
size, so each is aligned to its element size).
"""

from __future__ import annotations

import json
import logging
import math
import random
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import safetensors.torch
import torch

from . import codec
from .database import BlobData, DBInterface, blob_parts
from .errors import CheckpointError, CorruptionError, NotFoundError, StorageError

log = logging.getLogger("ptutils")

FORMAT = "ptutils-checkpoint/1"
_ST_TORCH: dict[str, torch.dtype] = dict(safetensors.torch._TYPES)
_ST_DTYPES = {dtype: name for name, dtype in _ST_TORCH.items()}
_MAX_HEADER = 100_000_000
"""The largest safetensors header accepted (the limit of the safetensors library)."""
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


def serialize_parts(state: Mapping[str, Any]) -> list[memoryview]:
    """:func:`serialize` in pieces — the header, then each tensor's own memory, not copied.

    The pieces alias the state's (CPU) tensors: write them before the state
    changes, or use :func:`serialize` for a snapshot.
    """
    tensors: list[torch.Tensor] = []
    structure = _flatten(state, tensors, "")
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "structure": json.dumps(structure)}}
    entries = []
    for i, t in enumerate(tensors):
        t = t.detach().to("cpu").contiguous()
        itemsize = t.element_size()
        name = _ST_DTYPES.get(t.dtype)
        shape = list(t.shape)
        if name is None:
            t, name, shape = t.reshape(-1).view(torch.uint8), "U8", [t.numel() * itemsize]
        entries.append((itemsize, i, t, name, shape))
    # Largest elements first (as safetensors does): every tensor then starts at a multiple of its element size.
    entries.sort(key=lambda entry: -entry[0])
    views: list[memoryview] = []
    offset = 0
    for _, i, t, name, shape in entries:
        nbytes = t.numel() * t.element_size()
        header[f"t{i}"] = {"dtype": name, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        if nbytes:
            views.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return [memoryview(struct.pack("<Q", len(head)) + head), *views]


def serialize(state: Mapping[str, Any]) -> memoryview:
    """A safetensors file holding ``state``: tensors as entries, the rest as JSON metadata.

    A read-only snapshot in one fresh buffer (``np.empty`` takes huge pages
    where it can and skips the zero-fill, so it is filled faster than a joined
    ``bytes``); ``bytes(...)`` of it is the file.
    """
    parts = serialize_parts(state)
    snapshot = np.empty(sum(p.nbytes for p in parts), dtype=np.uint8)
    pos = 0
    for part in parts:
        snapshot[pos : pos + part.nbytes] = np.frombuffer(part, dtype=np.uint8)
        pos += part.nbytes
    return memoryview(snapshot).toreadonly()


def _read_safetensors(view: memoryview) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors (sharing ``view``'s memory) and metadata of a safetensors file; ValueError if malformed."""
    if len(view) < 8:
        raise ValueError(f"{len(view)} bytes, shorter than the 8-byte header length")
    (size,) = struct.unpack_from("<Q", view)
    if size > min(len(view) - 8, _MAX_HEADER):
        raise ValueError(f"header length {size} does not fit in {len(view)} bytes")
    header = json.loads(bytes(view[8 : 8 + size]).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    start = 8 + size
    spans = []
    for name, entry in header.items():
        dtype = _ST_TORCH.get(entry.get("dtype")) if isinstance(entry, dict) else None
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if dtype is not None else (None, None)
        if not (
            isinstance(shape, list)
            and all(type(n) is int and n >= 0 for n in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"tensor {name!r}: malformed entry {entry!r:.200}")
        if math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]:
            raise ValueError(f"tensor {name!r}: {shape} {entry['dtype']} does not fill {offsets}")
        spans.append((offsets[0], offsets[1], name, dtype, shape))
    spans.sort(key=lambda span: span[:2])
    end = 0
    for begin, stop, name, _, _ in spans:
        if begin != end:
            raise ValueError(f"tensor {name!r} starts at {begin}, not at {end} where the previous one ends")
        end = stop
    if start + end != len(view):
        raise ValueError(f"the tensors end at byte {start + end} of {len(view)}")
    tensors = {}
    for begin, stop, name, dtype, shape in spans:
        if begin == stop:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(view, dtype=dtype, count=(stop - begin) // dtype.itemsize, offset=start + begin)
        if dtype is torch.bool and bool(t.view(torch.uint8).gt(1).any()):
            raise ValueError(f"tensor {name!r}: bool bytes other than 0 and 1")
        tensors[name] = t.view(shape)
    return tensors, meta


def deserialize(data: bytes | bytearray | memoryview, where: str = "checkpoint") -> dict[str, Any]:
    """Parse :func:`serialize` output (CorruptionError if it is not one).

    The tensors share ``data``'s memory when it is writable, else a copy's.
    """
    try:
        view = memoryview(data).cast("B")
        if view.readonly:
            view = memoryview(bytearray(view))
        tensors, meta = _read_safetensors(view)
    except Exception as exc:  # any malformed input (the parser's errors, torch's, json's, struct's)
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
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        # The Mersenne Twister's 625 words as one array: a tuple of ints is 625 values to encode.
        "python": (version, np.array(internal, dtype=np.uint32), gauss),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    words = internal.tolist() if isinstance(internal, np.ndarray) else internal  # older checkpoints: ints
    random.setstate((version, tuple(words), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from one integer.

    Not ``torch.manual_seed``: it also queues seeds for the XPU and MTIA backends,
    recording a stack trace for each, about 1 ms per call where they are absent.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)  # applied at CUDA's initialisation if that comes later


# ---------------------------------------------------------------------- the store
BEST_MODES = ("min", "max")
"""How ``keep_best`` ranks a metric: the lowest value is best, or the highest."""


def _better(ranked: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """Whether one checkpoint's ranking (``best_by``) beats another's (the newer wins ties)."""
    if ranked["mode"] == "max":
        return ranked["value"] >= than["value"]
    return ranked["value"] <= than["value"]


def _ranking(record: Mapping[str, Any]) -> tuple[str, str, float] | None:
    """A record's ``best_by`` as (metric, mode, value), or None when it has none (or a garbled one)."""
    ranked = record.get("best_by")
    if not isinstance(ranked, Mapping):
        return None
    metric, mode, value = ranked.get("metric"), ranked.get("mode"), ranked.get("value")
    if not isinstance(metric, str) or mode not in BEST_MODES or not isinstance(value, (int, float)):
        return None
    return (metric, mode, float(value)) if math.isfinite(value) else None


def best_checkpoint(records: Sequence[Mapping[str, Any]], rule: tuple[str, str] | None = None) -> dict | None:
    """The best of checkpoint ``records`` (newest first) by the ``keep_best`` ranking each holds, or None.

    Only records ranked by ``rule`` (metric, mode) compete; by default, the newest ranked record's.
    """
    ranked = [(r, rank) for r in records if (rank := _ranking(r)) is not None]
    if not ranked:
        return None
    rule = rule or ranked[0][1][:2]
    best = None
    for record, (metric, mode, value) in reversed(ranked):  # oldest first, so that a tie goes to the newer
        if (metric, mode) == rule and (best is None or _better({"mode": mode, "value": value}, best["best_by"])):
            best = record
    return dict(best) if best is not None else None


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
        keep_best: str | None = None,
        best_mode: str = "min",
        on_warning: Callable[[str], None] | None = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if best_mode not in BEST_MODES:
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.db = db.collection("checkpoints")
        self.session_id = session_id
        self.keep = keep
        self.keep_best = keep_best
        """The metric whose best checkpoint is kept beside the last ``keep`` (None: none is)."""
        self.best_mode = best_mode
        self.on_warning = on_warning
        self._next_seq: int | None = None
        self._unpinned: list[dict] = []
        """This session's unpinned records, oldest first, so pruning needs no query (one store writes a session's)."""
        self._best: dict | None = None
        """The record of the best checkpoint by ``keep_best`` so far (spared by pruning)."""

    def records(self) -> list[dict]:
        """Checkpoint records of this session, newest first."""
        return self.db.load({"session_id": self.session_id}, sort=[("seq", -1)])

    def save(self, state: Mapping[str, Any], *, pinned: bool = False, **info: Any) -> dict:
        """Write ``state`` (blob first, then its record) and prune old unpinned checkpoints.

        The tensors' memory is written as it is, without a snapshot copy: the
        state must not change until this returns.
        """
        return self.write(serialize_parts(state), pinned=pinned, **info)

    def write(self, data: BlobData, *, pinned: bool = False, **info: Any) -> dict:
        """Store serialised checkpoint bytes (:func:`serialize`, or :func:`serialize_parts`'s pieces).

        Safe from a writer thread, given bytes or pieces that do not change meanwhile.
        """
        parts = blob_parts(data)
        if self._next_seq is None:
            self._read_stored()
        seq = self._next_seq
        record_id = f"{self.session_id}.ckpt{seq:08d}"
        blob_id, digest = self.db.put_blob_sha256(parts, f"{record_id}.st")
        record = {
            "_id": record_id,
            "session_id": self.session_id,
            "seq": seq,
            "blob": blob_id,
            "nbytes": sum(p.nbytes for p in parts),
            "sha256": digest,
            "created": time.time(),
            "pinned": pinned,
            **info,
        }
        ranked = self._rank_of(info.get("metrics"))
        if ranked is not None:
            record["best_by"] = ranked
        self.db.save(record)
        self._next_seq = seq + 1
        if ranked is not None and (self._best is None or _better(ranked, self._best["best_by"])):
            self._best = record
        if not pinned:
            self._unpinned.append(record)
            self._prune()
        return record

    def _read_stored(self) -> None:
        """Learn the next sequence number, the unpinned records and the best one from what is stored."""
        stored = self.records()
        self._next_seq = 0 if not stored else stored[0]["seq"] + 1
        self._unpinned = [r for r in reversed(stored) if not r.get("pinned")]
        self._best = best_checkpoint(stored, (self.keep_best, self.best_mode)) if self.keep_best else None

    def prune(self) -> None:
        """Delete what the last ``keep`` (and the best) no longer need, held ones spared, from the stored records.

        For a session that writes no more checkpoints (a finished tuning child whose
        old checkpoint another child held until after its last prune).
        """
        self._read_stored()
        self._prune()

    def _rank_of(self, metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """What ranks a checkpoint with ``metrics`` by ``keep_best`` (None: it does not take part)."""
        if self.keep_best is None:
            return None
        value = (metrics or {}).get(self.keep_best)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return None
        return {"metric": self.keep_best, "mode": self.best_mode, "value": float(value)}

    def _prune(self) -> None:
        """Delete the oldest unpinned checkpoints beyond the last ``keep``, sparing the best one and held ones."""
        best = None if self._best is None else self._best["_id"]
        spared = 0
        while len(self._unpinned) - spared > self.keep:
            record = self._unpinned[spared]
            if record["_id"] == best or self.held(record):
                spared += 1  # the best stays beside the last ``keep``; a held one until its holders let go
                continue
            self.delete(record)
            del self._unpinned[spared]

    def delete(self, record: Mapping[str, Any]) -> None:
        """Remove a checkpoint's record, then its blob (unless the blob is another session's, see :meth:`clone`)."""
        self.db.delete(record["_id"])
        if record.get("cloned_from") is None:
            self.db.delete_blob(record["blob"])

    # ------------------------------------------------------------------ shared checkpoints (tuning's exploit)
    def _holds(self) -> DBInterface:
        return self.db.collection(HOLDS)

    def held(self, record: Mapping[str, Any]) -> bool:
        """Whether another session still continues from this checkpoint's blob (a hold keeps it from pruning)."""
        return self._holds().count({"checkpoint": record["_id"]}) > 0

    def clone(self, donor: Mapping[str, Any], *, decision: str, attempt: int,
              apply: Mapping[str, Any] | None = None) -> dict:
        """Make another session's checkpoint this session's newest, by reference to its blob (no bytes copied).

        The donor's checkpoint is held for this session first (its pruning
        spares it) until :func:`release_holds` lets go, once this session has a
        checkpoint of its own after it.  ``apply`` (dotted config paths) is set
        on the model after every load of the clone (hyperparameters that the
        donor's optimizer state would otherwise put back).  Idempotent per
        ``decision``: a repeated call returns the record already written.
        """
        stored = self.records()
        for record in stored:
            if (record.get("cloned_from") or {}).get("decision") == decision:
                return record
        self._holds().save({"_id": f"{donor['_id']}-by-{self.session_id}", "checkpoint": donor["_id"],
                            "holder": self.session_id, "created": time.time()})
        seq = 0 if not stored else stored[0]["seq"] + 1
        keep = ("step", "stage", "stage_epoch", "batch_in_epoch", "metrics", "blob", "nbytes", "sha256")
        record = {
            "_id": f"{self.session_id}.ckpt{seq:08d}",
            "session_id": self.session_id,
            "seq": seq,
            **{k: donor[k] for k in keep if k in donor},
            "attempt": attempt,
            "created": time.time(),
            "pinned": False,
            "reason": "exploit",
            "cloned_from": {"session": donor["session_id"], "checkpoint": donor["_id"], "seq": donor["seq"],
                            "sha256": donor["sha256"], "decision": decision},
            "apply": dict(apply or {}),
        }
        self.db.save(record)
        self._next_seq = None  # re-read on the next write
        return record


    def read(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Load and verify one checkpoint (CorruptionError if torn or altered)."""
        where = f"checkpoint {record['_id']!r} (blob {record['blob']!r})"
        data, digest = self.db.get_blob_sha256(record["blob"])  # hashed while read
        if len(data) != record["nbytes"]:
            raise CorruptionError(where, f"holds {len(data)} bytes, expected {record['nbytes']} (truncated?)")
        if digest != record["sha256"]:
            raise CorruptionError(where, "checksum mismatch (torn or corrupt)")
        return deserialize(data, where)

    def find(self, checkpoint: str | int = "last") -> dict:
        """The record of the ``"last"`` checkpoint, the ``"best"`` one (by ``keep_best``) or the newest at a step.

        Raises CheckpointError naming the session and what it holds when there is none.
        """
        records = self.records()
        if checkpoint == "last":
            found = records[0] if records else None
        elif checkpoint == "best":
            found = best_checkpoint(records)
            if found is None and records:
                raise CheckpointError(f"session {self.session_id!r} ranked no checkpoint: run it with keep_best=METRIC")
        elif isinstance(checkpoint, int) and not isinstance(checkpoint, bool):
            found = next((r for r in records if r.get("step") == checkpoint), None)
            if found is None and records:
                steps = ", ".join(str(s) for s in sorted({r.get("step") for r in records}))
                raise CheckpointError(f"session {self.session_id!r} has no checkpoint at step {checkpoint}; "
                                      f"it has checkpoints at steps {steps}")
        else:
            raise ValueError(f"checkpoint must be 'last', 'best' or a step (int), got {checkpoint!r}")
        if found is None:
            raise CheckpointError(f"session {self.session_id!r} has no checkpoint in {self.db.url}")
        return found

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


HOLDS = "checkpoint_holds"
"""The collection of holds: which session continues from which other session's checkpoint blob."""


def release_holds(db: DBInterface, holder: str) -> list[str]:
    """Let go of the checkpoints ``holder`` cloned once it has a checkpoint of its own after each; their ids.

    ``db`` is the checkpoints' database (any collection of it).
    """
    holds = db.collection(HOLDS)
    checkpoints = db.collection("checkpoints")
    newest = checkpoints.load_one({"session_id": holder}, sort=[("seq", -1)])
    released = []
    for hold in holds.load({"holder": holder}):
        clone = checkpoints.load_one({"session_id": holder, "cloned_from.checkpoint": hold["checkpoint"]},
                                     sort=[("seq", -1)])
        if newest is not None and (clone is None or newest["seq"] > clone["seq"]):
            holds.delete(hold["_id"])
            released.append(hold["checkpoint"])
    return released
