"""Dynamic batching across concurrent calls, with Triton's semantics.

Each call submits its items (images for one model) to the model's batcher and waits for their
results; worker threads take items off one queue and run them through the model in batches:

- a batch is never larger than `max_batch`;
- a batch leaves at once when the queue holds `max_batch` items, or exactly one of the
  `preferred_sizes` (the largest one reached, when several are);
- otherwise the oldest waiting item waits at most `max_queue_delay_ms` for others to join it, and
  then whatever is queued leaves (up to `max_batch`).

`workers` batches run at once (as many as the model's inference concurrency): while one runs, the
next one fills. Items keep their order; a call's items may be split over several batches and share
batches with other calls' items. When the model raises, every item of that batch gets the error.
With no queue delay (`max_queue_delay_ms` 0: batches form only while the model is busy), a call
that finds nothing queued and a slot free runs its items itself, in its own thread: what a worker
would do at once, without the hand-offs.
With batching off (`BatchPolicy.enabled` False) `run` calls the model in the caller's thread, in
chunks of `max_batch`, as before batching existed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from common.errors import Unavailable

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class BatchPolicy:
    """A model's batching, as its config.json `dynamic_batching` says (see the module)."""

    max_batch: int = 1
    enabled: bool = False
    max_queue_delay_ms: float = 2.0
    preferred_sizes: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch {self.max_batch} is not >= 1")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms {self.max_queue_delay_ms} is not >= 0")
        wrong = [size for size in self.preferred_sizes if not 1 <= size <= self.max_batch]
        if wrong:
            raise ValueError(f"preferred batch sizes {wrong} are not in [1, max_batch = {self.max_batch}]")
        # `take` reads them ascending (the largest reached is the last one reached)
        object.__setattr__(self, "preferred_sizes", tuple(sorted(set(self.preferred_sizes))))

    @staticmethod
    def from_config(max_batch: int, section: dict[str, Any] | None) -> BatchPolicy:
        """From a model config's `max_batch` and `dynamic_batching` section (absent: off)."""
        if section is None:
            return BatchPolicy(max_batch)
        if not isinstance(section, dict):
            raise ValueError(f'dynamic_batching {section!r} is not an object (e.g. {{"max_queue_delay_ms": 2}})')
        known = {"enabled", "max_queue_delay_ms", "preferred_batch_sizes"}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"dynamic_batching: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        enabled = section.get("enabled", True)
        if not isinstance(enabled, bool):  # bool("false") would be True
            raise ValueError(f"dynamic_batching enabled {enabled!r} is not true or false")
        delay = section.get("max_queue_delay_ms", 2.0)
        if not isinstance(delay, (int, float)) or isinstance(delay, bool):
            raise ValueError(f"dynamic_batching max_queue_delay_ms {delay!r} is not a number")
        sizes = section.get("preferred_batch_sizes", [])
        if not isinstance(sizes, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in sizes):
            raise ValueError(f"dynamic_batching preferred_batch_sizes {sizes!r} is not a list of integers")
        return BatchPolicy(max_batch, enabled, float(delay), tuple(sizes))

    def take(self, queued: int, waited_s: float) -> int:
        """How many of `queued` items leave now, the oldest having waited `waited_s`; 0 = wait."""
        if queued >= self.max_batch:
            return self.max_batch
        reached = [size for size in self.preferred_sizes if size <= queued]
        if reached and (queued in self.preferred_sizes or queued >= self.preferred_sizes[-1]):
            return reached[-1]
        if waited_s * 1000 >= self.max_queue_delay_ms:
            return queued
        return 0


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: Future[tuple[Out, int]]  # the item's result and the size of the batch it ran in
    queued_at: float


