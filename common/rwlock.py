"""A reader-writer lock that prefers writers: many readers at once, a writer alone.

For structures searched far more often than changed (the index databases): searches hold the read
side, so they overlap wherever their work releases the GIL (numba `nogil` kernels, FAISS); adds,
deletes and the swaps of a merge hold the write side and see no reader.

Writer preference: once a writer waits, new readers wait behind it, so a steady stream of searches
cannot starve writes; readers already inside finish first. Neither side is reentrant: a thread
holding either side must not acquire either side again (a second read would wait behind a waiting
writer that waits for the first read: a deadlock). Taking the write side twice in one thread
raises RuntimeError instead of hanging.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ReadWriteLock:
    """`with lock.read():` shares, `with lock.write():` excludes; writers first (see the module)."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._readers = 0  # threads inside the read side
        self._writing: int | None = None  # the thread id inside the write side
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._changed:
            while self._writing is not None or self._writers_waiting:
                self._changed.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                if self._readers == 0:
                    self._changed.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._changed:
            if self._writing == me:
                raise RuntimeError("this thread already holds the write side (the lock is not reentrant)")
            self._writers_waiting += 1
            acquired = False
            try:
                while self._writing is not None or self._readers:
                    self._changed.wait()
                acquired = True
            finally:
                self._writers_waiting -= 1
                if not acquired:  # interrupted while waiting: readers held back by it may go on
                    self._changed.notify_all()
            self._writing = me
        try:
            yield
        finally:
            with self._changed:
                self._writing = None
                self._changed.notify_all()

    def readers(self) -> int:
        """Threads inside the read side now (for tests and diagnostics)."""
        with self._changed:
            return self._readers

    def writing(self) -> bool:
        """Whether a thread is inside the write side now."""
        with self._changed:
            return self._writing is not None
