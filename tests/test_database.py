"""open_db and the backend registry: built-in schemes, register_backend, third-party entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest

from ptutils import open_db
from ptutils.database import backend_for, register_backend
from ptutils.errors import StorageError


def test_builtin_schemes_route_to_their_backends(tmp_path):
    assert backend_for(tmp_path.as_uri()).__name__ == "FileSystemInterface"
    assert backend_for("sqlite:///x.db").__name__ == "SQLInterface"
    assert backend_for("postgresql+psycopg://u@h/db").__name__ == "SQLInterface"
    assert backend_for("mysql+pymysql://root@h/db").__name__ == "SQLInterface"
    assert backend_for("mongodb://h:1/db/coll").__name__ == "MongoInterface"


def test_unknown_scheme_and_non_urls_are_clear_errors():
    with pytest.raises(StorageError, match="no backend for URL scheme 'redis'.*known: .*file"):
        open_db("redis://localhost:6379/0")
    with pytest.raises(StorageError, match="not a database URL"):
        open_db("just-a-path")


def test_register_backend_by_class(tmp_path):
    from ptutils.backends.filesystem import FileSystemInterface

    class Audited(FileSystemInterface):
        pass

    register_backend("audited", Audited)
    try:
        assert backend_for("audited:///x") is Audited
    finally:
        from ptutils import database

        database._REGISTRY.pop("audited")


def test_third_party_backend_through_an_entry_point(tmp_path, monkeypatch):
    package = tmp_path / "thirdparty_backend.py"
    package.write_text(textwrap.dedent("""
        from ptutils.backends.filesystem import FileSystemInterface

        class VaultInterface(FileSystemInterface):
            '''A third-party backend: here just the filesystem under another scheme.'''

            @classmethod
            def from_url(cls, url, **options):
                return super().from_url(url.replace("vault://", "file://", 1), **options)
    """))
    dist = tmp_path / "thirdparty_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ptutils.backends]\nvault = thirdparty_backend:VaultInterface\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "vault-root"
    db = open_db(f"vault://{root}")
    assert type(db).__name__ == "VaultInterface"
    doc_id = db.save({"x": 1})
    assert db.load_from_id(doc_id)["x"] == 1
    sys.modules.pop("thirdparty_backend", None)
