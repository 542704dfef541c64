"""The reader-writer lock: readers share, a writer is alone, a waiting writer goes before new readers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from common.rwlock import ReadWriteLock

WAIT_S = 5.0  # bounds every wait of these tests; the lock under test answers in microseconds
QUIET_S = 0.2  # how long a blocked thread is watched to stay blocked


def started(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_readers_hold_the_read_side_together():
    lock, both_inside = ReadWriteLock(), threading.Barrier(3, timeout=WAIT_S)
    counts = []

    def reader() -> None:
        with lock.read():
            both_inside.wait()  # broken (BrokenBarrierError) unless both readers are inside at once
            counts.append(lock.readers())
            both_inside.wait()

    threads = [started(reader), started(reader)]
    both_inside.wait()
    both_inside.wait()
    for thread in threads:
        thread.join(WAIT_S)
    assert counts == [2, 2]
    assert lock.readers() == 0 and not lock.writing()


def test_a_writer_waits_for_the_readers_inside_and_excludes_new_ones():
    lock = ReadWriteLock()
    release_reader, writer_in, release_writer, late_reader_in = (threading.Event() for _ in range(4))
    events: list[str] = []

    def reader() -> None:
        with lock.read():
            events.append("reader in")
            release_reader.wait(WAIT_S)
            events.append("reader out")

    def writer() -> None:
        with lock.write():
            events.append("writer in")
            writer_in.set()
            release_writer.wait(WAIT_S)
            events.append("writer out")

    def late_reader() -> None:
        with lock.read():
            events.append("late reader in")
            late_reader_in.set()

    first = started(reader)
    while lock.readers() == 0:
        time.sleep(0.001)
    second = started(writer)
    assert not writer_in.wait(QUIET_S)  # the reader is still inside
    release_reader.set()
    assert writer_in.wait(WAIT_S)
    third = started(late_reader)
    assert not late_reader_in.wait(QUIET_S)  # the writer is inside
    release_writer.set()
    assert late_reader_in.wait(WAIT_S)
    for thread in (first, second, third):
        thread.join(WAIT_S)
    assert events == ["reader in", "reader out", "writer in", "writer out", "late reader in"]


def test_a_waiting_writer_goes_before_readers_that_come_after_it():
    lock = ReadWriteLock()
    release_first = threading.Event()
    order: list[str] = []

    def first_reader() -> None:
        with lock.read():
            release_first.wait(WAIT_S)

    def writer() -> None:
        with lock.write():
            order.append("writer")

    def late_reader() -> None:
        with lock.read():
            order.append("late reader")

    threads = [started(first_reader)]
    while lock.readers() == 0:
        time.sleep(0.001)
    threads.append(started(writer))
    time.sleep(QUIET_S)  # the writer is waiting for the first reader now
    threads.append(started(late_reader))
    time.sleep(QUIET_S)
    assert order == []  # the late reader did not slip in beside the first one
    release_first.set()
    for thread in threads:
        thread.join(WAIT_S)
    assert order == ["writer", "late reader"]


def test_writers_exclude_each_other_and_readers_never_see_half_a_write():
    lock, pair, torn = ReadWriteLock(), [0, 0], []
    stop = threading.Event()

    def writer() -> None:
        for _ in range(2000):
            with lock.write():
                pair[0] += 1
                time.sleep(0)  # invite a switch in the middle of the write
                pair[1] += 1

    def reader() -> None:
        while not stop.is_set():
            with lock.read():
                first = pair[0]
                time.sleep(0)
                if pair[1] != first:
                    torn.append((first, pair[1]))

    readers = [started(reader) for _ in range(3)]
    writers = [started(writer) for _ in range(2)]
    for thread in writers:
        thread.join(30)
    stop.set()
    for thread in readers:
        thread.join(WAIT_S)
    assert pair == [4000, 4000]
    assert torn == []


def test_taking_the_write_side_twice_raises_instead_of_hanging():
    lock = ReadWriteLock()
    with lock.write(), pytest.raises(RuntimeError, match="already holds the write side"), lock.write():
        pass
    with lock.read():  # the failed attempt left the lock usable
        assert lock.readers() == 1 and not lock.writing()
