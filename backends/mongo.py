"""MongoInterface: documents in a MongoDB collection, blobs in GridFS (pymongo).

``MongoInterface(db_name, collection_name, hostname, port)`` as in the design
notes, or ``open_db("mongodb://host:port/db/collection")`` (credentials and
query options such as ``?serverSelectionTimeoutMS=2000`` pass through to
pymongo; ``collection=`` overrides the collection).

Documents are stored as they come out of :mod:`ptutils.codec` with ``_id`` (a
string) and ``_version``.  Blobs (so arrays and tensors over the codec's
threshold) go to the GridFS bucket ``<collection>.blobs`` under the file name
``<blob id>``: a new revision is uploaded (chunks first, the files document
last) and older revisions are deleted afterwards, so a reader always finds a
complete latest revision.  The base class writes a document's blobs before the
document.  Indexes on ``session_id``, ``state`` and ``parent_id`` are created on
a collection's first write.  Writes use pymongo's retryable writes.

Queries are rendered to a Mongo filter with the semantics of
:func:`ptutils.query.matches`, which differ from MongoDB's own in three places
that the rendering closes with ``$type`` guards:

* MongoDB matches array *elements* (``{"a": 1}`` matches ``[1, 2]``) and walks
  arrays along a dotted path (``{"a.b": 1}`` matches ``{"a": [{"b": 1}]}``,
  ``a.0`` indexes); here a list is a value of its own and a path through a list
  is missing, so every positive comparison requires each prefix of the path and
  the value itself not to be an array (``{"$not": {"$type": "array"}}``).
* ``{"a.b": None}`` also matches when a prefix is an array.
* Negations (``$ne``, ``$nin``, ``$exists: false``) are ``$nor`` of the
  positive filter, which negates exactly.

A lone equality (or ``$in``) on an indexed field, the status query of sessions,
is the index's plain ``{field: value}`` filter, whose only extra matches (arrays
holding the value) are dropped by a type check on the returned documents.

Type bracketing is MongoDB's own and matches ours: ``true != 1``, numbers
compare across int/long/double by value, orderings match one type only,
strings compare in code point order.  Sorting follows the ptutils order
(missing < null < numbers < strings < booleans) rather than MongoDB's (where
missing equals null and booleans come after objects), so a sorted load is an
aggregation that ranks each key with ``$type`` first.  Projections fetch the
top-level fields and are finished in Python with :func:`ptutils.query.project`.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import bson
import gridfs
import pymongo
import pymongo.errors
from bson.codec_options import CodecOptions, TypeDecoder, TypeRegistry
from bson.errors import BSONError
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument

from ptutils.codec import TAG, Untagged
from ptutils.database import DEFAULT_COLLECTION, DBInterface
from ptutils.errors import (
    BackendUnavailableError,
    CodecError,
    DocumentTooLargeError,
    InvalidIdError,
    NotFoundError,
    StorageError,
)
from ptutils.query import (
    And,
    Compare,
    Exists,
    Node,
    Or,
    Path,
    Update,
    apply_update,
    project,
)

log = logging.getLogger("ptutils")

INDEXED_FIELDS = ("session_id", "state", "parent_id")
GRIDFS_CHUNK = 1024 * 1024
"""GridFS chunk size: large chunks mean fewer round trips for checkpoints (each chunk is one BSON document)."""
DB_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,63}")
DEFAULT_TIMEOUT_MS = 10_000
_CONFIGURED_TIMEOUTS = re.compile(r"\s*\(configured timeouts:[^)]*\)")

_NUMBER_TYPES = ["int", "long", "double", "decimal"]
_DELETE_BATCH = 500
_READ_RETRIES = 3
_T = TypeVar("_T")

MATCH_NOTHING: dict = {"_id": {"$in": []}}


class _Int64AsInt(TypeDecoder):
    """Decode BSON int64 as a Python int (bson's Int64 is an int subclass that would otherwise leak out)."""

    bson_type = Int64

    def transform_bson(self, value: Any) -> int:
        return int(value)


_READ_OPTIONS = CodecOptions(type_registry=TypeRegistry([_Int64AsInt()]))
_TAG_KEY = TAG.encode() + b"\x00"
"""How the tag key appears in BSON (a C string); a value spelling it only costs a full decode."""


def _stored(raw: RawBSONDocument) -> dict:
    """A stored document from its BSON bytes; :class:`Untagged` when no tag key can occur in it."""
    data = raw.raw
    if type(data) is not bytes:
        data = bytes(data)  # a memoryview for large replies: its `in` tests items, not substrings
    doc = bson.decode(data, codec_options=_READ_OPTIONS)
    return doc if _TAG_KEY in data else Untagged(doc)


def _plain(value: Any) -> Any:
    """A stored document with bson's Int64 (returned for 64-bit integers) turned back into int."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if type(value) is Int64:
        return int(value)
    return value


def _id_key(doc: dict) -> tuple:
    """MongoDB's order of string ids (binary, as Python compares str); any other id (a damaged store) last."""
    key = doc.get("_id")
    return (0, key) if type(key) is str else (1, repr(key))


# --------------------------------------------------------------------------- filters
def _dotted(path: Sequence[str]) -> str:
    return ".".join(path)


def _not_array(path: Path, upto: int) -> list[dict]:
    """No prefix of ``path`` of length 1..``upto`` is an array."""
    return [{_dotted(path[:i]): {"$not": {"$type": "array"}}} for i in range(1, upto + 1)]


def _all(clauses: list[dict]) -> dict:
    clauses = [c for c in clauses if c]
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _any(clauses: list[dict]) -> dict:
    if not clauses:
        return dict(MATCH_NOTHING)
    if any(not c for c in clauses):
        return {}
    return clauses[0] if len(clauses) == 1 else {"$or": clauses}


def _negate(clause: dict) -> dict:
    return {"$nor": [clause]} if clause else dict(MATCH_NOTHING)


def _equal(path: Path, value: Any) -> dict:
    key = _dotted(path)
    if value is None:
        through_list = [{_dotted(path[:i]): {"$type": "array"}} for i in range(1, len(path))]
        return _any(through_list + [{key: {"$eq": None, "$not": {"$type": "array"}}}])
    return _all(_not_array(path, len(path)) + [{key: {"$eq": value}}])


def _any_of(path: Path, values: Sequence[Any]) -> dict:
    present = [v for v in values if v is not None]
    clauses = []
    if present:
        clauses.append(_all(_not_array(path, len(path)) + [{_dotted(path): {"$in": present}}]))
    if len(present) < len(values):
        clauses.append(_equal(path, None))
    return _any(clauses)


def render_filter(node: Node) -> dict:
    """The Mongo filter with exactly the semantics of :func:`ptutils.query.matches` for ``node``."""
    if isinstance(node, And):
        return _all([render_filter(c) for c in node.clauses])
    if isinstance(node, Or):
        return _any([render_filter(c) for c in node.clauses])
    path = node.path
    if isinstance(node, Exists):
        present = _all(_not_array(path, len(path) - 1) + [{_dotted(path): {"$exists": True}}])
        return present if node.exists else _negate(present)
    assert isinstance(node, Compare)
    op, value = node.op, node.value
    if op == "$eq":
        return _equal(path, value)
    if op == "$ne":
        return _negate(_equal(path, value))
    if op == "$in":
        return _any_of(path, value)
    if op == "$nin":
        return _negate(_any_of(path, value))
    return _all(_not_array(path, len(path)) + [{_dotted(path): {op: value}}])


def _sort_stage_keys(path: Path) -> tuple[dict, Any]:
    """Aggregation expressions ranking the value at ``path`` by kind, and the value to order within a kind."""
    kind = {"$type": "$" + _dotted(path)}
    rank: Any = {
        "$switch": {
            "branches": [
                {"case": {"$eq": [kind, "missing"]}, "then": 0},
                {"case": {"$eq": [kind, "null"]}, "then": 1},
                {"case": {"$in": [kind, _NUMBER_TYPES]}, "then": 2},
                {"case": {"$eq": [kind, "string"]}, "then": 3},
                {"case": {"$eq": [kind, "bool"]}, "then": 4},
            ],
            "default": 5,
        }
    }
    prefixes = [{"$eq": [{"$type": "$" + _dotted(path[:i])}, "object"]} for i in range(1, len(path))]
    if prefixes:
        rank = {"$cond": [{"$and": prefixes}, rank, 0]}
    return rank, "$" + _dotted(path)


def _prefilter(node: Node) -> tuple[int, dict] | None:
    """The position of the first clause of ``node`` answerable from an index, and its plain filter."""
    clauses = node.clauses if isinstance(node, And) else (node,)
    for i, clause in enumerate(clauses):
        if not isinstance(clause, Compare) or len(clause.path) != 1:
            continue
        field = clause.path[0]
        if field not in ("_id", *INDEXED_FIELDS):
            continue
        if clause.op == "$eq" and clause.value is not None:
            return i, {field: clause.value}
        if clause.op == "$in" and clause.value and None not in clause.value:
            return i, {field: {"$in": list(clause.value)}}
    return None


def index_prefilter(node: Node) -> dict | None:
    """A single-field filter on an indexed field implied by ``node`` (a superset of its matches), or None.

    It is MongoDB's plain ``{field: value}`` / ``{field: {"$in": [...]}}``, which
    also matches arrays holding the value, so it only narrows; the exact filter
    follows in a second ``$match``.  Servers whose planners use an index only for
    a lone predicate (secantus) then still answer status queries from the index.
    """
    found = _prefilter(node)
    return None if found is None else found[1]


def match_stages(node: Node) -> list[dict]:
    """``$match`` stages selecting exactly the documents ``node`` matches (index-friendly first).

    After the index prefilter the second stage only checks what it leaves open:
    the field not being an array (never one for ``_id``) and the other clauses.
    """
    found = _prefilter(node)
    if found is None:
        return [{"$match": render_filter(node)}]
    i, pre = found
    clauses = node.clauses if isinstance(node, And) else (node,)
    field = next(iter(pre))
    rest = [render_filter(c) for k, c in enumerate(clauses) if k != i]
    residual = _all(([] if field == "_id" else _not_array((field,), 1)) + rest)
    return [{"$match": pre}] + ([{"$match": residual}] if residual else [])


def find_pipeline(
    node: Node,
    sort: list[tuple[Path, int]],
    limit: int | None,
    skip: int,
    fields: dict | None = None,
    *,
    id_order: bool = True,
) -> list[dict]:
    """An aggregation that filters, sorts in the ptutils order (ties by _id), skips and limits.

    ``id_order=False`` leaves out the ``$sort`` by _id of an unsorted, unlimited
    query: the caller orders the results itself.
    """
    pipeline = match_stages(node)
    if not sort:
        pipeline += [{"$sort": {"_id": 1}}] if id_order or skip or limit is not None else []
        pipeline += [{"$skip": skip}] if skip else []
        pipeline += [{"$limit": limit}] if limit is not None else []
        return pipeline + ([{"$project": fields}] if fields else [])
    keys: dict[str, Any] = {"doc": "$$ROOT"}
    order: dict[str, int] = {}
    for i, (path, direction) in enumerate(sort):
        rank, value = _sort_stage_keys(path)
        keys[f"k{i}"] = rank
        keys[f"v{i}"] = {"$cond": [{"$in": [rank, [2, 3, 4]]}, value, None]}
        order[f"k{i}"] = direction
        order[f"v{i}"] = direction
    order["doc._id"] = 1
    pipeline += [{"$project": keys}, {"$sort": order}]
    pipeline += [{"$skip": skip}] if skip else []
    pipeline += [{"$limit": limit}] if limit is not None else []
    pipeline.append({"$replaceRoot": {"newRoot": "$doc"}})
    return pipeline + ([{"$project": fields}] if fields else [])


# --------------------------------------------------------------------------- URLs
def _split_url(url: str) -> tuple[str, str, str | None, str]:
    """``mongodb://netloc/db/collection?query`` -> (netloc, db, collection or None, query)."""
    parts = urlsplit(url)
    if not parts.scheme.lower().startswith("mongodb"):
        raise StorageError(f"not a MongoDB URL: {url!r}")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if len(segments) > 2:
        raise StorageError(f"{url!r}: expected mongodb://host:port/db/collection")
    db = segments[0] if segments else "ptutils"
    collection = segments[1] if len(segments) == 2 else None
    return parts.netloc, db, collection, parts.query


def _hide_password(netloc: str) -> str:
    if "@" not in netloc:
        return netloc
    auth, _, hosts = netloc.rpartition("@")
    user = auth.split(":", 1)[0]
    return f"{user}:***@{hosts}" if ":" in auth else netloc


class _Shared:
    """What an interface shares with its sibling collections: the client and which indexes exist."""

    def __init__(self, client: pymongo.MongoClient, scheme: str, netloc: str, query: str, owner: bool):
        self.client = client
        self.scheme = scheme
        self.netloc = netloc
        self.query = query
        self.owns_client = owner
        self.indexed: set[str] = set()
        self.lock = threading.Lock()
        self.closed = False


class MongoInterface(DBInterface):
    """Simple and lightweight MongoDB interface for saving experimental data (see module doc)."""

    scheme = "mongodb"

    def __init__(
        self,
        db_name: str = "ptutils",
        collection_name: str = DEFAULT_COLLECTION,
        hostname: str = "localhost",
        port: int | str = 27017,
        *,
        client: pymongo.MongoClient | None = None,
        **client_options: Any,
    ):
        """Connect (lazily) to ``hostname:port`` and use ``db_name.collection_name``.

        ``client`` reuses an existing MongoClient (not closed by :meth:`close`);
        other keyword arguments go to ``pymongo.MongoClient``.
        """
        super().__init__(collection_name)
        if not isinstance(db_name, str) or not DB_NAME_PATTERN.fullmatch(db_name):
            raise InvalidIdError("database name", db_name, "use 1-63 characters from [A-Za-z0-9_-]")
        self.db_name = db_name
        if client is None:
            try:
                port_number = int(port)
            except (TypeError, ValueError):
                raise StorageError(f"MongoDB port must be a number, got {port!r}") from None
            host = f"[{hostname}]" if ":" in hostname and not hostname.startswith("[") else hostname
            netloc = f"{host}:{port_number}"
            client = pymongo.MongoClient(f"mongodb://{netloc}/", **self._client_defaults(client_options))
            self._shared = _Shared(client, "mongodb", netloc, "", owner=True)
        else:
            address = client.address if client.topology_description.has_known_servers else None
            netloc = f"{address[0]}:{address[1]}" if address else f"{hostname}:{port}"
            self._shared = _Shared(client, "mongodb", netloc, "", owner=False)
        self._owner = True

    @staticmethod
    def _client_defaults(options: dict[str, Any]) -> dict[str, Any]:
        defaults = {"serverSelectionTimeoutMS": DEFAULT_TIMEOUT_MS, "retryWrites": True, "retryReads": True}
        lowered = {k.lower() for k in options}
        return {**{k: v for k, v in defaults.items() if k.lower() not in lowered}, **options}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MongoInterface:
        """``mongodb://[user:pass@]host:port[,host:port]/db/collection[?options]``; ``collection=`` overrides."""
        netloc, db_name, url_collection, query = _split_url(url)
        collection = options.pop("collection") if "collection" in options else url_collection or DEFAULT_COLLECTION
        self = object.__new__(cls)
        DBInterface.__init__(self, collection)
        if not DB_NAME_PATTERN.fullmatch(db_name):
            raise InvalidIdError("database name", db_name, "use 1-63 characters from [A-Za-z0-9_-]")
        self.db_name = db_name
        scheme = urlsplit(url).scheme.lower()
        uri_options = {k.lower() for k, _ in parse_qsl(query)}
        defaults = {k: v for k, v in cls._client_defaults({}).items() if k.lower() not in uri_options}
        client = pymongo.MongoClient(
            f"{scheme}://{netloc}/{quote(db_name)}" + (f"?{query}" if query else ""), **{**defaults, **options}
        )
        self._shared = _Shared(client, scheme, netloc, query, owner=True)
        self._owner = True
        return self

    @property
    def url(self) -> str:
        shared = self._shared
        query = f"?{shared.query}" if shared.query else ""
        return f"{shared.scheme}://{shared.netloc}/{quote(self.db_name)}/{self.collection_name}{query}"

    def __repr__(self) -> str:
        shared = self._shared
        return (
            f"{type(self).__name__}('{shared.scheme}://{_hide_password(shared.netloc)}/{self.db_name}', "
            f"collection={self.collection_name!r})"
        )

    def _no_server(self, exc: pymongo.errors.ServerSelectionTimeoutError) -> str:
        """One line for an unreachable server: where, how long it waited, the first error, how to wait less or more."""
        first = _CONFIGURED_TIMEOUTS.sub("", str(exc).split(", Timeout:", 1)[0])
        waited = self._shared.client.options.server_selection_timeout
        return (f"{self._where()}: no MongoDB server answered within {waited:g}s ({first}); "
                "set how long to wait with ?serverSelectionTimeoutMS=... in the URL")

    def _where(self) -> str:
        return f"mongodb://{_hide_password(self._shared.netloc)}/{self.db_name} collection {self.collection_name!r}"

    @property
    def client(self) -> pymongo.MongoClient:
        """The pymongo client (shared with sibling collections)."""
        return self._shared.client

    @functools.cached_property
    def _coll(self) -> pymongo.collection.Collection:
        return self._shared.client[self.db_name][self.collection_name]

    @functools.cached_property
    def _raw_coll(self) -> pymongo.collection.Collection:
        """The collection returning :class:`RawBSONDocument` (reads decode them with :func:`_stored`)."""
        return self._coll.with_options(codec_options=CodecOptions(document_class=RawBSONDocument))

    @functools.cached_property
    def _bucket(self) -> gridfs.GridFSBucket:
        return gridfs.GridFSBucket(
            self._shared.client[self.db_name],
            bucket_name=f"{self.collection_name}.blobs",
            chunk_size_bytes=GRIDFS_CHUNK,
        )

    @functools.cached_property
    def _files(self) -> pymongo.collection.Collection:
        return self._shared.client[self.db_name][f"{self.collection_name}.blobs.files"]

    def _sibling(self, collection: str) -> MongoInterface:
        sibling = object.__new__(type(self))
        DBInterface.__init__(sibling, collection)
        sibling.db_name = self.db_name
        sibling._shared = self._shared
        sibling._owner = False
        return sibling

    def ping(self) -> None:
        self._call(lambda: self._shared.client.admin.command("ping"), write=False)

    def close(self) -> None:
        """Close the client (from the interface that created it; siblings share it)."""
        shared = self._shared
        if self._owner and not shared.closed:
            shared.closed = True
            if shared.owns_client:
                shared.client.close()

    # ----------------------------------------------------------------- errors
    def _call(self, fn: Callable[[], _T], *, write: bool) -> _T:
        """Run ``fn`` mapping pymongo errors to ptutils ones; reads are retried after a dropped connection."""
        if self._shared.closed:
            raise StorageError(f"{self._where()}: the interface is closed")
        attempt = 0
        while True:
            try:
                return fn()
            except pymongo.errors.ServerSelectionTimeoutError as exc:
                raise BackendUnavailableError(self._no_server(exc)) from exc
            except pymongo.errors.ConnectionFailure as exc:
                if write or attempt >= _READ_RETRIES:
                    note = "; the write may or may not have been applied" if write else ""
                    raise BackendUnavailableError(f"{self._where()}: connection failed ({exc}){note}") from exc
                delay = 0.1 * (2**attempt)
                log.warning("ptutils: %s: connection failed (%s), retrying in %.1fs", self._where(), exc, delay)
                time.sleep(delay)
                attempt += 1
            except pymongo.errors.DocumentTooLarge as exc:
                raise DocumentTooLargeError(f"{self._where()}: {exc}") from exc
            except pymongo.errors.OperationFailure as exc:
                if exc.code in (10334, 17419, 17420):
                    raise DocumentTooLargeError(f"{self._where()}: {exc}") from exc
                raise StorageError(f"{self._where()}: {exc}") from exc
            except UnicodeEncodeError as exc:
                raise CodecError(
                    "", f"{self._where()}: text with a lone surrogate cannot be stored or queried in BSON ({exc})"
                ) from exc
            except (BSONError, OverflowError) as exc:
                raise StorageError(f"{self._where()}: cannot encode the document for MongoDB ({exc})") from exc
            except pymongo.errors.PyMongoError as exc:
                raise StorageError(f"{self._where()}: {exc}") from exc

    def _ensure_indexes(self) -> None:
        shared = self._shared
        if self.collection_name in shared.indexed:
            return
        with shared.lock:
            if self.collection_name in shared.indexed:
                return
            coll = self._coll
            for field in INDEXED_FIELDS:
                coll.create_index([(field, pymongo.ASCENDING)], name=field)
            shared.indexed.add(self.collection_name)

    # ----------------------------------------------------------------- primitives
    def _write(self, doc_id: str, body: dict) -> dict | None:
        fields = {k: v for k, v in body.items() if k not in ("_id", "_version")}

        def op() -> dict | None:
            self._ensure_indexes()
            coll = self._coll
            try:
                coll.insert_one({"_id": doc_id, "_version": 1, **fields})
                return None
            except pymongo.errors.DuplicateKeyError:
                return self._replace_existing(coll, doc_id, fields)

        return self._call(op, write=True)

    def _write_many(self, items: Sequence[tuple[str, dict]]) -> list[dict | None]:
        """Insert the new documents with one ``insert_many``; replace the others one by one."""
        if len(items) == 1:
            return [self._write(*items[0])]
        docs = [(doc_id, {k: v for k, v in body.items() if k not in ("_id", "_version")}) for doc_id, body in items]

        def op() -> list[dict | None]:
            self._ensure_indexes()
            coll = self._coll
            exists: set[int] = set()
            try:
                coll.insert_many([{"_id": i, "_version": 1, **f} for i, f in docs], ordered=False)
            except pymongo.errors.BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                for error in errors:
                    if error.get("code") != 11000:  # not "exists": report it as a single insert would have
                        raise pymongo.errors.OperationFailure(error.get("errmsg", str(exc)), error.get("code")) from exc
                exists = {e["index"] for e in errors}
            return [self._replace_existing(coll, *docs[n]) if n in exists else None for n in range(len(docs))]

        return self._call(op, write=True)

    @staticmethod
    def _replace_existing(coll: Any, doc_id: str, fields: dict) -> dict | None:
        """Replace a stored document (version + 1); the old one, or None if it vanished and was inserted."""
        while True:
            old = _plain(coll.find_one({"_id": doc_id}))
            if old is None:
                try:
                    coll.insert_one({"_id": doc_id, "_version": 1, **fields})
                    return None
                except pymongo.errors.DuplicateKeyError:
                    continue
            new = {"_id": doc_id, "_version": old["_version"] + 1, **fields}
            if coll.replace_one({"_id": doc_id, "_version": old["_version"]}, new).matched_count == 1:
                return old

    def _get(self, ids: Sequence[str]) -> dict[str, dict]:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return {}
        return self._call(
            lambda: {doc["_id"]: doc for doc in map(_stored, self._raw_coll.find({"_id": {"$in": unique}}))},
            write=False,
        )

    def _find(
        self, query: Node, sort: list[tuple[Path, int]], limit: int | None, skip: int, projection: list[Path] | None
    ) -> list[dict]:
        fields = None if projection is None else {"_id": 1, **{path[0]: 1 for path in projection}}
        # Without a sort, skip or limit every match comes back: ordering them by _id here spares the
        # server a sort stage (a blocking one on some servers) for what is usually a handful of documents.
        server_order = bool(sort) or bool(skip) or limit is not None
        pre = index_prefilter(query)
        lone = pre is not None and not server_order and projection is None and not isinstance(query, And)

        def op() -> list[dict]:
            if lone:
                # The status query: the index answers it up to arrays holding the value (MongoDB's $eq/$in
                # match those), which the type check below drops, as a second $match would on the server.
                field = next(iter(pre))
                return [d for d in map(_stored, self._raw_coll.find(pre)) if type(d.get(field)) is not list]
            if sort or pre is not None:
                pipeline = find_pipeline(query, sort, limit, skip, fields, id_order=server_order)
                return list(map(_stored, self._raw_coll.aggregate(pipeline)))
            cursor = self._raw_coll.find(render_filter(query), fields)
            if server_order:
                cursor = cursor.sort("_id", pymongo.ASCENDING).skip(skip)
                if limit is not None:
                    cursor = cursor.limit(limit)
            return list(map(_stored, cursor))

        docs = self._call(op, write=False)
        if not server_order:
            docs.sort(key=_id_key)
        return docs if projection is None else [project(d, projection) for d in docs]

    def _count(self, query: Node) -> int:
        def op() -> int:
            if index_prefilter(query) is None:
                return self._coll.count_documents(render_filter(query))
            counted = list(self._coll.aggregate([*match_stages(query), {"$count": "n"}]))
            return int(counted[0]["n"]) if counted else 0

        return self._call(op, write=False)

    def _delete_matching(self, flt: dict, pre: dict | None = None) -> list[dict]:
        """Delete every match, returning exactly the stored documents this call removed."""
        stages = ([{"$match": pre}] if pre is not None else []) + [{"$match": flt}, {"$limit": _DELETE_BATCH}]

        def op() -> list[dict]:
            coll = self._coll
            removed: list[dict] = []
            stalled = 0
            while True:
                batch = [_plain(d) for d in coll.aggregate(stages)]
                if not batch:
                    return removed
                guard = {"$or": [{"_id": d["_id"], "_version": d.get("_version")} for d in batch]}
                deleted = coll.delete_many(guard).deleted_count
                if deleted == len(batch):
                    removed.extend(batch)
                else:
                    # Some changed in between: those still present were not deleted by us.
                    left = {d["_id"] for d in coll.find({"_id": {"$in": [d["_id"] for d in batch]}}, {"_id": 1})}
                    removed.extend(d for d in batch if d["_id"] not in left)
                stalled = stalled + 1 if deleted == 0 else 0
                if stalled > 20:
                    raise StorageError(f"{self._where()}: matching documents keep changing; delete abandoned")

        return self._call(op, write=True)

    def _remove_ids(self, ids: Sequence[str]) -> list[dict]:
        unique = list(dict.fromkeys(ids))
        return self._delete_matching({"_id": {"$in": unique}}) if unique else []

    def _remove_query(self, query: Node) -> list[dict]:
        return self._delete_matching(render_filter(query), index_prefilter(query))

    def _update(
        self, doc_id: str, update: Update, expected_version: int | None, upsert: bool
    ) -> tuple[dict | None, dict] | None:
        def op() -> tuple[dict | None, dict] | None:
            self._ensure_indexes()
            coll = self._coll
            while True:
                current = _plain(coll.find_one({"_id": doc_id}))
                self.check_version(doc_id, current, expected_version)
                if current is None:
                    if not upsert:
                        return None
                    new = apply_update({"_id": doc_id}, update)
                    new["_version"] = 1
                    try:
                        coll.insert_one(dict(new))
                    except pymongo.errors.DuplicateKeyError:
                        continue
                    return None, new
                new = apply_update(current, update)
                new["_version"] = current["_version"] + 1
                if coll.replace_one({"_id": doc_id, "_version": current["_version"]}, new).matched_count == 1:
                    return current, new

        return self._call(op, write=True)

    def _latest_file(self, blob_id: str) -> dict | None:
        return self._files.find_one({"filename": blob_id}, sort=[("uploadDate", -1), ("_id", -1)])

    def _put_blob(self, blob_id: str, data: bytes) -> None:
        def op() -> None:
            bucket = self._bucket
            file_id = bucket.upload_from_stream(blob_id, data)
            mine = self._files.find_one({"_id": file_id}, {"uploadDate": 1})
            older = {
                "filename": blob_id,
                "$or": [
                    {"uploadDate": {"$lt": mine["uploadDate"]}},
                    {"uploadDate": mine["uploadDate"], "_id": {"$lt": file_id}},
                ],
            }
            for stale in self._files.find(older, {"_id": 1}):
                try:
                    bucket.delete(stale["_id"])
                except gridfs.errors.NoFile:
                    pass

        self._call(op, write=True)

    def _get_blob(self, blob_id: str) -> bytes:
        def op() -> bytes:
            for _ in range(5):
                latest = self._latest_file(blob_id)
                if latest is None:
                    raise NotFoundError("blob", blob_id, self._where())
                try:
                    return self._bucket.open_download_stream(latest["_id"]).read()
                except (gridfs.errors.NoFile, gridfs.errors.CorruptGridFile):
                    continue  # replaced while we read it: read the new latest revision
            raise StorageError(f"{self._where()}: blob {blob_id!r} keeps changing while being read")

        return self._call(op, write=False)

    def _delete_blobs(self, blob_ids: Iterable[str]) -> None:
        unique = list(dict.fromkeys(blob_ids))
        if not unique:
            return

        def op() -> None:
            bucket = self._bucket
            for start in range(0, len(unique), _DELETE_BATCH):
                batch = unique[start : start + _DELETE_BATCH]
                for stale in self._files.find({"filename": {"$in": batch}}, {"_id": 1}):
                    try:
                        bucket.delete(stale["_id"])
                    except gridfs.errors.NoFile:
                        pass

        self._call(op, write=True)
