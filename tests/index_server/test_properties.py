"""Property test: random Add / Delete / Search sequences on a shard's catalogue (a dense database and
a bag-of-words database, with groups, ties and refused items) against a brute-force model.

Small integer vectors and bags make ties common; a result is checked for what a user relies on
rather than for one tie order: the returned ids are distinct, each with its true score, and no item
(or group) left out scores above the last one returned.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.bow_codec import BagOfWords
from common.errors import InvalidArgument, NotFound
from index_server.catalogue import Catalogue
from tests.helpers import chi2
from tests.index_server.helpers import item as catalogue_item

VOCABULARY, CODEBOOK, DIMENSION = 24, 5, 4
TOLERANCE = 1e-5
IDS = [f"i{n}" for n in range(8)]
GROUPS = ["", "", "g0", "g1", "g2"]

vectors = st.lists(st.integers(-2, 2), min_size=DIMENSION, max_size=DIMENSION).map(lambda v: np.array(v, np.float32))
bags = st.dictionaries(st.integers(0, VOCABULARY - 1), st.integers(1, 3), min_size=1, max_size=6).map(
    lambda d: BagOfWords(
        np.array(sorted(d), np.int32), np.array([d[w] for w in sorted(d)], np.uint32), VOCABULARY, CODEBOOK
    )
)
values = {"dense": vectors, "bow": bags}


def item(database: str):
    return st.tuples(st.just(database), st.sampled_from(IDS), values[database], st.sampled_from(GROUPS))


operations = st.one_of(
    st.tuples(
        st.just("add"), st.sampled_from(["dense", "bow"]).flatmap(lambda d: st.lists(item(d), min_size=1, max_size=4))
    ),
    st.tuples(
        st.just("delete"),
        st.sampled_from(["dense", "bow"]),
        st.lists(st.sampled_from(IDS + ["zz"]), max_size=3),
        st.lists(st.sampled_from(["g0", "g1", "i3", "gx"]), max_size=2),
    ),
    st.sampled_from(["dense", "bow"]).flatmap(
        lambda d: st.tuples(st.just("search"), st.just(d), values[d], st.integers(1, 6), st.booleans())
    ),
)


@dataclass
class Model:
    """Per database: item id -> (value, group name)."""

    databases: dict[str, dict[str, tuple[object, str]]] = field(default_factory=dict)

    def score(self, database: str, query, value) -> float:
        if database == "dense":
            q, v = np.asarray(query, np.float64), np.asarray(value, np.float64)
            return float(q @ v / np.linalg.norm(q) / np.linalg.norm(v))
        return 1.0 - chi2(query, value) / 2.0

    def scores(self, database: str, query) -> dict[str, float]:
        scored = {i: self.score(database, query, v) for i, (v, _) in self.databases[database].items()}
        # Bag-of-words: only items sharing a word with the query are found.
        return scored if database == "dense" else {i: s for i, s in scored.items() if s > TOLERANCE}


def valid(database: str, value) -> bool:
    return database == "bow" or bool(np.any(value))


def check_search(model: Model, database: str, query, top_k: int, grouped: bool, hits) -> None:
    scores = model.scores(database, query)
    group_of = {i: g for i, (_, g) in model.databases[database].items()}
    ids = [h.item_id for h in hits]
    assert len(set(ids)) == len(ids)
    for hit in hits:
        assert abs(hit.score - scores[hit.item_id]) < TOLERANCE, (hit.item_id, hit.score, scores[hit.item_id])
        assert (hit.group_id or hit.item_id) == group_of[hit.item_id]
    assert all(a.score >= b.score - TOLERANCE for a, b in itertools.pairwise(hits))
    if grouped:
        best: dict[str, float] = {}
        for item_id, score in scores.items():
            best[group_of[item_id]] = max(best.get(group_of[item_id], -2.0), score)
        returned = [group_of[i] for i in ids]
        assert len(set(returned)) == len(returned)
        assert len(hits) == min(top_k, len(best))
        for hit, group in zip(hits, returned):
            assert abs(hit.score - best[group]) < TOLERANCE  # each group by its best item
        if hits:
            assert all(s <= hits[-1].score + TOLERANCE for g, s in best.items() if g not in returned)
    else:
        assert len(hits) == min(top_k, len(scores))
        if hits:
            assert all(s <= hits[-1].score + TOLERANCE for i, s in scores.items() if i not in ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, min_size=1, max_size=25))
def test_the_catalogue_answers_as_brute_force(ops):
    catalogue, model = Catalogue(), Model()
    for op in ops:
        if op[0] == "add":
            batch = op[1]
            items = [catalogue_item(item_id, database, value, group) for database, item_id, value, group in batch]
            if not all(valid(database, value) for database, _, value, _ in batch):
                try:
                    catalogue.add(items)
                    raise AssertionError("a zero vector was accepted")
                except InvalidArgument as error:
                    first = next(n for n, (d, _, v, _) in enumerate(batch) if not valid(d, v))
                    assert str(error) == (
                        f"item #{first} ({batch[first][1]!r}): signature is all zeros: cosine similarity is "
                        "undefined for it; nothing of this stream was added"
                    )
                continue  # all or nothing: the model is unchanged
            held = model.databases.setdefault(batch[0][0], {})
            before, keys = set(held), [item_id for _, item_id, _, _ in batch]
            added, replaced = catalogue.add(items)
            assert added == len(set(keys))
            assert replaced == len({k for n, k in enumerate(keys) if k in before or k in keys[:n]})
            for _, item_id, value, group in batch:
                held[item_id] = (value, group or item_id)
        elif op[0] == "delete":
            _, database, item_ids, group_ids = op
            if database not in model.databases:
                try:
                    catalogue.delete(database, item_ids, group_ids)
                    raise AssertionError("a delete in a database that does not exist was accepted")
                except NotFound:
                    continue
            held = model.databases[database]
            gone = {i for i in item_ids if i in held} | {i for i, (_, g) in held.items() if g in group_ids}
            groups_held = {g for _, g in held.values()}
            deleted = catalogue.delete(database, item_ids, group_ids)
            assert deleted.deleted == len(gone)
            assert deleted.not_found == [i for i in dict.fromkeys(item_ids) if i not in held]
            assert deleted.groups_not_found == [g for g in dict.fromkeys(group_ids) if g not in groups_held]
            for item_id in gone:
                del held[item_id]
        else:
            _, database, query, top_k, grouped = op
            if database not in model.databases or not valid(database, query):
                continue
            _, index = catalogue.get(database)
            check_search(model, database, query, top_k, grouped, index.search(query, top_k, grouped))
            batch = index.search_batch([query, query], top_k, grouped)
            assert [h.item_id for h in batch[0]] == [h.item_id for h in batch[1]]
            check_search(model, database, query, top_k, grouped, batch[0])
    for database, held in model.databases.items():
        assert len(catalogue.get(database)[1]) == len(held)
