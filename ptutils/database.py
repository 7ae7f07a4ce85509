"""DBInterface: the one storage contract every backend implements, and open_db(url).

The public API (``save``, ``load``, ``load_from_id``, ``load_from_ids``,
``delete``, ``update``, ``count``, blob put/get) lives here, once: it validates
ids and queries, encodes documents with :mod:`ptutils.codec` (large arrays go
out of line as blobs, written *before* the document that points to them) and
cleans up blobs a document no longer references.  A backend implements only the
small set of primitives at the bottom of :class:`DBInterface`, on documents that
are already encoded to plain JSON.

Every stored document carries ``_id`` (a string) and ``_version`` (an integer
bumped by every write), which makes optimistic updates possible
(``update(id, changes, expected_version=n)``).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import queue
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from types import TracebackType
from typing import Any, ClassVar, Union
from urllib.parse import urlsplit

from . import codec
from .errors import ConflictError, CorruptionError, InvalidIdError, NotFoundError, StorageError
from .query import Node, Path, Update, parse_projection, parse_query, parse_sort, parse_update

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
COLLECTION_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
DEFAULT_COLLECTION = "documents"
_READ_ATTEMPTS = 8

Buffer = Union[bytes, bytearray, memoryview]
BlobData = Union[Buffer, Iterable[Buffer]]
"""What ``put_blob`` takes: one bytes-like object, or an iterable of them stored one after another."""


def new_id() -> str:
    """A fresh document or blob id: 32 hex characters, safe in paths and URLs."""
    return uuid.uuid4().hex


def is_valid_id(value: Any) -> bool:
    """Whether ``value`` is a safe id (see :func:`check_id`)."""
    return isinstance(value, str) and bool(ID_PATTERN.fullmatch(value)) and ".." not in value


def stored_refs(doc: Any) -> set[str]:
    """The blob ids a stored document points to; invalid references (a damaged store) are ignored."""
    return {ref for ref in codec.blob_refs(doc) if is_valid_id(ref)}


def check_id(value: Any, kind: str = "id") -> str:
    """Return ``value`` if it is a safe id, else raise InvalidIdError naming it."""
    if not isinstance(value, str):
        raise InvalidIdError(kind, value, f"must be a string, not {type(value).__name__}")
    if not ID_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidIdError(
            kind, value, "use 1-128 characters from [A-Za-z0-9_.-], not starting with '.', without '..'"
        )
    return value


def check_collection(name: Any) -> str:
    """Return ``name`` if it is a safe collection name, else raise InvalidIdError."""
    if not isinstance(name, str) or not COLLECTION_PATTERN.fullmatch(name):
        raise InvalidIdError("collection name", name, "use a letter or '_' then up to 62 of [A-Za-z0-9_]")
    return name


def blob_parts(data: BlobData) -> list[memoryview]:
    """``data`` as a list of flat byte views over the caller's memory (no copy unless non-contiguous)."""
    try:
        pieces = [memoryview(data)]  # type: ignore[arg-type]
    except TypeError:
        if isinstance(data, str):
            raise TypeError("a blob holds bytes, not str") from None
        pieces = [memoryview(piece) for piece in data]  # type: ignore[union-attr]
    return [_flat(p) for p in pieces if p.nbytes]


def _flat(view: memoryview) -> memoryview:
    """``view`` as a 1-D view of unsigned bytes, copied only where it cannot be cast (non-contiguous)."""
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    try:
        return view.cast("B")
    except TypeError:
        return memoryview(view.tobytes())


def _joined(parts: list[memoryview]) -> bytes:
    """The concatenation of ``parts``; a single ``bytes`` part is passed on without a copy."""
    if len(parts) == 1 and isinstance(parts[0].obj, bytes) and parts[0].nbytes == len(parts[0].obj):
        return parts[0].obj
    return b"".join(parts)