class DynamicBatcher(Generic[In, Out]):
    """Runs `run_batch(items) -> results` (one result per item, in order) over batches formed across
    concurrent callers (see the module). `close()` finishes what is queued, then stops the workers."""

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        policy: BatchPolicy,
        name: str = "model",
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.policy = policy
        self.name = name
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._queue: deque[_Pending[In, Out]] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._running = 0  # batches running now (by a worker, or by a caller: see run)
        self._workers = [
            threading.Thread(target=self._work, name=f"batch-{name}-{i}", daemon=True) for i in range(max(workers, 1))
        ]
        if policy.enabled:
            for worker in self._workers:
                worker.start()

    def run(self, items: Sequence[In]) -> tuple[list[Out], int]:
        """The results of `items`, in order, and the largest batch any of them ran in."""
        if not items:
            return [], 0
        if not self.policy.enabled:
            self._refuse_if_closed()
            results: list[Out] = []
            for start in range(0, len(items), self.policy.max_batch):
                chunk = list(items[start : start + self.policy.max_batch])
                results.extend(self._checked(chunk, self._run_batch(chunk)))
                self._report(len(chunk))
            return results, min(len(items), self.policy.max_batch)
        if self._run_here(items):
            return self._direct(items)
        outcomes = [future.result() for future in self.submit(items)]
        return [result for result, _ in outcomes], max(size for _, size in outcomes)

    def _run_here(self, items: Sequence[In]) -> bool:
        """Whether the caller may run its items itself, now: with no queue delay, nothing queued
        and a worker's slot free, a worker would take exactly these items at once; running them
        in the caller's thread spares the two thread hand-offs (about 3 ms a call measured on 2
        cores, bench/serving.py). Takes the slot when it says yes."""
        if self.policy.max_queue_delay_ms > 0 or len(items) > self.policy.max_batch:
            return False
        with self._changed:
            if self._closed:
                raise self._unavailable()
            if self._queue or self._running >= len(self._workers):
                return False
            self._running += 1
            return True

    def _direct(self, items: Sequence[In]) -> tuple[list[Out], int]:
        try:
            results = list(self._checked(list(items), self._run_batch(list(items))))
            self._report(len(items))
            return results, len(items)
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._changed:
            self._running -= 1
            self._changed.notify_all()

    def submit(self, items: Sequence[In]) -> list[Future[tuple[Out, int]]]:
        """Queues `items`; each future gets its item's result and the size of the batch it ran in.
        With batching off there are no workers: the items run here, in chunks of `max_batch`."""
        now = time.monotonic()
        pending: list[_Pending[In, Out]] = [_Pending(item, Future(), now) for item in items]
        if not self.policy.enabled:
            self._refuse_if_closed()
            for start in range(0, len(pending), self.policy.max_batch):
                chunk = pending[start : start + self.policy.max_batch]
                for p in chunk:
                    p.future.set_running_or_notify_cancel()
                self._run_and_settle(chunk)
            return [p.future for p in pending]
        with self._changed:
            if self._closed:
                raise self._unavailable()
            self._queue.extend(pending)
            self._changed.notify_all()
        return [p.future for p in pending]

    def _refuse_if_closed(self) -> None:
        with self._changed:
            if self._closed:
                raise self._unavailable()

    def _unavailable(self) -> Unavailable:
        return Unavailable(f"model {self.name} is being unloaded: send the request again")

    def close(self) -> None:
        """Runs what is queued, then stops the workers (new submissions are refused)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for worker in self._workers:
            if worker.is_alive() and worker is not threading.current_thread():  # close() from run_batch
                worker.join()

    def queued(self) -> int:
        with self._changed:
            return len(self._queue)

    def _next_batch(self) -> list[_Pending[In, Out]] | None:
        """Blocks until a batch may leave (see the module); None when closed and empty."""
        with self._changed:
            while True:
                if not self._queue:
                    if self._closed:
                        return None
                    self._changed.wait()
                    continue
                if self._running >= len(self._workers):  # a caller runs its own batch (see run)
                    self._changed.wait()
                    continue
                waited = time.monotonic() - self._queue[0].queued_at
                take = self.policy.take(len(self._queue), waited)
                if take == 0 and self._closed:
                    take = min(len(self._queue), self.policy.max_batch)
                if take:
                    self._running += 1
                    return [self._queue.popleft() for _ in range(take)]
                self._changed.wait(self.policy.max_queue_delay_ms / 1000 - waited)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                live = [p for p in batch if p.future.set_running_or_notify_cancel()]
                if live:
                    self._run_and_settle(live)
            finally:
                self._finished()

    def _run_and_settle(self, batch: list[_Pending[In, Out]]) -> None:
        """Runs one batch and gives each item's future its result, or the batch's error; never
        raises (a worker that died would leave every later caller waiting)."""
        try:
            results = self._checked([p.item for p in batch], self._run_batch([p.item for p in batch]))
        except BaseException as exc:
            for p in batch:
                p.future.set_exception(exc)
            return
        self._report(len(batch))
        for p, result in zip(batch, results):
            p.future.set_result((result, len(batch)))

    def _report(self, size: int) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(size)
        except Exception:  # telemetry must not fail the batch it counts
            log.exception("on_batch of model %s failed", self.name)

    def _checked(self, items: list[In], results: Sequence[Out]) -> Sequence[Out]:
        if len(results) != len(items):
            raise RuntimeError(f"model {self.name} returned {len(results)} results for a batch of {len(items)}")
        return results
