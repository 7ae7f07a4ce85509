"""Storage backends against their raw drivers, one table: status inserts, indexed queries, a checkpoint.

For each backend (filesystem, SQLite, PostgreSQL, MariaDB, MongoDB-wire) and in
the same run as its raw baseline:

* **insert status documents** (10,000): ``db.save(doc)`` one by one, against the
  raw driver writing the same JSON one document per transaction (SQLAlchemy Core
  ``INSERT`` + commit into a plain ``(id, session_id, state, parent_id, body)``
  table indexed like ptutils' on the three status fields, pymongo ``insert_one``
  into a collection with the same three indexes, or a file written with fsync +
  rename + directory fsync for the filesystem).
  The bulk form (one ``executemany`` transaction, ``insert_many``) is shown too:
  ``save`` has no batch form, so that ratio is what batching would win.
* **indexed queries** (1,000 on a 100,000-document collection, 10 documents per
  session id): ``db.load({"session_id": s})`` against a plain indexed
  ``session_id`` column queried with SQLAlchemy (bodies parsed with
  ``json.loads``) or pymongo ``find``.  The filesystem backend has no index (each
  query reads every file) and is left out of this row.
* **checkpoint put / get** (100 MB of ``torch.save`` output): ``put_blob`` /
  ``get_blob`` against a file written with fsync (what ``torch.save`` to a file
  does, without the pickling both sides share), one ``bytea``/``BLOB`` row (4 MB
  rows on MariaDB, whose packets are limited to 16 MB) in one transaction, or
  pymongo's GridFS with its default chunk size.  Each get follows its own put,
  so a server whose cache is smaller than the blob (MariaDB's default 128 MB
  buffer pool) serves both sides alike.

The ratio is raw time / ptutils time (1.0 = as fast as the raw driver; the
target is >= 0.8).  Work is split into rounds that alternate ptutils and raw so
that load from other processes falls on both alike; checkpoints take the best of
``--repeat``.  PostgreSQL and MariaDB get a fresh database on the servers of
``PTUTILS_POSTGRES_URL`` / ``PTUTILS_MARIADB_URL`` (defaults as in the tests),
MongoDB is ``PTUTILS_MONGO_URL`` or a secantus server started here.  ``--quick``
uses 1,000 inserts, 10,000 documents, 200 queries and 10 MB.

Run: ``python benchmarks/db_backends.py [--quick] [--backends sqlite,postgres] [--rows insert,query,checkpoint]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gridfs
import pymongo
import sqlalchemy as sa
import sqlalchemy.dialects.mysql
import sqlalchemy.dialects.postgresql
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptutils import open_db
from ptutils.backends.mongo import MongoInterface
from ptutils.backends.sql import SQLInterface, _dump_body
from ptutils.database import DBInterface
from tests.support import services

ALL = ("fs", "sqlite", "postgres", "mariadb", "mongo")
STATES = ("pending", "running", "paused", "complete", "failed")
ROUNDS = 10
INDEXED = ("session_id", "state", "parent_id")
"""The fields ptutils indexes for sessions; the raw tables and collections index them too."""


def status_doc(i: int) -> dict:
    """A session status record like the ones sessions write."""
    return {
        "session_id": f"s{i // 10:06d}",
        "parent_id": None,
        "name": f"resnet-sweep-{i // 10}",
        "attempt": 1,
        "state": STATES[i % len(STATES)],
        "stage": "train",
        "step": i,
        "epoch": i // 100,
        "progress": (i % 1000) / 1000,
        "eta": 3600.0 - i % 3600,
        "started": "2025-01-01T00:00:00+00:00",
        "updated": "2025-01-01T01:00:00+00:00",
        "heartbeat": 1.7e9 + i,
        "metrics": {"loss": 1.0 / (1 + i % 97), "acc": (i % 89) / 89},
    }


def checkpoint_bytes(nbytes: int) -> bytes:
    """``torch.save`` output of a state dict of about ``nbytes`` bytes."""
    n = nbytes // 4 // 8
    state = {f"layer{k}.weight": torch.randn(n) for k in range(8)}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(ours: Callable[[int, int], None], raw: Callable[[int, int], None], n: int) -> tuple[float, float]:
    """Total seconds of ``ours(lo, hi)`` and ``raw(lo, hi)`` over ``n`` items, in alternating rounds."""
    t_ours = t_raw = 0.0
    step = max(1, n // ROUNDS)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        t_ours += timed(lambda lo=lo, hi=hi: ours(lo, hi))
        t_raw += timed(lambda lo=lo, hi=hi: raw(lo, hi))
    return t_ours, t_raw


# ----------------------------------------------------------------------------- raw baselines
class RawSQL:
    """The same work through plain SQLAlchemy Core on a table of its own."""

    def __init__(self, url: str, prefix: str):
        self.engine = sa.create_engine(url)
        self.dialect = self.engine.dialect.name
        body_type: Any = sa.dialects.postgresql.JSONB if self.dialect == "postgresql" else sa.Text
        if self.dialect in ("mysql", "mariadb"):
            body_type = sa.dialects.mysql.LONGTEXT
        blob_type: Any = sa.dialects.mysql.LONGBLOB if self.dialect in ("mysql", "mariadb") else sa.LargeBinary
        md = sa.MetaData()
        self.docs = sa.Table(
            f"{prefix}_docs",
            md,
            sa.Column("id", sa.String(64), primary_key=True),
            *(sa.Column(f, sa.String(64), index=True) for f in INDEXED),
            sa.Column("body", body_type),
        )
        self.blobs = sa.Table(
            f"{prefix}_blobs",
            md,
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("chunk", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("data", blob_type),
        )
        md.create_all(self.engine)
        self.json_body = self.dialect == "postgresql"

    def row(self, key: str, doc: dict) -> dict:
        fields = {f: doc[f] for f in INDEXED}
        return {"id": key, **fields, "body": doc if self.json_body else json.dumps(doc)}

    def insert_each(self, docs: list[tuple[str, dict]]) -> None:
        for key, doc in docs:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(self.docs), self.row(key, doc))

    def insert_bulk(self, docs: list[tuple[str, dict]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.insert(self.docs), [self.row(k, d) for k, d in docs])
            conn.execute(sa.text(f"ANALYZE{' TABLE' if self.dialect in ('mysql', 'mariadb') else ''} {self.docs.name}"))

    def query(self, session_id: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.docs.c.id, self.docs.c.body).where(self.docs.c.session_id == session_id))
            return [r[1] if isinstance(r[1], dict) else json.loads(r[1]) for r in rows]

    def put(self, key: str, data: bytes) -> None:
        step = 4 * 1024 * 1024 if self.dialect in ("mysql", "mariadb") else len(data)
        rows = [{"id": key, "chunk": i, "data": data[o : o + step]} for i, o in enumerate(range(0, len(data), step))]
        with self.engine.begin() as conn:
            conn.execute(sa.delete(self.blobs).where(self.blobs.c.id == key))
            if self.dialect in ("mysql", "mariadb"):
                for row in rows:
                    conn.execute(sa.insert(self.blobs), row)
            else:
                conn.execute(sa.insert(self.blobs), rows)

    def get(self, key: str) -> bytes:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.blobs.c.data).where(self.blobs.c.id == key).order_by(self.blobs.c.chunk))
            return b"".join(bytes(r[0]) for r in rows)

    def close(self) -> None:
        self.blobs.metadata.drop_all(self.engine)
        self.engine.dispose()


class RawMongo:
    """The same work through plain pymongo and GridFS on collections of their own."""

    def __init__(self, client: pymongo.MongoClient, db_name: str, prefix: str):
        self.db = client[db_name]
        self.coll = self.db[f"{prefix}_docs"]
        for field in INDEXED:
            self.coll.create_index(field)
        self.bucket = f"{prefix}_fs"
        self.fs = gridfs.GridFSBucket(self.db, bucket_name=self.bucket)

    def insert_each(self, docs: list[tuple[str, dict]]) -> None:
        for key, doc in docs:
            self.coll.insert_one({"_id": key, **doc})

    def insert_bulk(self, docs: list[tuple[str, dict]]) -> None:
        self.coll.insert_many([{"_id": k, **d} for k, d in docs])

    def query(self, session_id: str) -> list[dict]:
        return list(self.coll.find({"session_id": session_id}))

    def put(self, key: str, data: bytes) -> None:
        for old in self.db[f"{self.bucket}.files"].find({"filename": key}, {"_id": 1}):
            self.fs.delete(old["_id"])
        self.fs.upload_from_stream(key, data)

    def get(self, key: str) -> bytes:
        return self.fs.open_download_stream_by_name(key).read()

    def close(self) -> None:
        self.coll.drop()


class RawFiles:
    """Durable file writes: temp file, fsync, rename, directory fsync (one file per document or checkpoint)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.root / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / name)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def insert_each(self, docs: list[tuple[str, dict]]) -> None:
        for key, doc in docs:
            self._write(f"{key}.json", json.dumps(doc).encode())

    def put(self, key: str, data: bytes) -> None:
        self._write(f"{key}.pt", data)

    def get(self, key: str) -> bytes:
        return (self.root / f"{key}.pt").read_bytes()

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- setup
@contextlib.contextmanager
def backend_url(name: str, scratch: Path) -> Iterator[str]:
    """A URL of an empty database for ``name`` (servers: a fresh database, dropped afterwards)."""
    if name == "fs":
        yield (scratch / "fsdb").as_uri()
    elif name == "sqlite":
        yield f"sqlite:///{scratch / 'bench.db'}"
    elif name in ("postgres", "mariadb"):
        server = services.POSTGRES_URL if name == "postgres" else services.MARIADB_URL
        with services.sql_database(name, server) as url:
            yield url
    else:
        if services.MONGO_URL:
            yield f"{services.MONGO_URL.rstrip('/')}/ptutils_bench_{uuid.uuid4().hex[:8]}"
            return
        server = services.SecantusServer(scratch / "secantus")
        server.start()
        try:
            yield f"{server.url}/ptutils_bench"
        finally:
            server.stop()


