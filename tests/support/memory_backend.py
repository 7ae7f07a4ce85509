"""A third-party backend in miniature: documents and blobs kept in this process's memory.

This is what a package that adds a URL scheme to ptutils writes: a
:class:`~ptutils.database.DBInterface` subclass that implements the primitives
at the bottom of that class, on documents already encoded to plain JSON, and an
entry point in the ``ptutils.backends`` group naming its scheme (the tests
install one, see tests/test_third_party_backend.py).  It depends on nothing but
ptutils' public modules.

``memory://NAME`` names one database: every interface opened on that name in
this process shares its collections; another process sees none of it.  A
document is kept as JSON text (nobody can change a stored document through a
reference to it), a blob as bytes of its own, out of line, and every write, and
every read-modify-write, holds the database's lock.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from ptutils.database import DEFAULT_COLLECTION, DBInterface, check_id
from ptutils.errors import NotFoundError, StorageError
from ptutils.query import Node, Path, Update, apply_update, matches, project, sort_docs


class _Database:
    """The collections of one ``memory://NAME``: documents as JSON text and blobs, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.documents: dict[str, dict[str, str]] = {}
        self.blobs: dict[str, dict[str, bytes]] = {}


_DATABASES: dict[str, _Database] = {}
_DATABASES_LOCK = threading.Lock()


def _as_text(doc: dict) -> str:
    return json.dumps(doc, allow_nan=False, separators=(",", ":"))


def drop(name: str) -> None:
    """Forget the database ``memory://name`` and everything in it."""
    with _DATABASES_LOCK:
        _DATABASES.pop(name, None)


class MemoryInterface(DBInterface):
    """One collection of a database that lives in this process."""

    scheme = "memory"

    def __init__(self, name: str, collection: str = DEFAULT_COLLECTION):
        super().__init__(collection)
        self.name = check_id(name, "memory database name")
        with _DATABASES_LOCK:
            self._db = _DATABASES.setdefault(self.name, _Database())
        with self._db.lock:
            self._docs = self._db.documents.setdefault(self.collection_name, {})
            self._blobs = self._db.blobs.setdefault(self.collection_name, {})

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryInterface:
        """``memory://NAME``; option ``collection=``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "memory" or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise StorageError(f"not a memory://NAME URL: {url!r}")
        collection = options.pop("collection", DEFAULT_COLLECTION)
        if options:
            raise TypeError(f"unknown options for a memory:// database: {', '.join(sorted(options))}")
        return cls(parts.netloc, collection=collection)

    @property
    def url(self) -> str:
        return f"memory://{self.name}"

    def _sibling(self, collection: str) -> MemoryInterface:
        return MemoryInterface(self.name, collection)

    def _scan(self) -> list[dict]:
        """Every stored document, in ``_id`` order."""
        with self._db.lock:
            return [json.loads(self._docs[doc_id]) for doc_id in sorted(self._docs)]

    # ----------------------------------------------------------------- primitives
    def _write(self, doc_id: str, body: dict) -> dict | None:
        return self._write_many([(doc_id, body)])[0]

    def _write_many(self, items: Sequence[tuple[str, dict]]) -> list[dict | None]:
        """Write every document under one hold of the lock; a document that is not JSON stores none.

        An id given twice replaces, the second time, the document the first wrote.
        """
        with self._db.lock:
            olds, written = [], {}
            for doc_id, body in items:
                old = written[doc_id] if doc_id in written else self._get([doc_id]).get(doc_id)
                doc = {"_id": doc_id, "_version": 1 if old is None else old["_version"] + 1}
                doc.update((k, v) for k, v in body.items() if k not in ("_id", "_version"))
                written[doc_id] = doc
                olds.append(old)
            self._docs.update({doc_id: _as_text(doc) for doc_id, doc in written.items()})
        return olds

    def _get(self, ids: Sequence[str]) -> dict[str, dict]:
        with self._db.lock:
            return {doc_id: json.loads(self._docs[doc_id]) for doc_id in ids if doc_id in self._docs}

    def _find(
        self, query: Node, sort: list[tuple[Path, int]], limit: int | None, skip: int, projection: list[Path] | None
    ) -> list[dict]:
        docs = sort_docs([d for d in self._scan() if matches(query, d)], [(".".join(p), d) for p, d in sort])
        docs = docs[skip:] if limit is None else docs[skip : skip + limit]
        return [project(d, projection) for d in docs]

    def _count(self, query: Node) -> int:
        return sum(1 for d in self._scan() if matches(query, d))

    def _remove_ids(self, ids: Sequence[str]) -> list[dict]:
        with self._db.lock:
            texts = [self._docs.pop(doc_id, None) for doc_id in dict.fromkeys(ids)]
        return [json.loads(text) for text in texts if text is not None]

    def _remove_query(self, query: Node) -> list[dict]:
        with self._db.lock:
            removed = [d for d in self._scan() if matches(query, d)]
            for doc in removed:
                del self._docs[doc["_id"]]
        return removed

    def _update(
        self, doc_id: str, update: Update, expected_version: int | None, upsert: bool
    ) -> tuple[dict | None, dict] | None:
        with self._db.lock:
            current = self._get([doc_id]).get(doc_id)
            self.check_version(doc_id, current, expected_version)
            if current is None and not upsert:
                return None
            new = apply_update(current if current is not None else {}, update)
            new["_id"], new["_version"] = doc_id, 1 if current is None else current["_version"] + 1
            self._docs[doc_id] = _as_text(new)
        return current, new

    def _put_blob(self, blob_id: str, data: bytes) -> None:
        with self._db.lock:
            self._blobs[blob_id] = bytes(data)

    def _get_blob(self, blob_id: str) -> bytes:
        with self._db.lock:
            data = self._blobs.get(blob_id)
        if data is None:
            raise NotFoundError("blob", blob_id, self._where())
        return data

    def _delete_blobs(self, blob_ids: Iterable[str]) -> None:
        with self._db.lock:
            for blob_id in blob_ids:
                self._blobs.pop(blob_id, None)
