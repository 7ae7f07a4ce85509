"""Where TFUtils' records go, and what they look like (spec §4): the record store of ``train_from_params``.

Two stores with one interface:

* ``MongoRecords`` in ``ptutils.backends.tfutils_mongo`` (``save_params`` with ``host port dbname collname``): records in
  ``<dbname>.<collname>.files``, as TFUtils wrote them, so analysis scripts'
  ``MongoClient(host, port)[dbname][collname + '.files'].find(...)`` see the same
  documents (ObjectId ``_id``, datetime ``uploadDate``); cached checkpoints' records in
  the database ``<dbname>_<collname>_<exp_id>___RECENT``, collection ``fs.files``.  It
  talks to MongoDB through the connection of ptutils' MongoDB backend (pymongo), since a
  DBInterface collection name cannot contain TFUtils' ``.files``.
* :class:`DBRecords` (``save_params['db']`` a ptutils URL, any backend): the same
  documents in the DBInterface collection ``<collname>`` (string ``_id``, float
  ``uploadDate``), cached checkpoints' records in ``<collname>__RECENT`` (with ``exp_id``).

Checkpoints themselves are ptutils' (the Session's CheckpointStore: safetensors with a
SHA-256); a record with ``saved_filters: True`` names its checkpoint under ``checkpoint``
(``{'session_id', 'id', 'step'}``).  ``save_to_gfs`` items are stored out of line as a
ptutils checkpoint-format blob (safetensors + JSON, never pickle): on MongoDB a GridFS
file ``<_id>_fileitems`` in the bucket ``<collname>`` with ``item_for`` = the record's
``_id`` (as TFUtils did, without ``exp_id``); elsewhere a document ``<_id>_fileitems``
pointing to a blob.  :func:`load_gfs_items` reads them back.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..checkpoint import deserialize, serialize
from ..database import DBInterface, new_id, open_db
from ..errors import ConfigError

__all__ = ["DBRecords", "RecordStore", "load_gfs_items", "open_records", "sonify"]

RESERVED_COLLECTIONS = ("sessions", "events", "checkpoints", "checkpoint_holds")


# ---------------------------------------------------------------------------------------------- sonify


def _mongo_key(key: Any) -> str:
    return str(key).replace(".", "___")


def sonify(value: Any, skip_check: bool = True) -> Any:
    """A params value as TFUtils stored it: callables as ``{'modname', 'objname'}`` (+ ``source_path``),
    tensors/arrays as numbers or lists, keys made Mongo-safe (``.`` → ``___``, non-str → str)."""
    if isinstance(value, Mapping):
        return {_mongo_key(k): sonify(v, skip_check) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [sonify(v, skip_check) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf/nan: JSON backends cannot hold them; TFUtils' BSON could
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value):
        out = {"modname": getattr(value, "__module__", None) or type(value).__module__,
               "objname": getattr(value, "__qualname__", None) or type(value).__qualname__}
        if not skip_check:
            try:
                out["source_path"] = inspect.getsourcefile(value)
            except TypeError:
                out["source_path"] = None
            from .. import __version__

            out["version"] = __version__
        return out
    return repr(value)


def plain_result(value: Any) -> Any:
    """A train/validation result value as a record holds it: 0-d → number, len>1 arrays → their mean (E3)."""
    if isinstance(value, Mapping):
        return {_mongo_key(k): plain_result(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_result(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.numel() == 1:
            return value.item()
        return float(value.double().mean()) if value.numel() else []
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return value.item()
        return float(np.mean(value)) if value.size else []
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _for_blob(value: Any) -> Any:
    """save_to_gfs values for the blob: tensors kept (safetensors entries), numpy arrays as tensors."""
    if isinstance(value, Mapping):
        return {str(k): _for_blob(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_for_blob(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def encode_items(items: Mapping[str, Any]) -> bytes:
    """save_to_gfs items as bytes: ptutils' checkpoint format (safetensors tensors + JSON structure, no pickle)."""
    return bytes(serialize({"fileitems": _for_blob(items)}))


def decode_items(data: bytes) -> dict[str, Any]:
    """What :func:`encode_items` stored (tensors back as tensors)."""
    return deserialize(data, "save_to_gfs items")["fileitems"]


# ---------------------------------------------------------------------------------------------- stores


