"""SQLInterface: documents and blobs in SQLite, PostgreSQL or MariaDB/MySQL (SQLAlchemy 2 Core).

URLs: ``sqlite:///path/to/file.db``, ``postgresql://user@host/db`` (psycopg 3 is
picked when no driver is named), ``mysql+pymysql://user@host/db`` (also
``mysql://`` and ``mariadb://``, which pick PyMySQL).

The package's modules, each standing only on those listed before it:

* :mod:`.text`: the JSON text of a stored body and :func:`escape_text`;
* :mod:`.fields`: the value at a document path as SQL expressions (the interface
  each dialect implements; ``_id`` and ``_version`` read their columns);
* :mod:`.dialect`: :class:`~.dialect.Dialect`, the hooks where dialects differ;
* :mod:`.sqlite`, :mod:`.postgresql`, :mod:`.mysql`: one dialect each, with its
  body field, JSON text, column types, statements, error codes and connection hooks;
* :mod:`.schema`: the tables, prepared statements and :data:`SCHEMA_VERSION`;
* :mod:`.render`: query nodes to SQL expressions, numbers compared exactly;
* :mod:`.interface`: :class:`SQLInterface`, transactions and retries, rows and blobs.
"""

from .dialect import PING_AFTER_IDLE_S
from .interface import (
    BLOB_CHUNK,
    SQLInterface,
    _dump_body,  # noqa: F401  (imported from here by the backends benchmark)
    normalise_url,
)
from .mysql import mysql_key
from .schema import (
    BLOBS_TABLE,
    DOCS_TABLE,
    INDEXED_FIELDS,
    INDEXED_MAX_CHARS,
    META_TABLE,
    SCHEMA_VERSION,
)
from .text import escape_text
from .text import unescape_text as _unescape_text  # noqa: F401  (imported from here by tests/test_sql.py)

__all__ = [
    "BLOBS_TABLE",
    "BLOB_CHUNK",
    "DOCS_TABLE",
    "INDEXED_FIELDS",
    "INDEXED_MAX_CHARS",
    "META_TABLE",
    "PING_AFTER_IDLE_S",
    "SCHEMA_VERSION",
    "SQLInterface",
    "escape_text",
    "mysql_key",
    "normalise_url",
]