class Sha256Pipe:
    """SHA-256 of buffers fed in order, computed on a helper thread while the caller reads or writes.

    hashlib releases the GIL while it hashes a large buffer, so the hashing and
    the caller's I/O proceed in parallel.  Inputs under ``threshold`` bytes in
    all are hashed inline.  The buffers must not change until :meth:`hexdigest`.
    """

    def __init__(self, nbytes: int, threshold: int = 1 << 20):
        self._sha = hashlib.sha256()
        self._queue: queue.SimpleQueue[memoryview | None] | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        if nbytes >= threshold:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="ptutils-sha256", daemon=True)
            self._thread.start()

    @property
    def threaded(self) -> bool:
        """Whether a helper thread hashes (the input is large enough)."""
        return self._queue is not None

    def _run(self) -> None:
        assert self._queue is not None
        while (buf := self._queue.get()) is not None:
            if self._error is None and not self._abandoned:
                try:
                    self._sha.update(buf)
                except BaseException as exc:  # re-raised by hexdigest() in the caller's thread
                    self._error = exc

    def update(self, buf: Buffer) -> None:
        """Hash ``buf`` after everything fed before it."""
        if self._queue is None:
            self._sha.update(buf)
        else:
            self._queue.put(memoryview(buf))

    def close(self) -> None:
        """Wait for the helper thread (if any) to finish what it was fed."""
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    def hexdigest(self) -> str:
        """The hex digest of everything fed."""
        self.close()
        if self._error is not None:
            raise self._error
        return self._sha.hexdigest()

    def __enter__(self) -> Sha256Pipe:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._abandoned = exc is not None
        self.close()


