"""The one background writer: order, outages counted rather than raised, failures raised in the loop, the write ahead."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from ptutils.errors import BackendUnavailableError
from ptutils.outage import OutageClock
from ptutils.writer import BackgroundWriter


def test_writes_run_in_the_order_they_were_submitted_on_one_thread():
    writer, done, threads = BackgroundWriter("s", OutageClock()), [], set()

    def write(i: int) -> None:
        time.sleep(0.002 * (5 - i))  # earlier writes are slower: a pool of several would reorder them
        done.append(i)
        threads.add(threading.current_thread().name)

    for i in range(5):
        writer.submit(write, i)
    writer.drain()
    assert done == [0, 1, 2, 3, 4]
    assert len(threads) == 1 and threads.pop().startswith("ptutils-writer")
    writer.close()


def test_a_write_lost_to_an_outage_is_counted_not_raised():
    clock = OutageClock()
    writer = BackgroundWriter("s", clock)

    def lost() -> None:
        raise BackendUnavailableError("server gone")

    writer.submit(lost)
    writer.drain()
    assert clock.since is not None and clock.failures == 1
    assert clock.error == "BackendUnavailableError: server gone"
    writer.close()


def test_any_other_failure_is_raised_at_the_next_reap_or_drain():
    writer = BackgroundWriter("s", OutageClock())

    def broken() -> None:
        raise ValueError("bad checkpoint")

    future = writer.submit(broken)
    while not future.done():
        time.sleep(0.001)
    with pytest.raises(ValueError, match="bad checkpoint"):
        writer.reap()
    writer.submit(broken)
    writer.drain(raise_errors=False)  # a failing session records its failure instead
    writer.submit(broken)
    with pytest.raises(ValueError, match="bad checkpoint"):
        writer.drain()
    writer.close()


def test_every_write_waits_for_the_write_ahead_of_the_loop():
    writer, order = BackgroundWriter("s", OutageClock()), []
    release = threading.Event()

    def record_start() -> None:
        release.wait(5)
        order.append("start")

    writer.ahead(record_start, undo=lambda exc: order.append("undo"))
    assert writer.ahead_pending
    threading.Timer(0.05, release.set).start()
    writer.submit(order.append, "heartbeat")
    writer.drain()
    assert order == ["start", "heartbeat"] and not writer.ahead_pending
    writer.close()


def test_a_failed_write_ahead_is_undone_once_where_it_is_awaited():
    writer, undone = BackgroundWriter("s", OutageClock()), []

    def record_start() -> None:
        raise BackendUnavailableError("cannot record the start")

    writer.ahead(record_start, undo=undone.append)
    with pytest.raises(BackendUnavailableError, match="cannot record the start"):
        writer.await_ahead()
    assert [str(e) for e in undone] == ["cannot record the start"]
    writer.await_ahead()  # nothing ahead any more: neither raises nor undoes again
    assert len(undone) == 1
    writer.close()


def test_an_interrupt_while_waiting_for_the_write_ahead_neither_undoes_nor_forgets_it():
    """A Ctrl-C lands in the loop's wait, not in the write: the write goes on and is awaited again."""
    writer, undone = BackgroundWriter("s", OutageClock()), []
    waiting, release, raised = threading.Event(), threading.Event(), threading.Event()

    def interrupt(signum, frame) -> None:
        if not raised.is_set():  # the first one that lands: later ones were only sent in case it got lost
            raised.set()
            raise KeyboardInterrupt

    def write() -> None:
        waiting.wait(10)
        # Sent again until it lands: one arriving just before the main thread blocks would wait with it.
        while not raised.is_set() and not release.is_set():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            raised.wait(0.05)
        release.wait(10)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        writer.ahead(write, undone.append)
        with pytest.raises(KeyboardInterrupt):
            waiting.set()
            writer.await_ahead()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert writer.ahead_pending
    release.set()
    writer.await_ahead()
    assert undone == [] and not writer.ahead_pending
    writer.close()
