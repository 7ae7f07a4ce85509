"""Start conditions: what blocks a pending session, and the reason its record shows."""

from __future__ import annotations

import pytest
import torch

from ptutils import open_db
from ptutils.model import cuda_free
from ptutils.status import (
    db_reachable,
)

from .support.sessionkit import session


def test_pending_session_records_what_blocks_it(url):
    s = session(url, start_conditions=[cuda_free(1)])
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: nothing blocks this session")
    assert s.start() is False
    record = s.record
    assert record["state"] == "pending"
    assert record["blocked_by"] == "RuntimeError: no CUDA device is available"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_free_lets_a_session_start_or_names_the_memory_it_lacks(url, tmp_path):
    assert session(url, start_conditions=[cuda_free(1)]).start() is True
    too_much = 1 << 60
    blocked = session((tmp_path / "blocked").as_uri(), start_conditions=[cuda_free(too_much)])
    assert blocked.start() is False
    assert blocked.record["blocked_by"] == f"RuntimeError: no CUDA device has {too_much} bytes free"


def test_unreachable_database_blocks_start(url, tmp_path):
    missing = tmp_path / "not-a-dir"
    missing.write_text("a file where a database directory should be")
    other = open_db(missing.as_uri())
    s = session(url, start_conditions=[db_reachable(other)])
    assert s.start() is False
    assert "BackendUnavailableError" in s.record["blocked_by"] and "not-a-dir" in s.record["blocked_by"]


def test_db_reachable_takes_a_url_and_opens_it_at_each_try(url, tmp_path):
    missing = tmp_path / "not-a-dir"
    missing.write_text("a file where a database directory should be")
    assert session(url, start_conditions=[db_reachable(url)]).start() is True
    blocked = session((tmp_path / "blocked").as_uri(), start_conditions=[db_reachable(missing.as_uri())])
    assert blocked.start() is False and "not-a-dir" in blocked.record["blocked_by"]
    missing.unlink()  # the database can now be made
    assert blocked.start() is True