def make_raw(db: DBInterface, url: str, scratch: Path) -> Any:
    if isinstance(db, SQLInterface):
        return RawSQL(db.engine.url.render_as_string(hide_password=False), f"raw_{uuid.uuid4().hex[:6]}")
    if isinstance(db, MongoInterface):
        return RawMongo(db.client, db.db_name, f"raw_{uuid.uuid4().hex[:6]}")
    return RawFiles(scratch / "rawfiles")


def preload(db: DBInterface, docs: list[tuple[str, dict]]) -> None:
    """Put ``docs`` into ``db``'s collection in the stored layout, in bulk (setup only, not timed)."""
    if isinstance(db, MongoInterface):
        db._ensure_indexes()
        coll = db.client[db.db_name][db.collection_name]
        for lo in range(0, len(docs), 10_000):
            coll.insert_many([{"_id": k, "_version": 1, **d} for k, d in docs[lo : lo + 10_000]])
        return
    assert isinstance(db, SQLInterface)
    db.ping()
    db.count()  # creates the tables
    table = db._shared.schema.docs
    body = sa.bindparam("body", type_=sa.Text)
    if db.dialect == "postgresql":
        body = sa.cast(body, sa.dialects.postgresql.JSONB)
    stmt = sa.insert(table).values(collection=db.collection_name, id=sa.bindparam("i"), version=1, body=body)
    with db.engine.begin() as conn:
        for lo in range(0, len(docs), 5_000):
            rows = [{"i": k, "body": _dump_body(d, db.dialect)[0]} for k, d in docs[lo : lo + 5_000]]
            conn.execute(stmt, rows)
        if db.dialect in ("postgresql", "sqlite"):
            conn.execute(sa.text("ANALYZE"))
        else:
            conn.execute(sa.text(f"ANALYZE TABLE {table.name}"))


