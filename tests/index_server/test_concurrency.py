"""Concurrent searches of one database: they run at the same time (a single database lock made them
take turns), and, with adds, replaces, deletes, merges, compactions and snapshots going on beside
them, each answers exactly what a brute-force search of one state between two writes answers."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import pytest

import index_server.inverted as inverted
from index_server.dense import DenseDatabase
from index_server.domain import Hit
from index_server.inverted import BowIndex
from tests.helpers import chi2_distances, dense
from tests.index_server.helpers import grouped_reference, random_bags, ungrouped_reference

WAIT_S = 10.0  # bounds every wait; the searches under test take milliseconds
TOP_K = 10


# -- two searches at once ----------------------------------------------------------------------------


def run_together(searches: Sequence[Callable[[], list[Hit]]]) -> list[list[Hit]]:
    """Runs the searches in threads at once; their answers, or the first error raised in any."""
    answers: list[list[Hit] | None] = [None] * len(searches)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            answers[i] = searches[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(searches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * WAIT_S)
    if errors:
        raise errors[0]
    assert all(answer is not None for answer in answers), "a search did not finish"
    return [answer for answer in answers if answer is not None]


def as_pairs(hits: list[Hit]) -> list[tuple[str, float]]:
    return [(h.item_id, h.score) for h in hits]


def test_two_bag_of_words_searches_are_inside_the_accumulation_at_once(monkeypatch):
    rng = np.random.default_rng(0)
    index = BowIndex(500, 1, background_merge=False)
    for i, bag in enumerate(random_bags(rng, 300, 500)):
        index.add(f"item-{i}", bag, {})
    index.merge()  # postings in the base, where _accumulate_segment reads them
    queries = random_bags(rng, 2, 500)
    alone = [as_pairs(index.search(q, TOP_K)) for q in queries]

    # Each search waits inside the compiled accumulation until the other one is inside it too: with
    # one lock held across the accumulation the second never gets there and the barrier breaks.
    inside = threading.Barrier(2, timeout=WAIT_S)
    accumulate = inverted._accumulate_segment

    def meeting(*args: object) -> None:
        inside.wait()
        accumulate(*args)

    monkeypatch.setattr(inverted, "_accumulate_segment", meeting)
    together = run_together([lambda q=q: index.search(q, TOP_K) for q in queries])
    assert [as_pairs(hits) for hits in together] == alone
    assert all(len(pairs) == TOP_K for pairs in alone)


def test_two_dense_searches_are_inside_faiss_at_once(monkeypatch):
    rng = np.random.default_rng(1)
    db = DenseDatabase(16)
    for i, vector in enumerate(rng.normal(size=(300, 16)).astype(np.float32)):
        db.add(f"item-{i}", vector, {})
    queries = list(rng.normal(size=(2, 16)).astype(np.float32))
    alone = [as_pairs(db.search(q, TOP_K)) for q in queries]

    inside = threading.Barrier(2, timeout=WAIT_S)
    search = faiss.IndexIDMap2.search

    def meeting(self: faiss.Index, *args: object, **kwargs: object) -> object:
        inside.wait()
        return search(self, *args, **kwargs)

    monkeypatch.setattr(faiss.IndexIDMap2, "search", meeting)
    together = run_together([lambda q=q: db.search(q, TOP_K) for q in queries])
    assert [as_pairs(hits) for hits in together] == alone
    assert all(len(pairs) == TOP_K for pairs in alone)


# -- searches beside writes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str  # "add" (a new item or a replace), "delete", "delete_group"
    name: str  # the item id, or the group id for "delete_group"
    value: int = -1  # "add": the number of its value (a row of the score table)
    group: str = ""


@dataclass(frozen=True)
class Observation:
    query: int
    grouped: bool
    done_before: int  # writes finished before the search began: its state is at least this one
    begun_after: int  # writes begun when it returned: its state is at most this one
    hits: list[tuple[str, float]]


class Scenario:
    """Initial items, a seeded sequence of writes and the brute-force scores of every value ever
    stored against every query; the state after m writes is states[m] (id -> (value, group))."""

    def __init__(self, rng: np.random.Generator, initial: int, writes: int, groups: int):
        items: dict[str, tuple[int, str]] = {}
        for i in range(initial):
            items[f"item-{i}"] = (i, f"g{rng.integers(groups)}" if i % 3 else "")
        self.initial = dict(items)
        self.ops: list[Op] = []
        self.states = [dict(items)]
        next_item, next_value = initial, initial
        for _ in range(writes):
            roll = rng.random()
            if roll < 0.45 or not items:  # a new item
                op = Op("add", f"item-{next_item}", next_value, f"g{rng.integers(groups)}" if next_item % 3 else "")
                next_item += 1
            elif roll < 0.6:  # a replace: new value (and group) under an existing id
                name = sorted(items)[rng.integers(len(items))]
                op = Op("add", name, next_value, f"g{rng.integers(groups)}")
            elif roll < 0.9:
                op = Op("delete", sorted(items)[rng.integers(len(items))])
            else:
                op = Op("delete_group", f"g{rng.integers(groups)}")
            if op.kind == "add":
                items[op.name] = (op.value, op.group)
                next_value += 1
            elif op.kind == "delete":
                del items[op.name]
            else:
                items = {k: v for k, v in items.items() if v[1] != op.name}
            self.ops.append(op)
            self.states.append(dict(items))
        self.values = next_value
        self.scores = np.zeros((0, 0))  # (queries, values), > 0 for items a search finds: set by the caller
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _state_arrays(self, state: int) -> tuple[np.ndarray, np.ndarray]:
        """The state's items as (value numbers, group numbers), an item without a group its own."""
        if state not in self._arrays:
            items = list(self.states[state].items())
            numbers: dict[str, int] = {}
            groups = [numbers.setdefault(group or f"own:{name}", len(numbers)) for name, (_, group) in items]
            self._arrays[state] = (np.array([v for _, (v, _) in items], np.int64), np.array(groups, np.int64))
        return self._arrays[state]

    def expected_scores(self, state: int, query: int, grouped: bool) -> np.ndarray:
        """Brute force at a state: the top_k best scores, of items, or of groups by their best item."""
        values, groups = self._state_arrays(state)
        scores = self.scores[query, values]
        if grouped:
            best = np.full(int(groups.max(initial=-1)) + 1, -np.inf)
            np.maximum.at(best, groups, scores)
            scores = best
        scores = np.sort(scores[scores > 0])[::-1]
        return scores[:TOP_K]

    def matches(self, observation: Observation, state: int) -> bool:
        """Whether the answer is the brute-force one at this state, to float32 rounding: the same
        scores in the same order, each hit a distinct item of that state (of a distinct group when
        grouped) with its score there, so only near-ties may come in another order."""
        expected = self.expected_scores(state, observation.query, observation.grouped)
        items, hits = self.states[state], observation.hits
        if len(hits) != len(expected) or not np.allclose([s for _, s in hits], expected, rtol=0, atol=1e-5):
            return False
        if any(
            item_id not in items or abs(self.scores[observation.query, items[item_id][0]] - score) > 1e-5
            for item_id, score in hits
        ):
            return False
        groups = (
            [items[item_id][1] or f"own:{item_id}" for item_id, _ in hits]
            if observation.grouped
            else [item_id for item_id, _ in hits]
        )
        return len(set(groups)) == len(hits)

    def exact(self, state: int, query: int, grouped: bool) -> list[tuple[str, float]]:
        """The brute-force answer at a state, ids included, by the references the other tests use."""
        items = self.states[state]
        scores = {k: float(self.scores[query, v]) for k, (v, _) in items.items() if self.scores[query, v] > 0}
        if grouped:
            return grouped_reference(scores, {k: g for k, (_, g) in items.items()}, TOP_K)
        return ungrouped_reference(scores, TOP_K)

    def check(self, observations: list[Observation]) -> None:
        for observation in observations:
            states = range(observation.done_before, observation.begun_after + 1)
            assert any(self.matches(observation, m) for m in states), (
                f"query {observation.query} (grouped {observation.grouped}) answered {observation.hits}, "
                f"which no state from {observation.done_before} to {observation.begun_after} gives"
            )