class RecordStore:
    """TFUtils' records of one location (one ``collname``): insert, find, the ``__RECENT`` cache, save_to_gfs blobs."""

    ckpt_db: DBInterface
    """The database (DBInterface) that holds the sessions and their checkpoints."""

    def insert(self, record: dict[str, Any]) -> Any:
        raise NotImplementedError

    def find(self, query: Mapping[str, Any], newest_first: bool = True, limit: int = 0) -> list[dict]:
        raise NotImplementedError

    def count(self, query: Mapping[str, Any]) -> int:
        raise NotImplementedError

    def insert_recent(self, exp_id: str, record: dict[str, Any]) -> Any:
        raise NotImplementedError

    def recent(self, exp_id: str) -> list[dict]:
        """The ``__RECENT`` records of ``exp_id``, oldest first."""
        raise NotImplementedError

    def delete_recent(self, exp_id: str, record_id: Any) -> None:
        raise NotImplementedError

    def put_items(self, record_id: Any, items: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def get_items(self, record_id: Any) -> dict[str, Any] | None:
        raise NotImplementedError

    def now(self) -> Any:
        raise NotImplementedError

    def newest_checkpoint(self, query: Mapping[str, Any], exp_id: str | None = None) -> dict | None:
        """The newest record (by ``uploadDate``) matching ``query`` with ``saved_filters: True``, from
        ``<collname>.files`` and, when ``exp_id`` is given, that exp_id's ``__RECENT`` too (spec §5.3a)."""
        query = {**query, "saved_filters": True}
        found = self.find(query, limit=1)
        if exp_id is not None:
            found += [r for r in self.recent(exp_id) if all(r.get(k) == v for k, v in query.items())][-1:]
        found = [r for r in found if r.get("checkpoint")]
        if not found:
            return None
        return max(found, key=lambda r: (r["uploadDate"], r.get("step") or 0))

    def close(self) -> None:
        self.ckpt_db.close()


class DBRecords(RecordStore):
    """The same documents through a DBInterface: collection ``<collname>`` and ``<collname>__RECENT``."""

    def __init__(self, url: str, collname: str):
        for name in (collname, f"{collname}__RECENT"):
            if name in RESERVED_COLLECTIONS:
                raise ConfigError("save_params.collname", f"{collname!r} is a collection ptutils sessions use")
        self.ckpt_db = open_db(url)
        self.collname = collname
        self.records = self.ckpt_db.collection(collname)
        self.cache = self.ckpt_db.collection(f"{collname}__RECENT")
        self._clock = 0.0

    def __repr__(self) -> str:
        return f"DBRecords({self.ckpt_db.url}, {self.collname})"

    def insert(self, record: dict[str, Any]) -> Any:
        record = dict(record)
        record.setdefault("_id", new_id())
        return self.records.save(record)

    def find(self, query: Mapping[str, Any], newest_first: bool = True, limit: int = 0) -> list[dict]:
        order = -1 if newest_first else 1
        found = self.records.load(dict(query), sort=[("uploadDate", order)])
        return found[:limit] if limit else found

    def count(self, query: Mapping[str, Any]) -> int:
        return self.records.count(dict(query))

    def insert_recent(self, exp_id: str, record: dict[str, Any]) -> Any:
        record = {**record, "_id": new_id(), "exp_id": exp_id}
        return self.cache.save(record)

    def recent(self, exp_id: str) -> list[dict]:
        return self.cache.load({"exp_id": exp_id}, sort=[("uploadDate", 1)])

    def delete_recent(self, exp_id: str, record_id: Any) -> None:
        self.cache.delete(record_id)

    def put_items(self, record_id: Any, items: Mapping[str, Any]) -> None:
        blob = self.records.put_blob(encode_items(items))
        self.records.save({"_id": f"{record_id}_fileitems", "filename": f"{record_id}_fileitems",
                           "item_for": record_id, "blob": blob, "format": "ptutils-checkpoint/1",
                           "uploadDate": self.now()})

    def get_items(self, record_id: Any) -> dict[str, Any] | None:
        found = self.records.load({"item_for": record_id})
        if not found:
            return None
        return decode_items(self.records.get_blob(found[0]["blob"]))

    def now(self) -> float:
        now = max(time.time(), self._clock + 1e-6)  # strictly increasing: "newest by uploadDate" stays exact
        self._clock = now
        return now


def location(primary: Any, fallback: Any) -> dict[str, Any]:
    """§5.1: each of host/port/dbname/collname/exp_id/db from ``primary``, else from ``fallback``."""
    out = {}
    for key in ("host", "port", "dbname", "collname", "exp_id", "db"):
        value = getattr(primary, key, None)
        out[key] = value if value is not None else getattr(fallback, key, None)
    return out


def open_records(where: Mapping[str, Any], group: str = "save_params") -> RecordStore:
    """The record store of a location dict (``db`` URL, or ``host port dbname collname``)."""
    collname = where.get("collname") or "tfutils"
    if where.get("db"):
        return DBRecords(where["db"], collname)
    missing = [k for k in ("host", "port", "dbname") if where.get(k) is None]
    if missing:
        raise ConfigError(f"{group}.{missing[0]}", "needed (with host, port, dbname, collname) unless 'db' gives a "
                                                  "ptutils database URL")
    from ..backends.tfutils_mongo import MongoRecords  # pymongo only where TFUtils' MongoDB layout is asked for

    return MongoRecords(where["host"], int(where["port"]), where["dbname"], collname)


def load_gfs_items(store_or_location: RecordStore | Mapping[str, Any], record: Mapping[str, Any] | Any
                   ) -> dict[str, Any] | None:
    """The ``save_to_gfs`` items of a record (or record ``_id``): ``{'train_results': {k: [...]},
    'validation_results': {name: {k: v}}}``, tensors as tensors; None when it has none."""
    record_id = record["_id"] if isinstance(record, Mapping) else record
    if isinstance(store_or_location, RecordStore):
        return store_or_location.get_items(record_id)
    store = open_records(store_or_location)
    try:
        return store.get_items(record_id)
    finally:
        store.close()
