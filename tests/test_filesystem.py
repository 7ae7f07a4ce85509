"""Filesystem-backend specifics: URLs, on-disk format, atomicity, corruption, disk errors, concurrency.

The behaviour every backend shares is in test_backend_conformance.py; these
tests look at the files themselves and at failures only a filesystem has.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest

import ptutils.backends.filesystem as fsmod
from ptutils import open_db
from ptutils.backends.filesystem import FileSystemInterface
from ptutils.errors import (
    BackendUnavailableError,
    CodecError,
    CorruptionError,
    NotFoundError,
    SchemaVersionError,
    StorageError,
)
from ptutils.testing.assertions import stored_body
from ptutils.testing.processes import increment_worker, process_context, run_processes

from .support.storage_helpers import (
    limited_write_worker,
    mixed_writer_worker,
    rewrite_forever_worker,
    unprivileged_write_worker,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "db"


@pytest.fixture
def db(root: Path) -> Iterator[FileSystemInterface]:
    interface = open_db(root.as_uri(), collection="c")
    assert isinstance(interface, FileSystemInterface)
    yield interface
    interface.close()


def doc_file(root: Path, doc_id: str, collection: str = "c") -> Path:
    return root / collection / "docs" / f"{doc_id}.json"


def blob_file(root: Path, blob_id: str, collection: str = "c") -> Path:
    return root / collection / "blobs" / f"{blob_id}.blob"


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".tmp-*"))


def rewrite_payload(path: Path, payload: bytes, magic: bytes = b"ptutils-doc", version: bytes = b"1") -> None:
    """Write a file with a *valid* header for ``payload`` (a well-formed but wrong file)."""
    digest = hashlib.sha256(payload).hexdigest().encode()
    path.write_bytes(b" ".join((magic, version, digest, str(len(payload)).encode())) + b"\n" + payload)


class PatchedOs:
    """Stands in for the ``os`` module inside the backend only, with some calls replaced."""

    def __init__(self, **overrides: Any):
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        return self._overrides.get(name) or getattr(os, name)


# ------------------------------------------------------------------ URLs and layout
def test_url_forms(tmp_path: Path) -> None:
    odd = tmp_path / "my db %20 ü"
    db = open_db(odd.as_uri())
    assert isinstance(db, FileSystemInterface)
    assert db.collection_name == "documents" and db.root == str(odd) and db.url == odd.as_uri()
    assert not odd.exists()  # nothing is created until the first write
    doc_id = db.save({"a": 1})
    assert (odd / "documents" / "docs" / f"{doc_id}.json").is_file()
    again = open_db(f"file://localhost{quote(str(odd))}", collection="documents")
    assert again.load_from_id(doc_id)["a"] == 1
    assert open_db(db.url).load_from_id(doc_id)["a"] == 1
    sibling = db.collection("other")
    assert isinstance(sibling, FileSystemInterface) and sibling.root == db.root
    for bad in ("file://server/share/db", "file:relative/dir", f"{odd.as_uri()}?collection=x", f"{odd.as_uri()}#frag"):
        with pytest.raises(StorageError):
            open_db(bad)
    with pytest.raises(TypeError, match="timeout"):
        open_db(odd.as_uri(), timeout=3)


def test_files_are_checksummed_json_and_blobs_with_umask_permissions(db: FileSystemInterface, root: Path) -> None:
    doc_id = db.save({"_id": "d1", "text": "ü", "w": np.arange(10_000.0)})
    header, payload = doc_file(root, "d1").read_bytes().split(b"\n", 1)
    magic, version, digest, size = header.split(b" ")
    assert (magic, version, int(size)) == (b"ptutils-doc", b"1", len(payload))
    assert hashlib.sha256(payload).hexdigest().encode() == digest
    stored = json.loads(payload)
    assert stored["_id"] == doc_id and stored["_version"] == 1 and stored["text"] == "ü"
    blob_id = stored["w"]["blob"]
    blob_header, blob_payload = blob_file(root, blob_id).read_bytes().split(b"\n", 1)
    assert blob_header.startswith(b"ptutils-blob 1 ") and blob_payload == np.arange(10_000.0).tobytes()
    umask = os.umask(0)
    os.umask(umask)
    for path in (doc_file(root, "d1"), blob_file(root, blob_id), root / "c" / ".lock"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert sorted(p.name for p in (root / "c").iterdir()) == [".lock", "blobs", "docs"]


def test_ping_reports_an_unusable_root(tmp_path: Path) -> None:
    open_db((tmp_path / "not" / "yet").as_uri()).ping()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BackendUnavailableError, match="not a directory"):
        open_db((blocker / "db").as_uri()).ping()
    with pytest.raises(StorageError, match="ENOTDIR"):
        open_db((blocker / "db").as_uri()).save({"a": 1})


def test_ids_only_ever_name_files_inside_the_collection(db: FileSystemInterface, root: Path) -> None:
    for doc_id in ("a", "-x", "_y", "A.b-c", "9" * 128):
        db.save({"_id": doc_id})
        db.put_blob(b"b", doc_id)
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    names = {"a", "-x", "_y", "A.b-c", "9" * 128}
    assert files == {f"c/docs/{n}.json" for n in names} | {f"c/blobs/{n}.blob" for n in names} | {"c/.lock"}


def test_foreign_and_temporary_files_are_ignored(db: FileSystemInterface, root: Path, caplog: Any) -> None:
    db.save({"_id": "real", "v": 1})
    docs = root / "c" / "docs"
    (docs / "README").write_text("notes")
    (docs / "bad..name.json").write_text("{}")
    (docs / ".tmp-interrupted").write_bytes(b"ptutils-doc 1 half")
    with caplog.at_level(logging.WARNING, logger="ptutils"):
        assert [d["_id"] for d in db.load()] == ["real"]
        assert db.count() == 1
    assert "bad..name.json" in caplog.text


def test_stale_temp_files_from_crashed_writers_are_swept(db: FileSystemInterface, root: Path) -> None:
    db.save({"_id": "x"})
    old = root / "c" / "docs" / ".tmp-old"
    fresh = root / "c" / "blobs" / ".tmp-fresh"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"in progress")
    hours_ago = time.time() - 2 * fsmod.STALE_TMP_SECONDS
    os.utime(old, (hours_ago, hours_ago))
    FileSystemInterface(db.root, "c").save({"_id": "y"})
    assert not old.exists() and fresh.exists()


# ------------------------------------------------------------------ atomicity
@pytest.mark.parametrize("failure", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()], ids=repr)
def test_a_write_interrupted_before_the_rename_keeps_the_previous_file(
    db: FileSystemInterface, root: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    db.save({"_id": "d", "v": 1, "w": np.ones(10_000)})
    db.put_blob(b"old checkpoint", "ckpt")
    before_doc = doc_file(root, "d").read_bytes()

    def crash_on_documents_and_ckpt(src: str, dst: str) -> None:
        if dst.endswith((".json", "ckpt.blob")):
            raise failure
        os.replace(src, dst)

    monkeypatch.setattr(fsmod, "os", PatchedOs(replace=crash_on_documents_and_ckpt))
    expected = StorageError if isinstance(failure, OSError) else KeyboardInterrupt
    for attempt in (
        lambda: db.save({"_id": "d", "v": 2}),
        lambda: db.save({"_id": "d", "v": 2, "w": np.zeros(10_000)}),  # its new blob is written, then removed
        lambda: db.update("d", {"$inc": {"v": 1}}),
        lambda: db.update("d", {"$set": {"w": np.zeros(10_000)}}),
        lambda: db.put_blob(b"new checkpoint", "ckpt"),
        lambda: db.save({"_id": "new"}),
    ):
        with pytest.raises(expected) as info:
            attempt()
        if expected is StorageError:
            assert "EIO" in str(info.value) and str(root / "c") in str(info.value)
    monkeypatch.undo()
    assert doc_file(root, "d").read_bytes() == before_doc
    loaded = db.load_from_id("d")
    assert loaded["v"] == 1 and loaded["_version"] == 1 and (loaded["w"] == 1).all()
    assert db.get_blob("ckpt") == b"old checkpoint"
    assert temp_files(root) == []
    assert not db.exists("new")
    assert len(list((root / "c" / "blobs").iterdir())) == 2  # the new arrays' blobs were removed again


def test_killed_writer_never_leaves_a_torn_file(root: Path) -> None:
    """SIGKILL a process that keeps replacing a 2 MB document and a 1 MB blob, several times."""
    url = root.as_uri()
    ctx = process_context()
    for _ in range(3):
        started = ctx.Event()
        proc = ctx.Process(target=rewrite_forever_worker, args=(url, "c", started))
        proc.start()
        try:
            assert started.wait(60), "writer did not start"
            time.sleep(np.random.default_rng().uniform(0.0, 0.15))
        finally:
            proc.kill()
            proc.join()
        assert proc.exitcode == -signal.SIGKILL
        db = open_db(url, collection="c")
        doc = db.load_from_id("victim")
        assert len(doc["payload"]) == 2_000_000 and (doc["arr"] == doc["k"]).all()
        blob = db.get_blob("ckpt")
        assert len(blob) == 1_000_000 and len(set(blob)) == 1
        assert db.count() == 1


# ------------------------------------------------------------------ corruption
@pytest.mark.parametrize("repeat", [10_000, 40_000], ids=["2.5MB", "10MB, hashed while read"])
def test_bit_flipped_truncated_or_headerless_blob_is_detected_naming_the_file(
    db: FileSystemInterface, root: Path, repeat: int
) -> None:
    data = bytes(range(256)) * repeat  # both over the size hashed on a helper thread while written
    path = blob_file(root, "ckpt")
    original = None
    for damage in ("flip", "flip last", "truncate", "extend", "header", "empty"):
        db.put_blob(data, "ckpt")
        assert db.get_blob("ckpt") == data and db.get_blob_sha256("ckpt")[0] == data
        original = path.read_bytes()
        if damage.startswith("flip"):
            raw = bytearray(original)
            raw[-1 if damage == "flip last" else len(raw) // 2] ^= 0x10
            path.write_bytes(bytes(raw))
        elif damage == "truncate":
            path.write_bytes(original[:-100])
        elif damage == "extend":
            path.write_bytes(original + b"\0")
        elif damage == "header":
            path.write_bytes(original.split(b"\n", 1)[1])
        else:
            path.write_bytes(b"")
        for read in (db.get_blob, db.get_blob_sha256):
            with pytest.raises(CorruptionError) as info:
                read("ckpt")
            assert str(path) in str(info.value), (damage, read)
    assert original is not None


def test_a_blob_streamed_from_pieces_gets_the_checksum_of_all_of_them(db: FileSystemInterface, root: Path) -> None:
    pieces = [np.arange(n, dtype=np.float32) for n in (1, 300_000, 0, 7, 1_000_000)]
    whole = b"".join(p.tobytes() for p in pieces)
    blob_id, digest = db.put_blob_sha256(pieces, "streamed")
    header, payload = blob_file(root, "streamed").read_bytes().split(b"\n", 1)
    assert header == b"ptutils-blob 1 " + hashlib.sha256(whole).hexdigest().encode() + b" %d" % len(whole)
    assert payload == whole and digest == hashlib.sha256(whole).hexdigest()
    data, read_digest = db.get_blob_sha256(blob_id)
    assert data == whole and read_digest == digest
    assert temp_files(root) == []


def test_corrupt_array_blob_fails_the_document_load_naming_the_file(db: FileSystemInterface, root: Path) -> None:
    db.save({"_id": "d", "w": np.arange(20_000, dtype=np.int64)})
    blob_id = json.loads(doc_file(root, "d").read_bytes().split(b"\n", 1)[1])["w"]["blob"]
    path = blob_file(root, blob_id)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptionError, match=str(path)):
        db.load_from_id("d")
    # a blob rewritten with a *valid* header but other bytes is caught by the document's own sha256
    rewrite_payload(path, np.arange(20_000, dtype=np.int64)[::-1].copy().tobytes(), magic=b"ptutils-blob")
    with pytest.raises(CorruptionError, match=blob_id):
        db.load_from_id("d")


def test_corrupt_document_is_detected_naming_the_file(db: FileSystemInterface, root: Path) -> None:
    db.save({"_id": "d", "v": 12345})
    db.save({"_id": "e", "v": 1})
    path = doc_file(root, "d")
    original = path.read_bytes()
    path.write_bytes(original.replace(b"12345", b"12346"))
    for call in (lambda: db.load_from_id("d"), db.load, db.count, lambda: db.update("d", {"$inc": {"v": 1}})):
        with pytest.raises(CorruptionError, match=str(path)):
            call()
    rewrite_payload(path, b'{"_id": "d", "_version": 1, "v": ')
    with pytest.raises(CorruptionError, match="not valid JSON"):
        db.load_from_id("d")
    shutil.copy(doc_file(root, "e"), path)  # a valid file under the wrong name
    with pytest.raises(CorruptionError, match="_id 'd'"):
        db.load_from_id("d")
    rewrite_payload(path, b'{"_id": "d", "_version": 1}', version=b"2")
    with pytest.raises(SchemaVersionError, match=str(path)):
        db.load_from_id("d")
    path.write_bytes(original)
    assert db.load_from_id("d")["v"] == 12345


def test_a_corrupt_document_can_be_replaced_or_deleted(db: FileSystemInterface, root: Path, caplog: Any) -> None:
    for doc_id in ("replace-me", "delete-me"):
        db.save({"_id": doc_id, "v": 1})
        doc_file(root, doc_id).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="ptutils"):
        db.save({"_id": "replace-me", "v": 2})
        assert db.delete("delete-me") == 1
    assert str(doc_file(root, "replace-me")) in caplog.text and str(doc_file(root, "delete-me")) in caplog.text
    assert db.load_from_id("replace-me")["v"] == 2
    assert not doc_file(root, "delete-me").exists()
    assert db.delete("delete-me") == 0


class _Detonator:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_a_pickle_planted_in_the_store_is_never_executed(db: FileSystemInterface, root: Path) -> None:
    """An attacker who can write files plants a pickle as a blob and a document pointing at it."""
    marker = root.parent / "pwned"
    payload = pickle.dumps(_Detonator(marker))
    db.put_blob(payload, "evil")
    ref = {"blob": "evil", "nbytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    planted = {
        "as_bytes": {"$ptutils": "ndarray", "dtype": "|u1", "shape": [len(payload)], **ref},
        "as_object": {"$ptutils": "ndarray", "dtype": "|O", "shape": [1], **ref},
        "as_pickle": {"$ptutils": "pickle", **ref},
    }
    for name, value in planted.items():
        rewrite_payload(doc_file(root, name), json.dumps({"_id": name, "_version": 1, "x": value}).encode())
    assert bytes(db.load_from_id("as_bytes")["x"]) == payload  # inert numbers
    with pytest.raises(CodecError):
        db.load_from_id("as_object")
    with pytest.raises(CodecError):
        db.load_from_id("as_pickle")
    assert not marker.exists()


# ------------------------------------------------------------------ disk errors
def test_no_space_left_names_the_file_and_keeps_the_previous_version(
    db: FileSystemInterface, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.save({"_id": "d", "v": 1})
    db.put_blob(b"old", "ckpt")
    calls = {"n": 0}

    def half_then_full(fd: int, data: Any) -> int:
        """The first write gets half its bytes onto the disk, then the disk is full."""
        calls["n"] += 1
        if calls["n"] % 2:
            return os.write(fd, bytes(data[: max(1, len(data) // 2)]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsmod, "os", PatchedOs(write=half_then_full))
    for attempt, target in (
        (lambda: db.save({"_id": "d", "v": 2, "text": "x" * 10_000}), doc_file(root, "d")),
        (lambda: db.update("d", {"$set": {"v": 3}}), doc_file(root, "d")),
        (lambda: db.put_blob(b"new" * 10_000, "ckpt"), blob_file(root, "ckpt")),
        (lambda: db.save({"_id": "fresh"}), doc_file(root, "fresh")),
    ):
        with pytest.raises(StorageError) as info:
            attempt()
        assert "ENOSPC" in str(info.value) and str(target) in str(info.value)
        assert "previous version is unchanged" in str(info.value)
    monkeypatch.undo()
    assert stored_body(db.load_from_id("d")) == {"v": 1} and db.load_from_id("d")["_version"] == 1
    assert db.get_blob("ckpt") == b"old"
    assert not db.exists("fresh")
    assert temp_files(root) == []
    db.save({"_id": "d", "v": 4})  # space is back: writes work again
    assert db.load_from_id("d")["v"] == 4


def collect(results: Any, n: int) -> list[tuple[str, str]]:
    return [results.get(timeout=60) for _ in range(n)]


def test_real_os_write_failure_in_a_child_keeps_the_previous_version(root: Path) -> None:
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), as a full quota would."""
    db = open_db(root.as_uri(), collection="c")
    db.save({"_id": "doc", "text": "old"})
    db.put_blob(b"old blob", "blob")
    ctx = process_context()
    results = ctx.Queue()
    run_processes(ctx, limited_write_worker, [(db.url, "c", results)])
    outcomes = collect(results, 2)
    for (kind, message), target in zip(outcomes, (doc_file(root, "doc"), blob_file(root, "blob"))):
        assert kind == "StorageError", message
        assert "EFBIG" in message and str(target) in message
    assert stored_body(db.load_from_id("doc")) == {"text": "old"}
    assert db.get_blob("blob") == b"old blob"
    assert temp_files(root) == []


