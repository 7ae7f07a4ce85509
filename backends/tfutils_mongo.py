"""TFUtils' MongoDB layout for ``ptutils.support``: records in ``<dbname>[<collname>.files]``, as TFUtils wrote them.

Here, with the other MongoDB code, because it talks pymongo and GridFS directly: a
DBInterface collection name cannot hold TFUtils' ``.files``, and analysis scripts
query that collection by its name.  :func:`ptutils.support.records.open_records`
returns one when ``save_params`` names ``host port dbname collname``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import gridfs

from ..database import open_db
from ..support.records import RecordStore, decode_items, encode_items


class MongoRecords(RecordStore):
    """TFUtils' MongoDB layout (spec §4.1): ``<dbname>[<collname>.files]`` and ``<db>_<coll>_<exp>___RECENT``."""

    def __init__(self, host: str, port: int, dbname: str, collname: str):
        self.ckpt_db = open_db(f"mongodb://{host}:{port}/{dbname}")
        self.client = self.ckpt_db.client
        self.dbname, self.collname = dbname, collname
        self.files = self.client[dbname][f"{collname}.files"]

    def __repr__(self) -> str:
        return f"MongoRecords({self.dbname}.{self.collname}.files)"

    def insert(self, record: dict[str, Any]) -> Any:
        return self.files.insert_one(dict(record)).inserted_id

    def find(self, query: Mapping[str, Any], newest_first: bool = True, limit: int = 0) -> list[dict]:
        order = -1 if newest_first else 1
        return list(self.files.find(dict(query), sort=[("uploadDate", order), ("_id", order)], limit=limit))

    def count(self, query: Mapping[str, Any]) -> int:
        return self.files.count_documents(dict(query))

    def _recent(self, exp_id: str):
        name = "_".join([self.dbname, self.collname, exp_id, "__RECENT"])
        if len(name) > 63:
            return None  # MongoDB's limit; TFUtils E3 logged and skipped the cache
        return self.client[name]["fs.files"]

    def insert_recent(self, exp_id: str, record: dict[str, Any]) -> Any:
        coll = self._recent(exp_id)
        return None if coll is None else coll.insert_one(dict(record)).inserted_id

    def recent(self, exp_id: str) -> list[dict]:
        coll = self._recent(exp_id)
        return [] if coll is None else list(coll.find({}, sort=[("uploadDate", 1), ("_id", 1)]))

    def delete_recent(self, exp_id: str, record_id: Any) -> None:
        coll = self._recent(exp_id)
        if coll is not None:
            coll.delete_one({"_id": record_id})

    def put_items(self, record_id: Any, items: Mapping[str, Any]) -> None:
        bucket = gridfs.GridFSBucket(self.client[self.dbname], bucket_name=self.collname)
        bucket.upload_from_stream(f"{record_id}_fileitems", encode_items(items),
                                  metadata=None)
        # TFUtils put ``item_for`` on the file document itself (GridFS.put kwargs).
        self.files.update_one({"filename": f"{record_id}_fileitems"},
                              {"$set": {"item_for": record_id, "format": "ptutils-checkpoint/1"}})

    def get_items(self, record_id: Any) -> dict[str, Any] | None:
        doc = self.files.find_one({"item_for": record_id})
        if doc is None:
            return None
        bucket = gridfs.GridFSBucket(self.client[self.dbname], bucket_name=self.collname)
        return decode_items(bucket.open_download_stream(doc["_id"]).read())

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.timezone.utc)
