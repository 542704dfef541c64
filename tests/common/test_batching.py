"""Dynamic batching (common/batching.py): Triton's policy, and batches shared across concurrent callers
with every item's result (or its batch's error) reaching its own caller."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from common.batching import BatchPolicy, DynamicBatcher
from common.errors import Unavailable

# --- the policy ----------------------------------------------------------------------------------


def test_a_full_batch_leaves_at_once_and_never_exceeds_max_batch():
    policy = BatchPolicy(4, True, 10.0)
    assert policy.take(4, 0.0) == 4
    assert policy.take(9, 0.0) == 4
    assert policy.take(3, 0.0) == 0  # not full, nobody waited long enough


def test_preferred_sizes_leave_at_once_the_largest_reached():
    policy = BatchPolicy(8, True, 10.0, (2, 4))
    assert [policy.take(queued, 0.0) for queued in range(1, 8)] == [0, 2, 0, 4, 4, 4, 4]
    assert policy.take(3, 0.010) == 3  # the delay is over: whatever is queued leaves


def test_preferred_sizes_given_out_of_order_are_read_ascending():
    policy = BatchPolicy(8, True, 10.0, (4, 2, 4))
    assert policy.preferred_sizes == (2, 4)
    assert policy.take(8, 0.0) == 8
    assert policy.take(6, 0.0) == 4


def test_the_oldest_item_waits_at_most_the_queue_delay():
    policy = BatchPolicy(8, True, 2.0)
    assert policy.take(1, 0.0019) == 0
    assert policy.take(1, 0.002) == 1
    assert policy.take(5, 0.5) == 5
    assert BatchPolicy(8, True, 0.0).take(1, 0.0) == 1  # no delay: never waits


def test_from_config():
    assert BatchPolicy.from_config(4, None) == BatchPolicy(4, enabled=False)
    assert BatchPolicy.from_config(4, {}) == BatchPolicy(4, True, 2.0, ())
    section = {"enabled": True, "max_queue_delay_ms": 5, "preferred_batch_sizes": [4, 2]}
    assert BatchPolicy.from_config(8, section) == BatchPolicy(8, True, 5.0, (2, 4))
    assert not BatchPolicy.from_config(8, {"enabled": False}).enabled


@pytest.mark.parametrize(
    ("max_batch", "section", "message"),
    [
        (0, None, "max_batch 0 is not >= 1"),
        (4, {"max_queue_delay": 2}, "unknown keys \\['max_queue_delay'\\]"),
        (4, {"preferred_batch_sizes": [2, 8]}, "preferred batch sizes \\[8\\] are not in \\[1, max_batch = 4\\]"),
        (4, {"preferred_batch_sizes": [0]}, "preferred batch sizes \\[0\\]"),
        (4, {"preferred_batch_sizes": 2}, "is not a list of integers"),
        (4, {"preferred_batch_sizes": ["2"]}, "is not a list of integers"),
        (4, {"max_queue_delay_ms": -1}, "max_queue_delay_ms -1.0 is not >= 0"),
        (4, {"max_queue_delay_ms": "2"}, "is not a number"),
        (4, {"enabled": "false"}, "enabled 'false' is not true or false"),
        (4, [], "is not an object"),
    ],
)
def test_from_config_says_what_is_wrong(max_batch, section, message):
    with pytest.raises(ValueError, match=message):
        BatchPolicy.from_config(max_batch, section)


# --- the batcher ---------------------------------------------------------------------------------


class Recorder:
    """A model's run_batch: ten times each item, recording the batches it ran (and failing the
    batches holding a negative item, as a model fails on a bad input)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.running = self.most_running = 0
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.batches.append(list(items))
            self.threads.add(threading.current_thread().name)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            time.sleep(self.seconds)
            bad = [item for item in items if item < 0]
            if bad:
                raise ValueError(f"cannot read items {bad}")
            return [item * 10 for item in items]
        finally:
            with self.lock:
                self.running -= 1