def reachable_temp_dir() -> Path:
    """A temporary directory every user can enter, wherever TMPDIR points (a 0700 home, say)."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        path = Path(candidate).resolve()
        if path.is_dir() and all(os.stat(p).st_mode & 0o001 for p in (path, *path.parents)):
            return path
    raise AssertionError("no temporary directory that other users can enter: the unprivileged child needs one")


def test_permission_denied_names_the_file_and_keeps_the_previous_version() -> None:
    """A writer without write permission (nobody, when the tests run as root) fails cleanly."""
    base = Path(tempfile.mkdtemp(prefix="ptutils-perm-", dir=reachable_temp_dir()))
    try:
        base.chmod(0o755)  # a non-root child must be able to reach (not write) the database
        root = base / "db"
        db = open_db(root.as_uri(), collection="c")
        db.save({"_id": "doc", "v": 1})
        db.put_blob(b"old", "blob")
        if os.geteuid() != 0:
            for sub in ("docs", "blobs"):
                (root / "c" / sub).chmod(0o555)
        ctx = process_context()
        results = ctx.Queue()
        run_processes(ctx, unprivileged_write_worker, [(db.url, "c", results)])
        outcomes = collect(results, 2)
        for (kind, message), target in zip(outcomes, (doc_file(root, "doc"), blob_file(root, "blob"))):
            assert kind == "StorageError", message
            assert "EACCES" in message and str(target) in message
        assert stored_body(db.load_from_id("doc")) == {"v": 1}
        assert db.get_blob("blob") == b"old"
        assert temp_files(root) == []
    finally:
        for path in base.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base)


# ------------------------------------------------------------------ concurrency
def test_concurrent_writer_processes_and_a_reader(db: FileSystemInterface, root: Path) -> None:
    """Writers save, replace a blob-holding doc and $push; a reader never sees a torn or half state."""
    workers, rounds = 4, 10
    ctx = process_context()
    barrier = ctx.Barrier(workers)
    procs = [
        ctx.Process(target=mixed_writer_worker, args=(db.url, "c", w, rounds, barrier)) for w in range(workers)
    ]
    for p in procs:
        p.start()
    reads = 0
    try:
        while any(p.is_alive() for p in procs):
            try:
                shared = db.load_from_id("shared")
            except NotFoundError as exc:
                assert "shared" in str(exc) and "blob" not in str(exc)
                continue
            assert (shared["weights"] == shared["worker"] * 1000 + shared["k"]).all()
            reads += 1
    finally:
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * workers
    assert reads > 0
    assert db.count() == workers * rounds + 2
    events = db.load_from_id("log")["events"]
    assert sorted(map(tuple, events)) == [(w, k) for w in range(workers) for k in range(rounds)]
    for w in range(workers):  # each writer's own order is kept
        assert [k for ww, k in events if ww == w] == list(range(rounds))
    assert db.load_from_id("log")["_version"] == workers * rounds
    shared_ref = json.loads(doc_file(root, "shared").read_bytes().split(b"\n", 1)[1])["weights"]["blob"]
    assert [p.name for p in (root / "c" / "blobs").iterdir()] == [f"{shared_ref}.blob"]  # no leaked blobs
    assert temp_files(root) == []


def test_threads_sharing_one_interface_serialise_updates(db: FileSystemInterface) -> None:
    db.save({"_id": "n", "count": 0})

    def bump() -> None:
        for _ in range(25):
            db.update("n", {"$inc": {"count": 1}})

    threads = [threading.Thread(target=bump) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert db.load_from_id("n")["count"] == 150


def test_increments_from_processes_and_collections_side_by_side(root: Path) -> None:
    """Two collections of one root lock independently and both stay exact."""
    url = root.as_uri()
    a, b = open_db(url, collection="a"), open_db(url, collection="b")
    a.save({"_id": "n", "counter": 0})
    b.save({"_id": "n", "counter": 100})
    ctx = process_context()
    barrier = ctx.Barrier(4)
    run_processes(ctx, increment_worker, [(url, name, "n", 10, barrier) for name in ("a", "b", "a", "b")])
    assert a.load_from_id("n")["counter"] == 20 and b.load_from_id("n")["counter"] == 120