# ----------------------------------------------------------------------------- measurements
def bench_backend(name: str, args: argparse.Namespace, scratch: Path) -> list[tuple]:
    rows: list[tuple] = []
    with backend_url(name, scratch) as url:
        db = open_db(url, collection=f"bench_{uuid.uuid4().hex[:8]}")
        raw = make_raw(db, url, scratch)
        try:
            # inserts
            docs = [(uuid.uuid4().hex, status_doc(i)) for i in range(args.inserts if "insert" in args.rows else 0)]
            t_ours, t_raw = alternate(
                lambda lo, hi: [db.save({"_id": k, **d}) for k, d in docs[lo:hi]],
                lambda lo, hi: raw.insert_each(docs[lo:hi]),
                len(docs),
            )
            if docs:
                rows.append((name, f"insert {args.inserts:,} status docs", t_ours, t_raw, "each"))
            if docs and hasattr(raw, "insert_bulk"):
                bulk = [(uuid.uuid4().hex, d) for _, d in docs]
                rows.append(
                    (name, "  same, raw in one bulk call", t_ours, timed(lambda: raw.insert_bulk(bulk)), "bulk")
                )
            # indexed queries
            if name != "fs" and "query" in args.rows:
                coll = db.collection(f"q_{uuid.uuid4().hex[:8]}")
                big = [(f"d{i:07d}", status_doc(i)) for i in range(args.collection)]
                preload(coll, big)
                qraw = make_raw(db, url, scratch)
                qraw.insert_bulk(big)
                sessions = [f"s{random.Random(k).randrange(args.collection // 10):06d}" for k in range(args.queries)]
                expected = len(coll.load({"session_id": sessions[0]}))
                assert expected == 10 == len(qraw.query(sessions[0])), expected
                t_ours, t_raw = alternate(
                    lambda lo, hi: [coll.load({"session_id": s}) for s in sessions[lo:hi]],
                    lambda lo, hi: [qraw.query(s) for s in sessions[lo:hi]],
                    len(sessions),
                )
                what = f"{args.queries:,} indexed queries, {args.collection:,} docs"
                rows.append((name, what, t_ours, t_raw, "each"))
                qraw.close()
            # checkpoint
            if "checkpoint" not in args.rows:
                return rows
            payload = checkpoint_bytes(args.checkpoint_mb * 1024 * 1024)
            puts, raw_puts, gets, raw_gets = [], [], [], []
            # Each get follows its own put (a server's cache then holds that blob, not the other side's),
            # and which side goes first alternates.
            sides = [
                (lambda: db.put_blob(payload, "ckpt"), lambda: db.get_blob("ckpt"), puts, gets),
                (lambda: raw.put("ckpt", payload), lambda: raw.get("ckpt"), raw_puts, raw_gets),
            ]
            for rep in range(args.repeat):
                for put, get, put_times, get_times in sides if rep % 2 == 0 else sides[::-1]:
                    put_times.append(timed(put))
                    get_times.append(timed(get))
            assert db.get_blob("ckpt") == payload == raw.get("ckpt")
            size = f"{len(payload) / 1e6:.0f} MB"
            rows.append((name, f"checkpoint put {size}", min(puts), min(raw_puts), len(payload)))
            rows.append((name, f"checkpoint get {size}", min(gets), min(raw_gets), len(payload)))
        finally:
            raw.close()
            db.close()
    return rows