def in_threads(calls: Sequence[Callable[[], object]], timeout_s: float = 20.0) -> list[Any]:
    """Runs each call in its own thread, started together; their results (or exceptions), in order."""
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))
    assert not any(thread.is_alive() for thread in threads), f"calls still waiting after {timeout_s} s"
    return results


def test_concurrent_callers_share_one_batch():
    model = Recorder()
    # a long delay: the batch leaves only when the eighth caller's item makes it full
    batcher = DynamicBatcher(model, BatchPolicy(8, True, 10_000.0), "m")
    try:
        results = in_threads([lambda i=i: batcher.run([i]) for i in range(8)])
    finally:
        batcher.close()
    assert results == [([i * 10], 8) for i in range(8)]
    assert [sorted(batch) for batch in model.batches] == [list(range(8))]


def test_each_caller_gets_its_own_results_in_order():
    model = Recorder()
    batcher = DynamicBatcher(model, BatchPolicy(4, True, 1.0), "m", workers=2)
    calls = [list(range(100 * i, 100 * i + 1 + i % 5)) for i in range(12)]
    try:
        results = in_threads([lambda items=items: batcher.run(items) for items in calls])
    finally:
        batcher.close()
    for items, (outputs, largest) in zip(calls, results):
        assert outputs == [item * 10 for item in items]
        assert 1 <= largest <= 4
    assert all(len(batch) <= 4 for batch in model.batches)
    assert sorted(item for batch in model.batches for item in batch) == sorted(i for c in calls for i in c)


def test_a_call_larger_than_max_batch_is_split_in_order():
    model = Recorder()
    batcher = DynamicBatcher(model, BatchPolicy(4, True, 0.0), "m")
    try:
        assert batcher.run(list(range(10))) == ([i * 10 for i in range(10)], 4)
    finally:
        batcher.close()
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_failing_batch_fails_its_items_and_no_other():
    model = Recorder()
    batcher = DynamicBatcher(model, BatchPolicy(2, True, 0.0), "m")
    try:
        futures = batcher.submit([1, 2, -3, 4, 5, 6])
        outcomes = []
        for future in futures:
            error = future.exception(timeout=10)
            outcomes.append(type(error) if error else future.result())
        assert outcomes == [(10, 2), (20, 2), ValueError, ValueError, (50, 2), (60, 2)]
        with pytest.raises(ValueError, match=r"cannot read items \[-1\]"):
            batcher.run([-1, 7])
        assert batcher.run([8]) == ([80], 1)  # the worker survived
    finally:
        batcher.close()


def test_a_model_returning_the_wrong_number_of_results_fails_the_batch():
    batcher = DynamicBatcher(lambda items: items[:-1], BatchPolicy(4, True, 0.0), "m")
    try:
        with pytest.raises(RuntimeError, match="model m returned 1 results for a batch of 2"):
            batcher.run([1, 2])
    finally:
        batcher.close()


def test_a_failing_on_batch_does_not_stop_the_workers():
    def on_batch(size: int) -> None:
        raise RuntimeError("telemetry is down")

    batcher = DynamicBatcher(Recorder(), BatchPolicy(4, True, 0.0), "m", on_batch=on_batch)
    try:
        assert batcher.run([1, 2]) == ([10, 20], 2)
        assert batcher.run([3]) == ([30], 1)
    finally:
        batcher.close()


def test_workers_run_that_many_batches_at_once():
    model = Recorder(seconds=0.05)
    batcher = DynamicBatcher(model, BatchPolicy(2, True, 0.0), "m", workers=2)
    try:
        assert batcher.run(list(range(8)))[0] == [i * 10 for i in range(8)]
    finally:
        batcher.close()
    assert model.most_running == 2