class DBInterface(abc.ABC):
    """Abstract storage of documents and blobs in one named collection.

    ``db.collection(name)`` returns an interface over a sibling collection that
    shares the connection; a session keeps its status records, metrics and
    checkpoints in sibling collections of the database it was given.
    """

    scheme: ClassVar[str] = ""
    blob_threshold: int = codec.BLOB_THRESHOLD

    def __init__(self, collection: str = DEFAULT_COLLECTION):
        self.collection_name = check_collection(collection)

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, **options: Any) -> DBInterface:
        """Build an interface from its URL (see :func:`open_db`)."""

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """A URL that :func:`open_db` turns back into an equivalent interface."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, collection={self.collection_name!r})"

    # ----------------------------------------------------------------- public API
    def save(self, doc: Mapping[str, Any]) -> str:
        """Store ``doc`` and return its id; a doc with an ``_id`` replaces that document."""
        written: list[str] = []
        doc_id, encoded = self._prepare_save(doc, written, "save()")
        try:
            old = self._write(doc_id, encoded)
        except BaseException:
            self._delete_blobs(written)
            raise
        if old is not None:
            self._delete_blobs(stored_refs(old) - set(written))
        return doc_id

    def save_many(self, docs: Iterable[Mapping[str, Any]]) -> list[str]:
        """:meth:`save` each of ``docs`` in one lock, transaction or round trip; returns their ids.

        Every document is checked and encoded before any is written, so a bad
        one stores nothing.  Each is written atomically; if the database fails
        part-way some may be stored, and saving them again replaces them.
        """
        written: list[str] = []
        try:
            prepared = [self._prepare_save(doc, written, "save_many()") for doc in docs]
            olds = self._write_many(prepared) if prepared else []
        except BaseException:
            self._delete_blobs(written)
            raise
        kept = set(written)
        stale: set[str] = set()
        for old in olds:
            if old is not None:
                stale |= stored_refs(old) - kept
        self._delete_blobs(stale)
        return [doc_id for doc_id, _ in prepared]

    def _prepare_save(self, doc: Mapping[str, Any], written: list[str], caller: str) -> tuple[str, dict]:
        """The id and encoded body of a document to save (its large arrays already stored as blobs)."""
        if not isinstance(doc, Mapping):
            raise TypeError(f"{caller} expects mappings, got {type(doc).__name__}")
        body = {k: v for k, v in doc.items() if k not in ("_id", "_version")}
        doc_id = check_id(doc["_id"]) if "_id" in doc else new_id()
        return doc_id, self._encode(body, written)

    def load(
        self,
        query: Mapping[str, Any] | None = None,
        *,
        sort: Any = None,
        limit: int | None = None,
        skip: int = 0,
        projection: Iterable[str] | None = None,
    ) -> list[dict]:
        """Documents matching a Mongo-style ``query`` (see :mod:`ptutils.query`)."""
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be a non-negative int, got {limit!r}")
        if not isinstance(skip, int) or skip < 0:
            raise ValueError(f"skip must be a non-negative int, got {skip!r}")
        if limit == 0:
            return []
        node, order, paths = parse_query(query), parse_sort(sort), parse_projection(projection)
        return self._decode_consistent(lambda: self._find(node, order, limit, skip, paths))

    def load_one(self, query: Mapping[str, Any] | None = None, *, sort: Any = None) -> dict | None:
        """The first document matching ``query`` (in ``sort`` order), or None."""
        docs = self.load(query, sort=sort, limit=1)
        return docs[0] if docs else None

    def load_from_id(self, doc_id: str) -> dict:
        """The document with ``doc_id``; raises NotFoundError if there is none."""
        return self.load_from_ids([doc_id])[0]

    def load_from_ids(self, ids: Sequence[str]) -> list[dict]:
        """Documents for ``ids``, in the same order; raises NotFoundError for a missing one."""
        ids = [check_id(i) for i in ids]

        def fetch() -> list[dict]:
            found = self._get(ids)
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFoundError("document", ", ".join(missing), self._where())
            return [found[i] for i in ids]

        return self._decode_consistent(fetch)

    def exists(self, doc_id: str) -> bool:
        """Whether a document with ``doc_id`` is stored."""
        return check_id(doc_id) in self._get([doc_id])

    def count(self, query: Mapping[str, Any] | None = None) -> int:
        """How many documents match ``query``."""
        return self._count(parse_query(query))

    def delete(self, target: str | Mapping[str, Any]) -> int:
        """Delete one document by id, or every document matching a query; returns how many."""
        if isinstance(target, str):
            removed = self._remove_ids([check_id(target)])
        else:
            removed = self._remove_query(parse_query(target))
        refs: set[str] = set()
        for doc in removed:
            refs |= stored_refs(doc)
        self._delete_blobs(refs)
        return len(removed)

    def update(
        self, doc_id: str, changes: Mapping[str, Any], *, expected_version: int | None = None, upsert: bool = False
    ) -> dict:
        """Apply ``changes`` ($set, $unset, $inc, $push) atomically and return the new document.

        With ``expected_version`` the update only happens if the stored
        ``_version`` still equals it (else ConflictError).  With ``upsert`` a
        missing document is created from the changes.
        """
        check_id(doc_id)
        parsed = parse_update(changes)
        written: list[str] = []
        encoded = Update(
            sets=tuple((p, self._encode(v, written)) for p, v in parsed.sets),
            unsets=parsed.unsets,
            incs=parsed.incs,
            pushes=tuple((p, self._encode(v, written)) for p, v in parsed.pushes),
        )
        try:
            result = self._update(doc_id, encoded, expected_version, upsert)
        except BaseException:
            self._delete_blobs(written)
            raise
        if result is None:
            self._delete_blobs(written)
            raise NotFoundError("document", doc_id, self._where())
        old, new = result
        if old is not None:
            self._delete_blobs(stored_refs(old) - stored_refs(new))
        return self._decode(new)

    def put_blob(self, data: BlobData, blob_id: str | None = None) -> str:
        """Store bytes atomically (readers see all of them or nothing) and return the id.

        ``data`` is one bytes-like object or an iterable of them (say, views of
        tensors), stored one after the other; backends that can stream write
        them without joining them into one copy.
        """
        blob_id = check_id(blob_id, "blob id") if blob_id is not None else new_id()
        self._put_blob_parts(blob_id, blob_parts(data))
        return blob_id

    def put_blob_sha256(self, data: BlobData, blob_id: str | None = None) -> tuple[str, str]:
        """Like :meth:`put_blob`, and also return the SHA-256 (hex) of the stored bytes, hashed once."""
        blob_id = check_id(blob_id, "blob id") if blob_id is not None else new_id()
        return blob_id, self._put_blob_sha256(blob_id, blob_parts(data))

    def get_blob(self, blob_id: str) -> bytes:
        """The bytes of a blob; raises NotFoundError if there is none."""
        return self._get_blob(check_id(blob_id, "blob id"))

    def get_blob_sha256(self, blob_id: str) -> tuple[memoryview, str]:
        """A blob's bytes in a fresh writable buffer and their SHA-256 (hex), hashed once while read."""
        return self._get_blob_sha256(check_id(blob_id, "blob id"))

    def delete_blob(self, blob_id: str) -> None:
        """Remove a blob (no error if it is already gone)."""
        self._delete_blobs([check_id(blob_id, "blob id")])

    def collection(self, name: str) -> DBInterface:
        """An interface over the sibling collection ``name`` sharing this connection."""
        return self._sibling(check_collection(name))

    def ping(self) -> None:
        """Raise BackendUnavailableError if the storage cannot be reached now."""

    def close(self) -> None:
        """Release connections and handles; the interface is unusable afterwards."""

    def __enter__(self) -> DBInterface:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- helpers
    def _where(self) -> str:
        return f"{self.url} collection {self.collection_name!r}"

    def _encode(self, value: Any, written: list[str]) -> Any:
        def put(data: bytes) -> str:
            blob_id = self.put_blob(data)
            written.append(blob_id)
            return blob_id

        try:
            return codec.encode(value, put_blob=put, threshold=self.blob_threshold)
        except BaseException:
            self._delete_blobs(written)
            raise

    def _decode(self, stored: Mapping[str, Any]) -> dict:
        def get_blob(ref: Any) -> bytes:
            if not is_valid_id(ref):
                raise CorruptionError(
                    f"document {stored.get('_id')!r} in {self._where()}", f"holds an invalid blob reference {ref!r}"
                )
            return self.get_blob(ref)

        return codec.decode(stored, get_blob=get_blob)

    def _decode_consistent(self, fetch: Callable[[], list[dict]]) -> list[dict]:
        """Decode what ``fetch`` returns, fetching again if a blob vanished meanwhile.

        A concurrent save/update/delete removes the blobs of the version it
        replaced right after the replacement, so a reader that fetched that
        version just before may find one of its blobs gone: the fresh fetch
        sees the new version (or no document).  A blob that stays missing is
        a damaged document: CorruptionError.
        """
        attempts = 0
        while True:
            found = fetch()
            try:
                return [self._decode(d) for d in found]
            except NotFoundError as exc:
                owners = [d.get("_id") for d in found if exc.key in stored_refs(d)]
                if not owners:
                    raise
                attempts += 1
                if attempts >= _READ_ATTEMPTS:
                    raise CorruptionError(
                        f"document {owners[0]!r} in {self._where()}", f"its blob {exc.key!r} is missing"
                    ) from exc

    @staticmethod
    def check_version(doc_id: str, current: Mapping[str, Any] | None, expected: int | None) -> None:
        """For backends: raise ConflictError when an optimistic update lost its race."""
        if expected is None:
            return
        actual = None if current is None else current.get("_version")
        if actual != expected:
            raise ConflictError(f"document {doc_id!r} is at version {actual}, expected {expected}")

    # ----------------------------------------------------------------- primitives
    # Backends implement these on *encoded* documents (plain JSON values).  Every
    # stored document holds "_id" and "_version"; every write is atomic.

    @abc.abstractmethod
    def _sibling(self, collection: str) -> DBInterface:
        """A new interface on ``collection`` sharing this one's connection."""

    @abc.abstractmethod
    def _write(self, doc_id: str, body: dict) -> dict | None:
        """Insert or replace ``doc_id`` with ``body`` (+ _id, _version); return the replaced doc."""

    def _write_many(self, items: Sequence[tuple[str, dict]]) -> list[dict | None]:
        """:meth:`_write` each ``(id, body)``, returning the documents replaced; backends batch it."""
        return [self._write(doc_id, body) for doc_id, body in items]

    @abc.abstractmethod
    def _get(self, ids: Sequence[str]) -> dict[str, dict]:
        """Stored documents for the ids that exist, keyed by id."""

    @abc.abstractmethod
    def _find(
        self, query: Node, sort: list[tuple[Path, int]], limit: int | None, skip: int, projection: list[Path] | None
    ) -> list[dict]:
        """Matching stored documents, sorted (ties in _id order), skipped, limited and projected."""

    @abc.abstractmethod
    def _count(self, query: Node) -> int:
        """How many stored documents match."""

    @abc.abstractmethod
    def _remove_ids(self, ids: Sequence[str]) -> list[dict]:
        """Delete these ids; return the deleted stored documents."""

    @abc.abstractmethod
    def _remove_query(self, query: Node) -> list[dict]:
        """Delete every match; return the deleted stored documents."""

    @abc.abstractmethod
    def _update(
        self, doc_id: str, update: Update, expected_version: int | None, upsert: bool
    ) -> tuple[dict | None, dict] | None:
        """Atomically apply ``update`` (values encoded) and bump _version.

        Returns ``(old, new)`` stored documents (``old`` None when upserted), or
        None when the document does not exist and ``upsert`` is false.  Call
        :meth:`check_version` with the current document first.
        """

    @abc.abstractmethod
    def _put_blob(self, blob_id: str, data: bytes) -> None:
        """Store bytes under ``blob_id`` atomically (replacing any previous)."""

    @abc.abstractmethod
    def _get_blob(self, blob_id: str) -> bytes:
        """Bytes of ``blob_id``; raise NotFoundError("blob", blob_id, ...) if absent."""

    def _put_blob_parts(self, blob_id: str, parts: list[memoryview]) -> None:
        """Store the concatenation of ``parts`` like :meth:`_put_blob` (which this default joins them for)."""
        self._put_blob(blob_id, _joined(parts))

    def _put_blob_sha256(self, blob_id: str, parts: list[memoryview]) -> str:
        """:meth:`_put_blob_parts`, returning the bytes' SHA-256 (hex); this default hashes them meanwhile."""
        with Sha256Pipe(sum(p.nbytes for p in parts)) as sha:
            for part in parts:
                sha.update(part)
            self._put_blob_parts(blob_id, parts)
            return sha.hexdigest()

    def _get_blob_sha256(self, blob_id: str) -> tuple[memoryview, str]:
        """:meth:`_get_blob` into a writable buffer, with the bytes' SHA-256 (hex); this default copies and hashes."""
        data = self._get_blob(blob_id)
        with Sha256Pipe(len(data)) as sha:
            sha.update(data)
            copy = bytearray(data)
            return memoryview(copy), sha.hexdigest()

    @abc.abstractmethod
    def _delete_blobs(self, blob_ids: Iterable[str]) -> None:
        """Remove blobs, ignoring ids that do not exist."""


