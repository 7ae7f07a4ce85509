"""The filesystem backend (``file:///abs/dir``): the embedded default DBInterface.

Layout under the root directory, one directory per collection::

    <root>/<collection>/docs/<id>.json    one stored (encoded) document per file
    <root>/<collection>/blobs/<id>.blob   one blob per file
    <root>/<collection>/.lock             flock()ed by every mutation of the collection

Every file is one header line followed by its payload, so a document or blob and
its checksum are replaced together by a single rename::

    b"ptutils-doc 1 <sha256 hex> <nbytes>\\n" + JSON
    b"ptutils-blob 1 <sha256 hex> <nbytes>\\n" + raw bytes

A blob is streamed from the caller's buffers (never joined into one copy) while
a helper thread hashes them; its header is written with a placeholder digest
that is filled in before the fsync.  ``get_blob_sha256`` reads a blob into one
fresh buffer, hashing each chunk while the next one is read, and hands the
verified digest on so that the caller need not hash the bytes again.

Writes are atomic: the payload goes to a temporary file in the same directory,
is fsync()ed, renamed over the target with ``os.replace`` and the directory is
fsync()ed, so a crash or a full disk leaves either the old file or the new one,
never a torn one.  Reads verify the checksum and raise CorruptionError naming
the file.  Mutations of a collection's documents (write, update, delete) hold an
exclusive ``flock`` on the collection's lock file for their read-modify-write,
which makes them safe across threads and processes on one machine; readers take
no lock (they always see a complete old or new file).  Blobs are written under
fresh or caller-chosen ids by one rename each, so they need no lock.

A writer killed mid-write leaves a ``.tmp-*`` file, which readers ignore and
the next writer of the collection removes once it is an hour old.  A corrupt
document can still be replaced (``save``) or deleted by id, so a damaged store
can be repaired through the API.  Files are created with mode 0o666 minus the
umask, so a group can share a database.

Ids and collection names are validated (:func:`ptutils.database.check_id`)
immediately before any path is built from them.  Nothing is ever pickled.
POSIX only (``fcntl``; ``flock`` on NFS depends on the server).
Case-insensitive filesystems would merge ids that differ only in case.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path as FsPath
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from ptutils.database import DEFAULT_COLLECTION, DBInterface, Sha256Pipe, check_collection, check_id
from ptutils.errors import (
    BackendUnavailableError,
    CodecError,
    CorruptionError,
    InvalidIdError,
    NotFoundError,
    SchemaVersionError,
    StorageError,
)
from ptutils.query import Node, Path, Update, apply_update, matches, project, sort_key

log = logging.getLogger("ptutils")

FORMAT_VERSION = b"1"
DOC_MAGIC = b"ptutils-doc"
BLOB_MAGIC = b"ptutils-blob"
DOC_SUFFIX = ".json"
BLOB_SUFFIX = ".blob"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600.0
"""Temporary files older than this were left by a crashed writer and are removed."""

_MAX_HEADER = 128
_WRITE_CHUNK = 1 << 30
_READ_CHUNK = 4 << 20
_DIGEST_PLACEHOLDER = b"0" * 64


_PARALLEL_HASH_MIN = 8 << 20
"""Payloads from this size on are hashed on a second thread while they are read."""
_HASH_CHUNK = 1 << 20

_TMP_TOKEN = uuid.uuid4().hex[:12]
"""Random per import: with the pid and a counter it names temporary files, so a reused
pid does not meet its predecessor's leftovers, and no name costs a ``getrandom`` call
(a GIL hand-off when a writer thread does it)."""
_TMP_COUNTER = itertools.count()


def _sha256_of_file(fd: int, start: int, size: int) -> str:
    """SHA-256 (hex) of ``size`` bytes of ``fd`` from ``start``, read with pread (the offset is left alone).

    A file shorter than ``start + size`` hashes what is there, so its checksum mismatches.
    """
    sha = hashlib.sha256()
    view = memoryview(bytearray(min(_HASH_CHUNK, size)))
    pos = 0
    while pos < size:
        count = os.preadv(fd, [view[: size - pos]], start + pos)
        if not count:
            break
        sha.update(view[:count])
        pos += count
    return sha.hexdigest()


def _read_small(fd: int, size: int) -> bytes:
    """The ``size`` bytes of a file (fewer if it ends early): one ``read``, as files are never changed in place."""
    data = os.read(fd, size)
    chunks = [data]
    total = len(data)
    while total < size and data:
        data = os.read(fd, size - total)
        chunks.append(data)
        total += len(data)
    return data if len(chunks) == 1 else b"".join(chunks)


def _header_of(head: bytes) -> bytes:
    """The header line at the start of ``head`` (with its newline), or its first bytes if it has none."""
    newline = head.find(b"\n", 0, _MAX_HEADER)
    return head[:_MAX_HEADER] if newline < 0 else head[: newline + 1]


def _describe(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "?"
    return f"[{code}] {exc.strerror or exc}"


def _os_error(action: str, path: str, exc: OSError, note: str = "") -> StorageError:
    """A StorageError naming the file and the OS reason (ENOSPC, EACCES, ...)."""
    suffix = f" ({note})" if note else ""
    return StorageError(f"cannot {action} {path!r}: {_describe(exc)}{suffix}")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:_WRITE_CHUNK])
        view = view[written:]


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _os_error("open directory", directory, exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _os_error("fsync directory", directory, exc) from exc
    finally:
        os.close(fd)


def _header(magic: bytes, digest: bytes, nbytes: int) -> bytes:
    return b" ".join((magic, FORMAT_VERSION, digest, str(nbytes).encode("ascii"))) + b"\n"


def _parse_header(path: str, header: bytes, magic: bytes, nbytes: int) -> bytes:
    """The hex digest a file's header line promises for its ``nbytes`` of payload; errors name the file."""
    fields = header[:-1].split(b" ") if header.endswith(b"\n") else []
    if len(fields) != 4 or fields[0] != magic:
        raise CorruptionError(path, f"missing or malformed {magic.decode()} header (torn or foreign file)")
    if fields[1] != FORMAT_VERSION:
        raise SchemaVersionError(f"{path}: written in format {fields[1]!r}, this ptutils reads {FORMAT_VERSION!r}")
    if not fields[3].isdigit() or int(fields[3]) != nbytes:
        raise CorruptionError(path, f"holds {nbytes} bytes, header says {fields[3].decode(errors='replace')} (truncated?)")
    return fields[2]