def test_close_finishes_the_queue_then_refuses_new_work():
    model = Recorder()
    batcher = DynamicBatcher(model, BatchPolicy(8, True, 60_000.0), "m")  # would wait a minute
    futures = batcher.submit([1, 2, 3])
    assert batcher.queued() == 3
    started = time.monotonic()
    batcher.close()
    assert time.monotonic() - started < 5
    assert [f.result(timeout=0) for f in futures] == [(10, 3), (20, 3), (30, 3)]
    with pytest.raises(Unavailable, match="model m is being unloaded"):
        batcher.submit([4])
    with pytest.raises(Unavailable):
        batcher.run([4])
    batcher.close()  # a second close does nothing


def test_batching_off_runs_in_the_callers_thread_in_chunks():
    model = Recorder()
    sizes: list[int] = []
    batcher = DynamicBatcher(model, BatchPolicy(2, enabled=False), "m", on_batch=sizes.append)
    assert batcher.run([1, 2, 3, 4, 5]) == ([10, 20, 30, 40, 50], 2)
    assert batcher.run([]) == ([], 0)
    assert model.batches == [[1, 2], [3, 4], [5]]
    assert model.threads == {threading.current_thread().name}
    assert sizes == [2, 2, 1]
    futures = batcher.submit([6, -7, 8])  # no workers: submit runs them here too, chunk by chunk
    assert [type(f.exception(timeout=0)) for f in futures[:2]] == [ValueError, ValueError]
    assert futures[2].result(timeout=0) == (80, 1)
    batcher.close()
    with pytest.raises(Unavailable):
        batcher.run([1])


def test_many_callers_never_lose_a_wake_up():
    model = Recorder()
    batcher = DynamicBatcher(model, BatchPolicy(4, True, 1.0, (2,)), "m", workers=2)
    rng = random.Random(7)
    plans = [[[rng.randrange(1000) for _ in range(rng.randint(1, 6))] for _ in range(40)] for _ in range(24)]

    def caller(plan: list[list[int]]) -> bool:
        return all(batcher.run(items)[0] == [item * 10 for item in items] for items in plan)

    try:
        assert in_threads([lambda plan=plan: caller(plan) for plan in plans], timeout_s=20) == [True] * len(plans)
    finally:
        batcher.close()
    assert max(len(batch) for batch in model.batches) > 1


# --- no queue delay: the caller runs its own batch when the model is idle ----------------------------


def test_without_queue_delay_an_idle_model_runs_the_call_in_the_callers_thread():
    threads: list[str] = []

    def run(items: list[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        return [i * 2 for i in items]

    batcher = DynamicBatcher(run, BatchPolicy(4, True, 0.0), "direct", workers=1)
    try:
        assert batcher.run([1, 2]) == ([2, 4], 2)
        assert threads == [threading.current_thread().name]
        assert batcher.run([1, 2, 3, 4, 5])[0] == [2, 4, 6, 8, 10]  # above max_batch: the workers split it
        assert all(name.startswith("batch-direct") for name in threads[1:]) and len(threads) == 3
    finally:
        batcher.close()


def test_without_queue_delay_batches_still_form_while_the_model_is_busy_and_never_overlap():
    inside, most_inside, sizes = [0], [0], []
    lock = threading.Lock()

    def run(items: list[int]) -> list[int]:
        with lock:
            inside[0] += 1
            most_inside[0] = max(most_inside[0], inside[0])
            sizes.append(len(items))
        time.sleep(0.02)
        with lock:
            inside[0] -= 1
        return items

    batcher = DynamicBatcher(run, BatchPolicy(8, True, 0.0), "busy", workers=1)
    try:
        results: list[Any] = [None] * 12
        callers = [threading.Thread(target=lambda n=n: results.__setitem__(n, batcher.run([n])[0])) for n in range(12)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(10)
        assert results == [[n] for n in range(12)]
        assert most_inside[0] == 1  # one slot (workers=1), whether a caller or the worker runs the batch
        assert max(sizes) > 1  # calls that came while the model was busy shared a batch
    finally:
        batcher.close()