# ----------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[DBInterface] | str] = {}


def register_backend(scheme: str, cls: type[DBInterface] | str) -> None:
    """Make ``open_db`` route URLs with ``scheme`` to ``cls`` (a class or 'module:Class')."""
    _REGISTRY[scheme.lower()] = cls


def _scheme(url: str) -> str:
    if "://" not in url:
        raise StorageError(f"not a database URL: {url!r} (expected e.g. file:///path or sqlite:///file.db)")
    return urlsplit(url).scheme.split("+", 1)[0].lower()


def backend_for(url: str) -> type[DBInterface]:
    """The DBInterface class that handles ``url``'s scheme (built-ins, then entry points)."""
    scheme = _scheme(url)
    target = _REGISTRY.get(scheme)
    if target is None:
        for ep in metadata.entry_points(group="ptutils.backends"):
            if ep.name.lower() == scheme:
                target = ep.value
                break
    if target is None:
        known = sorted(set(_REGISTRY) | {ep.name for ep in metadata.entry_points(group="ptutils.backends")})
        raise StorageError(f"no backend for URL scheme {scheme!r} in {url!r}; known: {', '.join(known)}")
    if isinstance(target, str):
        module, _, name = target.partition(":")
        import importlib

        try:
            target = getattr(importlib.import_module(module), name)
        except ImportError as exc:
            raise StorageError(f"the backend for {scheme!r} URLs needs a missing package: {exc}") from exc
    return target


