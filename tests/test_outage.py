"""Storage outages: one clock for every lost write, the pause it calls for, retrying writes the record needs."""

from __future__ import annotations

import time

import pytest

from ptutils import open_db
from ptutils.errors import BackendUnavailableError
from ptutils.outage import OutageClock, retry_through_outage
from ptutils.status import StatusWriter
from ptutils.writer import BackgroundWriter


def test_the_clock_runs_from_the_first_lost_write_until_the_database_answers():
    clock = OutageClock()
    assert clock.overdue(0.0) is None and clock.seconds() == 0.0
    clock.failed(BackendUnavailableError("first"))
    since = clock.since
    time.sleep(0.01)
    clock.failed(BackendUnavailableError("second"))
    assert clock.since == since and clock.failures == 2  # measured from the first
    assert clock.overdue(3600.0) is None
    reason = clock.overdue(0.0)
    assert reason.startswith("storage outage for 0s: BackendUnavailableError: second")
    clock.healthy()
    assert clock.since is None and clock.overdue(0.0) is None


def test_status_writes_and_background_writes_share_one_clock(tmp_path):
    clock = OutageClock()
    broken = tmp_path / "not-a-dir"
    broken.write_text("a file where the database directory should be")
    unreachable = StatusWriter(open_db(broken.as_uri()), "s1", outage=clock)
    writer = BackgroundWriter("s1", clock)

    def lost() -> None:
        raise BackendUnavailableError("checkpoint lost")

    writer.submit(lost)
    writer.drain()
    first = clock.since
    unreachable.event("epoch")
    unreachable.try_flush()  # fails: counted on the same clock, the event stays buffered
    assert clock.since == first and clock.failures == 2
    reachable = StatusWriter(open_db((tmp_path / "db").as_uri()), "s1", outage=clock)
    reachable.create({"state": "running"})
    assert reachable.heartbeat({"step": 1}, 1, None) is not None  # the database answered
    assert clock.since is None


def test_a_write_is_retried_through_a_short_outage_and_its_result_returned():
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise BackendUnavailableError("not yet")
        return "written"

    assert retry_through_outage(flaky, what="write", wait=30.0, owner="s") == "written"
    assert len(calls) == 3 and calls[2] - calls[1] > calls[1] - calls[0]  # backing off


def test_a_write_gives_up_when_the_outage_outlasts_the_wait():
    def down() -> None:
        raise BackendUnavailableError("still down")

    with pytest.raises(BackendUnavailableError, match="still down"):
        retry_through_outage(down, what="write", wait=0.5, owner="s")