def hammer(
    scenario: Scenario,
    apply: Callable[[Op], None],
    search: Callable[[int, bool], list[Hit]],
    queries: int,
    maintain: Callable[[], None] | None,
    searchers: int = 3,
) -> list[Observation]:
    """One writer applies the scenario's writes in order (yielding between them) while `searchers`
    threads search and `maintain` runs in a loop; every thread's errors are raised here."""
    done, begun = [0], [0]
    finished = threading.Event()
    observations: list[Observation] = []
    errors: list[BaseException] = []

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as exc:
                errors.append(exc)
                finished.set()

        return run

    def writer() -> None:
        for i, op in enumerate(scenario.ops):
            begun[0] = i + 1
            apply(op)
            done[0] = i + 1
            time.sleep(0.0002)
        finished.set()

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not finished.is_set():
            query, grouped = int(rng.integers(queries)), bool(rng.random() < 0.3)
            done_before = done[0]
            hits = search(query, grouped)
            observations.append(Observation(query, grouped, done_before, begun[0], as_pairs(hits)))

    def maintainer() -> None:
        while not finished.is_set() and maintain is not None:
            maintain()
            time.sleep(0.001)

    threads = [threading.Thread(target=guarded(writer), daemon=True)]
    threads += [threading.Thread(target=guarded(functools.partial(searcher, s)), daemon=True) for s in range(searchers)]
    threads.append(threading.Thread(target=guarded(maintainer), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return observations


@pytest.mark.parametrize("seed", [0, 1])
def test_bag_of_words_searches_beside_writes_merges_and_compactions_answer_one_state(seed):
    rng = np.random.default_rng(seed)
    vocabulary = 1000
    scenario = Scenario(rng, initial=1500, writes=500, groups=300)
    bags = random_bags(rng, scenario.values, vocabulary)
    queries = random_bags(rng, 12, vocabulary)
    histograms, query_histograms = np.stack([dense(b) for b in bags]), np.stack([dense(q) for q in queries])
    shared = (query_histograms > 0).astype(np.float64) @ (histograms > 0).T > 0  # a word in common
    scenario.scores = np.where(shared, 1.0 - chi2_distances(query_histograms, histograms) / 2.0, 0.0)

    index = BowIndex(vocabulary, 1, background_merge=False)
    for name, (value, group) in scenario.initial.items():
        index.add(name, bags[value], {}, group)
    index.merge()

    def apply(op: Op) -> None:
        if op.kind == "add":
            index.add(op.name, bags[op.value], {}, op.group)
        elif op.kind == "delete":
            assert index.delete(op.name)
        else:
            index.delete_groups([op.name])

    rounds = [0]

    def maintain() -> None:  # what the server does beside searches: background merges, compactions, snapshots
        rounds[0] += 1
        if rounds[0] % 3 == 0:
            index.compact()
        elif rounds[0] % 5 == 0:
            index.state()
        else:
            index.merge()

    observations = hammer(scenario, apply, lambda q, grouped: index.search(queries[q], TOP_K, grouped), 12, maintain)
    scenario.check(observations)
    assert rounds[0] >= 3, "no compaction ran beside the searches"
    assert sum(o.begun_after > o.done_before for o in observations) > 10, "few searches overlapped a write"

    final = len(scenario.ops)
    assert len(index) == len(scenario.states[final])
    for query in range(len(queries)):
        for grouped in (False, True):
            answer = as_pairs(index.search(queries[query], TOP_K, grouped))
            expected = scenario.exact(final, query, grouped)
            assert [item_id for item_id, _ in answer] == [item_id for item_id, _ in expected]
            np.testing.assert_allclose([s for _, s in answer], [s for _, s in expected], atol=1e-5)


def test_dense_searches_beside_writes_and_snapshots_answer_one_state():
    rng = np.random.default_rng(2)
    dimension = 32
    scenario = Scenario(rng, initial=3000, writes=500, groups=600)
    vectors = rng.normal(size=(scenario.values, dimension)).astype(np.float32)
    queries = rng.normal(size=(12, dimension)).astype(np.float32)
    units = vectors.astype(np.float64) / np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
    query_units = queries.astype(np.float64) / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    # Shifted by 2 into (0, 4]: Scenario.reference keeps only positive scores (bag-of-words items
    # sharing no word); every dense item matches. Shifted back below.
    scenario.scores = query_units @ units.T + 2.0

    db = DenseDatabase(dimension)
    for name, (value, group) in scenario.initial.items():
        db.add(name, vectors[value], {}, group)

    def apply(op: Op) -> None:
        if op.kind == "add":
            db.add(op.name, vectors[op.value], {}, op.group)
        elif op.kind == "delete":
            assert db.delete(op.name)
        else:
            db.delete_groups([op.name])

    def search(query: int, grouped: bool) -> list[Hit]:
        hits = db.search(queries[query], TOP_K, grouped)
        return [Hit(h.item_id, h.score + 2.0, h.metadata, h.group_id, h.box) for h in hits]

    observations = hammer(scenario, apply, search, len(queries), db.state)
    scenario.check(observations)
    assert sum(o.begun_after > o.done_before for o in observations) > 10, "few searches overlapped a write"

    final = len(scenario.ops)
    assert len(db) == len(scenario.states[final])
    for query in range(len(queries)):
        for grouped in (False, True):
            answer = as_pairs(search(query, grouped))
            expected = scenario.exact(final, query, grouped)
            assert [item_id for item_id, _ in answer] == [item_id for item_id, _ in expected]
            np.testing.assert_allclose([s for _, s in answer], [s for _, s in expected], atol=1e-5)
