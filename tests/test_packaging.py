"""The installed package declares nothing it does not ship."""

from __future__ import annotations

from importlib import metadata


def test_every_entry_point_the_package_declares_loads() -> None:
    # A console script or backend entry point naming a missing module would fail only when a user runs it.
    for entry_point in metadata.distribution("ptutils").entry_points:
        assert entry_point.load() is not None, entry_point


def test_the_main_names_import_from_the_top_and_all_is_honest() -> None:
    import ptutils
    from ptutils import Config, DataProvider, DatasetProvider, Model, Monitor, Session, Tuning, open_db
    from ptutils.nest import Tuning as nest_Tuning
    from ptutils.config import Config as config_Config
    from ptutils.session import Session as session_Session

    assert Session is session_Session and Config is config_Config and Tuning is nest_Tuning
    assert {"Session", "Config", "Model", "DataProvider", "DatasetProvider", "Monitor", "open_db"} <= set(ptutils.__all__)
    for name in ptutils.__all__:
        assert hasattr(ptutils, name), name
    assert all(callable(x) for x in (Model, DataProvider, DatasetProvider, Monitor, open_db))