class FileSystemInterface(DBInterface):
    """Documents and blobs as checksummed files in a directory per collection."""

    scheme = "file"

    def __init__(self, root: str | os.PathLike[str], collection: str = DEFAULT_COLLECTION):
        super().__init__(collection)
        root = os.fspath(root)
        if "\x00" in root:
            raise StorageError(f"database root {root!r} contains NUL")
        self.root = os.path.abspath(root)
        name = check_collection(self.collection_name)
        self._dir = os.path.join(self.root, name)
        self._docs = os.path.join(self._dir, "docs")
        self._blobs = os.path.join(self._dir, "blobs")
        self._lock_path = os.path.join(self._dir, ".lock")
        self._ready = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FileSystemInterface:
        """``file:///abs/dir`` (or ``file://localhost/abs/dir``); option ``collection=``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "file":
            raise StorageError(f"not a file:// URL: {url!r}")
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{url!r}: only local directories are supported (file:///abs/path)")
        if parts.query or parts.fragment:
            raise StorageError(f"{url!r}: file:// URLs take no query or fragment; pass collection= instead")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise StorageError(f"{url!r}: the path must be absolute (file:///abs/path)")
        collection = options.pop("collection", DEFAULT_COLLECTION)
        if options:
            raise TypeError(f"unknown options for a file:// database: {', '.join(sorted(options))}")
        return cls(path, collection=collection)

    @property
    def url(self) -> str:
        """The root directory as a ``file://`` URL (the collection is passed separately)."""
        return FsPath(self.root).as_uri()

    def ping(self) -> None:
        """Raise BackendUnavailableError unless the root is (or can become) a usable directory."""
        probe = self.root
        while not os.path.exists(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        if not os.path.isdir(probe):
            raise BackendUnavailableError(f"database root {self.root!r}: {probe!r} is not a directory")
        if not os.access(probe, os.R_OK | os.X_OK):
            raise BackendUnavailableError(f"database root {self.root!r}: {probe!r} is not accessible")

    def _sibling(self, collection: str) -> FileSystemInterface:
        return FileSystemInterface(self.root, collection=collection)

    # ----------------------------------------------------------------- paths
    def _doc_path(self, doc_id: str) -> str:
        return os.path.join(self._docs, check_id(doc_id) + DOC_SUFFIX)

    def _blob_path(self, blob_id: str) -> str:
        return os.path.join(self._blobs, check_id(blob_id, "blob id") + BLOB_SUFFIX)

    def _ensure_dirs(self) -> None:
        """Create the collection's directories (durably) and sweep stale temp files, once."""
        if self._ready:
            return
        for directory in (self.root, self._dir, self._docs, self._blobs):
            if os.path.isdir(directory):
                continue
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise _os_error("create directory", directory, exc) from exc
            _fsync_dir(os.path.dirname(directory))
        for directory in (self._docs, self._blobs):
            self._sweep_temp_files(directory)
        self._ready = True

    @staticmethod
    def _sweep_temp_files(directory: str) -> None:
        cutoff = time.time() - STALE_TMP_SECONDS
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise _os_error("list", directory, exc) from exc
        for entry in entries:
            if not entry.name.startswith(TMP_PREFIX):
                continue
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    log.info("removed %s, left behind by an interrupted write", entry.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the collection's exclusive lock (threads and processes alike)."""
        self._ensure_dirs()
        try:
            fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise _os_error("open lock file", self._lock_path, exc) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise _os_error("lock", self._lock_path, exc) from exc
            yield
        finally:
            os.close(fd)

    # ----------------------------------------------------------------- files
    def _atomic_write(self, final: str, write: Callable[[int], None], *, sync_dir: bool = True) -> None:
        """Replace ``final`` by what ``write(fd)`` writes, so that readers see all of it or the old file.

        ``sync_dir=False`` leaves the directory's fsync (which makes the rename
        durable) to the caller, who writes several files and syncs once.
        """
        directory = os.path.dirname(final)
        tmp = os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{_TMP_TOKEN}-{next(_TMP_COUNTER)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise _os_error("write", final, exc, f"creating a temporary file in {directory!r} failed") from exc
        try:
            try:
                write(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise _os_error("write", final, exc, "the previous version is unchanged") from exc
            raise
        if sync_dir:
            _fsync_dir(directory)

    def _write_payload(self, final: str, magic: bytes, payload: bytes, *, sync_dir: bool = True) -> None:
        """Atomically replace ``final`` by a header with the payload's checksum, then the payload."""
        digest = hashlib.sha256(payload).hexdigest().encode("ascii")
        data = _header(magic, digest, len(payload)) + payload

        def write(fd: int) -> None:
            _write_all(fd, data)

        self._atomic_write(final, write, sync_dir=sync_dir)

    def _write_parts(self, final: str, magic: bytes, parts: list[memoryview]) -> str:
        """Atomically replace ``final`` by a header and the parts, hashed while written; return the digest."""
        nbytes = sum(p.nbytes for p in parts)
        digest = ""

        def write(fd: int) -> None:
            nonlocal digest
            with Sha256Pipe(nbytes) as sha:
                _write_all(fd, _header(magic, _DIGEST_PLACEHOLDER, nbytes))
                for part in parts:
                    sha.update(part)
                    _write_all(fd, part)
                if sha.threaded:
                    getattr(os, "fdatasync", os.fsync)(fd)  # sync the payload while the helper thread finishes hashing
                digest = sha.hexdigest()
            if os.pwrite(fd, digest.encode("ascii"), len(magic) + len(FORMAT_VERSION) + 2) != len(digest):
                raise OSError(errno.EIO, "short write of the checksum")

        self._atomic_write(final, write)
        return digest

    @staticmethod
    def _read_verified(path: str, magic: bytes) -> bytes | None:
        """The payload of ``path`` after checking its header and checksum; None if absent.

        A large payload is hashed on a second thread that reads the file itself
        (``pread``) while this one reads it into the returned bytes: files are
        immutable once renamed into place, so both see the same bytes, and the
        checksum costs no time when a second core is free.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _os_error("read", path, exc) from exc
        try:
            size = os.fstat(fd).st_size
            if size < _PARALLEL_HASH_MIN:
                # open, fstat, read, close: half the system calls of io.FileIO's read-all.
                whole = _read_small(fd, size)
                header = _header_of(whole)
                payload = whole[len(header) :]
                actual = hashlib.sha256(payload).hexdigest()
            else:
                with open(fd, "rb", buffering=0, closefd=False) as f:
                    header = _header_of(f.read(_MAX_HEADER))
                    size = os.fstat(f.fileno()).st_size - len(header)
                    f.seek(len(header))
                    with ThreadPoolExecutor(max_workers=1) as pool:
                        hashed = pool.submit(_sha256_of_file, f.fileno(), len(header), size)
                        payload = f.read()
                        actual = hashed.result()
        except OSError as exc:
            raise _os_error("read", path, exc) from exc
        finally:
            os.close(fd)
        digest = _parse_header(path, header, magic, len(payload))
        if actual.encode("ascii") != digest:
            raise CorruptionError(path, "sha256 checksum mismatch (corrupt file)")
        return payload

    @staticmethod
    def _read_verified_into(path: str, magic: bytes) -> tuple[memoryview, str] | None:
        """Like :meth:`_read_verified`, into a fresh writable buffer, hashing while reading; also the digest."""
        try:
            with open(path, "rb", buffering=0) as f:
                header = _header_of(f.read(_MAX_HEADER))
                size = os.fstat(f.fileno()).st_size - len(header)
                digest = _parse_header(path, header, magic, size)
                view = memoryview(np.empty(size, dtype=np.uint8)).cast("B")
                f.seek(len(header))
                with Sha256Pipe(size) as sha:
                    pos = 0
                    while pos < size:
                        count = f.readinto(view[pos : pos + _READ_CHUNK])
                        if not count:
                            raise CorruptionError(path, f"ended after {pos} of {size} bytes (truncated while read?)")
                        sha.update(view[pos : pos + count])
                        pos += count
                    actual = sha.hexdigest()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _os_error("read", path, exc) from exc
        if actual.encode("ascii") != digest:
            raise CorruptionError(path, "sha256 checksum mismatch (corrupt file)")
        return view, actual

    def _read_doc(self, doc_id: str) -> dict | None:
        path = self._doc_path(doc_id)
        payload = self._read_verified(path, DOC_MAGIC)
        if payload is None:
            return None
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptionError(path, f"not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("_id") != doc_id or not isinstance(doc.get("_version"), int):
            raise CorruptionError(path, f"is not a stored document with _id {doc_id!r} and an integer _version")
        return doc

    def _write_doc(self, doc: dict, *, sync_dir: bool = True) -> None:
        try:
            payload = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode("ascii")
        except (TypeError, ValueError) as exc:
            raise CodecError(doc.get("_id", ""), f"document is not plain JSON after encoding ({exc})") from exc
        self._write_payload(self._doc_path(doc["_id"]), DOC_MAGIC, payload, sync_dir=sync_dir)

    def _doc_ids(self) -> list[str]:
        try:
            names = os.listdir(self._docs)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _os_error("list", self._docs, exc) from exc
        ids = []
        for name in names:
            if name.startswith(".") or not name.endswith(DOC_SUFFIX):
                continue
            doc_id = name[: -len(DOC_SUFFIX)]
            try:
                check_id(doc_id)
            except InvalidIdError:
                log.warning("ignoring %s: not a document file of this store", os.path.join(self._docs, name))
                continue
            ids.append(doc_id)
        return sorted(ids)

    def _scan(self) -> Iterator[dict]:
        """Every stored document (those deleted while scanning are skipped)."""
        for doc_id in self._doc_ids():
            doc = self._read_doc(doc_id)
            if doc is not None:
                yield doc

    def _unlink(self, path: str) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _os_error("delete", path, exc) from exc
        return True

    # ----------------------------------------------------------------- primitives
    def _read_doc_for_removal(self, doc_id: str) -> dict | None:
        """The stored document, or a stub when it is corrupt (it is being replaced or deleted)."""
        try:
            return self._read_doc(doc_id)
        except CorruptionError as exc:
            log.warning("discarding a corrupt document (its blobs, if any, are left behind): %s", exc)
            return {"_id": doc_id, "_version": 0}

    def _write(self, doc_id: str, body: dict) -> dict | None:
        return self._write_many([(doc_id, body)])[0]

    def _write_many(self, items: Sequence[tuple[str, dict]]) -> list[dict | None]:
        """Write each document under one lock, with one fsync of the directory for all the renames."""
        for doc_id, _ in items:
            check_id(doc_id)
        olds: list[dict | None] = []
        with self._locked():
            try:
                for doc_id, body in items:
                    old = self._read_doc_for_removal(doc_id)
                    doc = {"_id": doc_id, "_version": old["_version"] + 1 if old is not None else 1}
                    doc.update((k, v) for k, v in body.items() if k not in ("_id", "_version"))
                    self._write_doc(doc, sync_dir=False)
                    olds.append(old)
            except BaseException:
                if olds:
                    with contextlib.suppress(StorageError):
                        _fsync_dir(self._docs)  # keep the documents already written
                raise
            _fsync_dir(self._docs)
        return olds

    def _get(self, ids: Sequence[str]) -> dict[str, dict]:
        found = {}
        for doc_id in ids:
            if doc_id not in found:
                doc = self._read_doc(doc_id)
                if doc is not None:
                    found[doc_id] = doc
        return found

    def _find(
        self, query: Node, sort: list[tuple[Path, int]], limit: int | None, skip: int, projection: list[Path] | None
    ) -> list[dict]:
        docs = [d for d in self._scan() if matches(query, d)]
        for path, direction in reversed(sort):
            docs.sort(key=lambda d, p=path: sort_key(d, p), reverse=direction < 0)
        docs = docs[skip:] if limit is None else docs[skip : skip + limit]
        return [project(d, projection) for d in docs]

    def _count(self, query: Node) -> int:
        return sum(1 for d in self._scan() if matches(query, d))

    def _remove(self, select: Callable[[], Iterable[dict]]) -> list[dict]:
        if not os.path.isdir(self._docs):
            return []
        removed = []
        with self._locked():
            for doc in select():
                if self._unlink(self._doc_path(doc["_id"])):
                    removed.append(doc)
            if removed:
                _fsync_dir(self._docs)
        return removed

    def _remove_ids(self, ids: Sequence[str]) -> list[dict]:
        return self._remove(lambda: [d for i in dict.fromkeys(ids) if (d := self._read_doc_for_removal(i))])

    def _remove_query(self, query: Node) -> list[dict]:
        return self._remove(lambda: [d for d in self._scan() if matches(query, d)])

    def _update(
        self, doc_id: str, update: Update, expected_version: int | None, upsert: bool
    ) -> tuple[dict | None, dict] | None:
        check_id(doc_id)
        with self._locked():
            current = self._read_doc(doc_id)
            self.check_version(doc_id, current, expected_version)
            if current is None and not upsert:
                return None
            base = current if current is not None else {"_id": doc_id, "_version": 0}
            new = apply_update(base, update)
            new["_id"] = doc_id
            new["_version"] = base["_version"] + 1
            self._write_doc(new)
        return current, new

    def _put_blob(self, blob_id: str, data: bytes) -> None:
        self._put_blob_sha256(blob_id, [memoryview(data)])

    def _put_blob_parts(self, blob_id: str, parts: list[memoryview]) -> None:
        self._put_blob_sha256(blob_id, parts)

    def _put_blob_sha256(self, blob_id: str, parts: list[memoryview]) -> str:
        path = self._blob_path(blob_id)
        self._ensure_dirs()
        return self._write_parts(path, BLOB_MAGIC, parts)

    def _get_blob(self, blob_id: str) -> bytes:
        data = self._read_verified(self._blob_path(blob_id), BLOB_MAGIC)
        if data is None:
            raise NotFoundError("blob", blob_id, self._where())
        return data

    def _get_blob_sha256(self, blob_id: str) -> tuple[memoryview, str]:
        found = self._read_verified_into(self._blob_path(blob_id), BLOB_MAGIC)
        if found is None:
            raise NotFoundError("blob", blob_id, self._where())
        return found

    def _delete_blobs(self, blob_ids: Iterable[str]) -> None:
        removed = False
        for blob_id in blob_ids:
            removed |= self._unlink(self._blob_path(blob_id))
        if removed:
            _fsync_dir(self._blobs)