def open_db(url: str, **options: Any) -> DBInterface:
    """Open the backend for ``url``: file:///dir, sqlite:///f.db, postgresql://…, mysql+pymysql://…, mongodb://h:p/db/coll."""
    return backend_for(url).from_url(url, **options)


@contextlib.contextmanager
def opened(db: DBInterface | str) -> Iterator[DBInterface]:
    """``db`` itself, or the database its URL names, closed on exit: for calls that take either, as Session does."""
    if isinstance(db, DBInterface):
        yield db
        return
    if not isinstance(db, str):
        raise TypeError(f"db must be a DBInterface or a database URL, got {type(db).__name__}")
    interface = open_db(db)
    try:
        yield interface
    finally:
        interface.close()


for _scheme_name, _target in {
    "file": "ptutils.backends.filesystem:FileSystemInterface",
    "sqlite": "ptutils.backends.sql:SQLInterface",
    "postgresql": "ptutils.backends.sql:SQLInterface",
    "postgres": "ptutils.backends.sql:SQLInterface",
    "mysql": "ptutils.backends.sql:SQLInterface",
    "mariadb": "ptutils.backends.sql:SQLInterface",
    "mongodb": "ptutils.backends.mongo:MongoInterface",
    "replicated": "ptutils.replicated:ReplicatedInterface",
}.items():
    register_backend(_scheme_name, _target)

_LAZY = {
    "FileSystemInterface": "ptutils.backends.filesystem",
    "SQLInterface": "ptutils.backends.sql",
    "MongoInterface": "ptutils.backends.mongo",
    "ReplicatedInterface": "ptutils.replicated",
}


def __getattr__(name: str) -> Any:
    """``from ptutils.database import MongoInterface`` (as in the design notes) imports the backend on demand."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
