"""The tables of one dialect, the statements prepared on them, and the schema version.

Schema (created on first use, its version stored in ``ptutils_meta``; a newer
version than this module knows raises :class:`SchemaVersionError`):

* ``ptutils_documents(collection, id, version, body, fixups, session_id, state,
  parent_id)``, primary key ``(collection, id)``.  ``body`` is the encoded
  document without ``_id``/``_version`` (which live in their own columns) as
  JSONB on PostgreSQL and JSON text elsewhere.  ``session_id``, ``state`` and
  ``parent_id`` are generated columns (STORED on PostgreSQL, VIRTUAL on MariaDB
  and SQLite) holding the top-level field when it is a string of at most 255
  characters, else NULL; each has an index ``(collection, <field>, id)``.  Equality
  and ``$in`` on those fields use the column (exact by construction), so the
  status queries of sessions are index lookups; every other path is evaluated
  with the dialect's JSON functions.  ``fixups`` is only used on PostgreSQL: JSONB
  cannot hold ``-0.0``, so such values are recorded there and restored on read.
  Strings holding U+0000 or U+0001 are stored escaped on SQLite and PostgreSQL
  by an order-preserving code (:func:`~ptutils.backends.sql.text.escape_text`), so
  they compare exactly.
* ``ptutils_blobs(collection, blob_id, chunk, nchunks, size, data)``: blobs in
  4 MiB chunks (smaller if MariaDB's ``max_allowed_packet`` asks for it), all
  written in one transaction, so readers see a whole blob or none.

Column types, the generated columns' SQL and how the tables are locked while
they are created come from the :class:`~ptutils.backends.sql.dialect.Dialect`.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from ptutils.errors import SchemaVersionError

from .dialect import Dialect

log = logging.getLogger("ptutils")

SCHEMA_VERSION = 1
"""Version of the table layout written by this module (stored in ``ptutils_meta``)."""
INDEXED_FIELDS = ("session_id", "state", "parent_id")
"""Top-level string fields mirrored into indexed generated columns."""
INDEXED_MAX_CHARS = 255
DOCS_TABLE, BLOBS_TABLE, META_TABLE = "ptutils_documents", "ptutils_blobs", "ptutils_meta"


class Schema:
    """The tables of one dialect (column types, collations and generated columns differ)."""

    def __init__(self, dialect: Dialect):
        self.dialect = dialect
        self.metadata = sa.MetaData()
        d = dialect
        self.docs = sa.Table(
            DOCS_TABLE,
            self.metadata,
            sa.Column("collection", d.name_type, primary_key=True),
            sa.Column("id", d.id_type, primary_key=True),
            sa.Column("version", sa.BigInteger, nullable=False),
            sa.Column("body", d.body_type, nullable=False),
            sa.Column("fixups", d.text_type, nullable=True),
            *(
                sa.Column(
                    f,
                    d.mirror_type(INDEXED_MAX_CHARS),
                    sa.Computed(d.mirror_sql.format(f=f, n=INDEXED_MAX_CHARS), persisted=d.mirror_persisted),
                )
                for f in INDEXED_FIELDS
            ),
            **d.table_options,
        )
        for f in INDEXED_FIELDS:
            sa.Index(f"ix_{DOCS_TABLE}_{f}", self.docs.c.collection, self.docs.c[f], self.docs.c.id)
        self.blobs = sa.Table(
            BLOBS_TABLE,
            self.metadata,
            sa.Column("collection", d.name_type, primary_key=True),
            sa.Column("blob_id", d.id_type, primary_key=True),
            sa.Column("chunk", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("nchunks", sa.Integer, nullable=False),
            sa.Column("size", sa.BigInteger, nullable=False),
            sa.Column("data", d.blob_type, nullable=False),
            **d.table_options,
        )
        self.meta = sa.Table(
            META_TABLE,
            self.metadata,
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("value", sa.String(255), nullable=False),
            **d.table_options,
        )
        self._lookups: dict[tuple, sa.Select] = {}
        self._prepare_statements()

    def _prepare_statements(self) -> None:
        """Statements of the by-id operations, built once (values are bound at execution)."""
        docs, dialect = self.docs, self.dialect
        collection, doc_id = sa.bindparam("c_", type_=sa.Text), sa.bindparam("i_", type_=sa.Text)
        body = dialect.bind_body(sa.bindparam("b_", type_=sa.Text))
        self.columns = [docs.c.id, docs.c.version, dialect.select_body(docs.c.body), docs.c.fixups]
        key = sa.and_(docs.c.collection == collection, docs.c.id == doc_id)
        self.select_row = dialect.lock_rows(sa.select(*self.columns).where(key))
        self.select_ids = sa.select(*self.columns).where(
            docs.c.collection == collection, docs.c.id.in_(sa.bindparam("ids_", expanding=True))
        )
        values = {"version": sa.bindparam("v_", type_=sa.BigInteger), "body": body, "fixups": sa.bindparam("f_")}
        self.update_row = sa.update(docs).where(key).values(**values)
        values.update(collection=collection, id=doc_id)
        self.insert_row = dialect.insert_new(docs, values)

    def lookup_statement(self, fields: tuple[str, ...], count: bool) -> sa.Select:
        """SELECT (or COUNT) of a collection's documents whose indexed ``fields`` equal bound ``q<k>_`` values."""
        key = (fields, count)
        stmt = self._lookups.get(key)
        if stmt is None:
            where = [self.docs.c.collection == sa.bindparam("c_", type_=sa.Text)]
            where += [self.docs.c[f] == sa.bindparam(f"q{k}_", type_=sa.Text) for k, f in enumerate(fields)]
            if count:
                stmt = sa.select(sa.func.count()).select_from(self.docs).where(*where)
            else:
                stmt = sa.select(*self.columns).where(*where).order_by(self.docs.c.id)
            self._lookups[key] = stmt
        return stmt

    # ----------------------------------------------------------------- version
    def stored_version(self, conn: sa.Connection) -> Any:
        """The schema_version row, or None when the tables do not exist yet."""
        if not sa.inspect(conn).has_table(META_TABLE):
            return None
        return conn.execute(sa.select(self.meta.c.value).where(self.meta.c.name == "schema_version")).scalar()

    def create_or_check(self, conn: sa.Connection, where: str) -> None:
        """Check the stored schema version; create the tables (under the dialect's lock) if there are none."""
        stored = self.stored_version(conn)
        conn.rollback()
        if stored is not None:
            check_version(stored, where)
            return
        conn.execution_options(ptutils_write=True)
        with self.dialect.schema_transaction(conn):
            stored = self.stored_version(conn)
            if stored is not None:
                check_version(stored, where)
                return
            self.metadata.create_all(conn)
            conn.execute(sa.insert(self.meta).values(name="schema_version", value=str(SCHEMA_VERSION)))
            log.info("ptutils: created the ptutils tables (schema version %d) in %s", SCHEMA_VERSION, where)


def check_version(stored: Any, where: str) -> None:
    """Refuse a stored schema version that this module cannot read (``where`` names the database)."""
    try:
        version = int(stored)
    except (TypeError, ValueError):
        raise SchemaVersionError(f"{where}: table {META_TABLE} has no readable schema_version ({stored!r})") from None
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where}: the ptutils tables have schema version {version}, newer than version "
            f"{SCHEMA_VERSION} that this ptutils understands; upgrade ptutils to use this database"
        )
    if version < 1:
        raise SchemaVersionError(f"{where}: unknown ptutils schema version {version}")