BASELINES = {
    "fs": "file + fsync + rename + dir fsync",
    "sqlite": "SQLAlchemy Core",
    "postgres": "SQLAlchemy Core (psycopg 3)",
    "mariadb": "SQLAlchemy Core (PyMySQL)",
    "mongo": "pymongo / GridFS",
}


def print_table(rows: list[tuple]) -> None:
    header = f"{'backend':<9} {'operation':<42} {'ptutils':>10} {'raw':>10} {'raw/ptutils':>12}  raw baseline"
    print(header)
    print("-" * len(header))
    for name, what, t_ours, t_raw, kind in rows:
        if isinstance(kind, int):
            ours_s = f"{kind / 1e6 / t_ours:5.0f} MB/s"
            raw_s = f"{kind / 1e6 / t_raw:5.0f} MB/s"
        else:
            ours_s, raw_s = f"{t_ours:9.2f}s", f"{t_raw:9.2f}s"
        base = BASELINES[name] + (", bulk" if kind == "bulk" else "")
        print(f"{name:<9} {what:<42} {ours_s:>10} {raw_s:>10} {t_raw / t_ours:12.2f}  {base}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--backends", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--repeat", type=int, default=3, help="checkpoint repetitions (best is kept)")
    parser.add_argument("--rows", default="insert,query,checkpoint", help="comma-separated subset of the rows")
    args = parser.parse_args()
    args.rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    args.inserts, args.collection, args.queries, args.checkpoint_mb = (
        (1_000, 10_000, 200, 10) if args.quick else (10_000, 100_000, 1_000, 100)
    )
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="ptutils-bench-") as tmp:
        for name in names:
            scratch = Path(tmp) / name
            scratch.mkdir()
            try:
                rows.extend(bench_backend(name, args, scratch))
            except BaseException as exc:  # a missing server (pytest's Skipped) skips its backend
                if isinstance(exc, KeyboardInterrupt):
                    raise
                print(f"{name}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
            print(f"{name}: done", file=sys.stderr)
    print_table(rows)


if __name__ == "__main__":
    main()
