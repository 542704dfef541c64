"""Dense databases past their exact size: the approximate index and its exact re-rank against brute
force, deletes, snapshots, filters inside the search on both paths, attributes, builds under load."""

import threading

import numpy as np
import pytest

from index_server.dense import DenseDatabase, DenseTuning
from index_server.domain import Filter, LabelClause, ProductAttributes
from tests.index_server.helpers import dense_scores, grouped_reference, ungrouped_reference

DIMENSION = 64


def clustered(rng, count, clusters=40):
    """(count, 64) float32: near-duplicates around random centres, as product photos are."""
    centres = rng.normal(size=(clusters, DIMENSION))
    return (centres[rng.integers(0, clusters, count)] + 0.35 * rng.normal(size=(count, DIMENSION))).astype(np.float32)


def approximate(count=3000, seed=0, **tuning):
    """A database of `count` clustered items in groups of 3 (g0, g1, ...), made approximate by
    crossing a small threshold (the build in the add that crosses it)."""
    rng = np.random.default_rng(seed)
    vectors = clustered(rng, count)
    settings = {"exact_below": 1000, "background": False, "rerank_min": 100, **tuning}
    db = DenseDatabase(DIMENSION, tuning=DenseTuning(**settings))
    ids = [f"v{i}" for i in range(count)]
    db.add_batch(ids, vectors, [{"n": str(i)} for i in range(count)], [f"g{i // 3}" for i in range(count)])
    return db, dict(zip(ids, vectors)), rng


def brute(query, vectors, top_k, allowed=None):
    scores = dense_scores(query, {i: v for i, v in vectors.items() if allowed is None or i in allowed})
    return ungrouped_reference(scores, top_k)


def test_approximate_search_finds_the_exact_top_10_with_exact_scores():
    db, vectors, rng = approximate()
    assert db.approximate and db.index_type.startswith("IVF") and db.index_type.endswith("+ exact re-rank")
    found = 0
    for query in clustered(rng, 50):
        hits = db.search(query, 10)
        scores = dense_scores(query, vectors)
        found += len({h.item_id for h in hits} & {i for i, _ in brute(query, vectors, 10)})
        # Re-ranked with the full vectors: every score is the exact cosine, best first.
        np.testing.assert_allclose([h.score for h in hits], [scores[h.item_id] for h in hits], atol=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert found / 500 >= 0.95
    hit = db.search(vectors["v7"], 1)[0]
    assert (hit.item_id, hit.metadata, hit.group_id) == ("v7", {"n": "7"}, "g2")


def test_deletes_replaces_and_groups_on_the_approximate_index():
    db, vectors, rng = approximate()
    assert db.delete("v10") and not db.delete("v10") and "v10" not in db
    assert all(h.item_id != "v10" for h in db.search(vectors["v10"], 50))
    assert db.delete_groups(["g5", "nope"]) == 3 and db.group_size("g5") == 0
    assert all(h.group != "g5" for h in db.search(vectors["v16"], 50))
    moved = rng.normal(size=DIMENSION).astype(np.float32)  # far from every cluster
    assert db.add("v20", moved, {"n": "again"}, "g7") is True  # replaced, in another group
    hit = db.search(moved, 1)[0]
    assert (hit.item_id, hit.metadata, hit.group_id) == ("v20", {"n": "again"}, "g7")
    assert len(db) == 3000 - 4 and db.group_size("g7") == 4 and db.group_size("g6") == 2
    db.add("fresh", vectors["v30"] * 2, {})
    assert {h.item_id for h in db.search(vectors["v30"], 2)} == {"v30", "fresh"}


def test_an_approximate_snapshot_round_trips():
    db, vectors, rng = approximate()
    db.delete("v3")
    db.set_attributes("g9", ProductAttributes("shop/shoes", frozenset({"red"}), {"brand": "acme"}))
    copy = DenseDatabase.from_state(db.state())
    assert copy.approximate and copy.index_type == db.index_type and len(copy) == len(db)
    for query in clustered(rng, 5):
        assert copy.search(query, 10) == db.search(query, 10)
        assert copy.search(query, 5, one_per_group=True) == db.search(query, 5, one_per_group=True)
    assert copy.search(vectors["v27"], 1)[0].attributes.labels == {"brand": "acme"}
    copy.add("new", vectors["v3"], {})
    assert copy.search(vectors["v3"], 1)[0].item_id == "new"


def tagged(db, vectors, share, rng):
    """Tags a random `share` of the groups "on"; -> the ids of their items."""
    groups = sorted({f"g{int(i[1:]) // 3}" for i in vectors})
    chosen = set(rng.choice(groups, max(1, int(share * len(groups))), replace=False).tolist())
    for group in chosen:
        db.set_attributes(group, ProductAttributes(tags=frozenset({"on"}), labels={"stock": "yes"}))
    return {i for i in vectors if f"g{int(i[1:]) // 3}" in chosen}


ON = Filter(all_tags=frozenset({"on"}), labels=(LabelClause("stock", frozenset({"yes"})),))


@pytest.mark.parametrize("mode", ["flat", "approximate", "approximate through the selector"])
def test_a_1_percent_filter_returns_the_exact_top_k_of_the_passing_items(mode):
    if mode == "flat":
        rng = np.random.default_rng(1)
        vectors = dict(zip([f"v{i}" for i in range(3000)], clustered(rng, 3000)))
        db = DenseDatabase(DIMENSION)
        db.add_batch(list(vectors), np.stack(list(vectors.values())), group_ids=[f"g{i // 3}" for i in range(3000)])
    else:
        db, vectors, rng = approximate(seed=1, filter_exact_rows=0 if "selector" in mode else 20_000)
    assert db.approximate == (mode != "flat")
    passing = tagged(db, vectors, 0.01, rng)
    assert len(passing) == 30
    for query in clustered(rng, 10):
        hits = db.search(query, 10, filter=ON)
        expected = brute(query, vectors, 10, passing)
        assert len(hits) == 10 and all(h.item_id in passing for h in hits)  # the full top k, inside
        if mode == "approximate through the selector":  # the IVF's candidates: most of the exact ones
            assert len({h.item_id for h in hits} & {i for i, _ in expected}) >= 8
        else:
            assert [h.item_id for h in hits] == [i for i, _ in expected]
            np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
        assert all(h.attributes.tags == frozenset({"on"}) for h in hits)
    assert len(db.search(clustered(rng, 1)[0], 100, filter=ON)) == 30  # fewer pass than k: all of them
    batch = db.search_batch(clustered(rng, 3), 10, filter=ON)
    assert all(len(hits) == 10 and {h.item_id for h in hits} <= passing for hits in batch)


@pytest.mark.parametrize("approximate_mode", [False, True])
def test_one_per_group_with_a_filter_equals_brute_force_over_the_passing_groups(approximate_mode):
    rng = np.random.default_rng(2)
    if approximate_mode:
        db, vectors, rng = approximate(seed=2)
    else:
        vectors = dict(zip([f"v{i}" for i in range(1500)], clustered(rng, 1500)))
        db = DenseDatabase(DIMENSION)
        for i, (item_id, vector) in enumerate(vectors.items()):
            db.add(item_id, vector, {}, f"g{i // 3}")
    passing = tagged(db, vectors, 0.05, rng)
    group_of = {i: f"g{int(i[1:]) // 3}" for i in passing}
    for query in clustered(rng, 5):
        hits = db.search(query, 8, one_per_group=True, filter=ON)
        expected = grouped_reference(dense_scores(query, {i: vectors[i] for i in passing}), group_of, 8)
        assert [h.item_id for h in hits] == [i for i, _ in expected]
        assert len({h.group for h in hits}) == len(hits) == 8


def test_no_item_passes_and_an_empty_filter_keeps_everything():
    db, vectors, _ = approximate()
    nothing = Filter(path_prefix="nowhere")
    assert db.search(vectors["v1"], 10, filter=nothing) == [] and db.search_batch(
        [vectors["v1"]], 3, False, nothing
    ) == [[]]
    assert db.search(vectors["v1"], 5, filter=Filter()) == db.search(vectors["v1"], 5)


def test_searches_go_on_correctly_while_the_approximate_index_is_built():
    rng = np.random.default_rng(3)
    vectors = clustered(rng, 4000)
    db = DenseDatabase(DIMENSION, tuning=DenseTuning(exact_below=3000, rerank_min=100))
    db.add_batch([f"v{i}" for i in range(2999)], vectors[:2999])
    errors: list[BaseException] = []
    stop = threading.Event()
    searched = [0]

    def search():
        try:
            while not stop.is_set():
                i = int(rng.integers(0, 2999))
                hits = db.search(vectors[i], 5)
                assert hits[0].item_id == f"v{i}" and hits[0].score == pytest.approx(1.0, abs=1e-5)
                searched[0] += 1
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=search) for _ in range(2)]
    for reader in readers:
        reader.start()
    db.add_batch([f"v{i}" for i in range(2999, 3500)], vectors[2999:3500])  # crosses: a build starts
    assert db.building
    for i in range(3500, 4000):  # adds and deletes while it runs: the build catches up with them
        db.add(f"v{i}", vectors[i], {})
    db.delete("v5")
    assert db.wait_for_build(60)
    stop.set()
    for reader in readers:
        reader.join()
    assert not errors and searched[0] > 0 and db.approximate and len(db) == 3999
    assert db.search(vectors[3999], 1)[0].item_id == "v3999" and db.search(vectors[5], 1)[0].item_id != "v5"


def test_the_index_is_rebuilt_when_the_database_has_grown():
    rng = np.random.default_rng(4)
    vectors = clustered(rng, 2400)
    db = DenseDatabase(DIMENSION, tuning=DenseTuning(exact_below=600, rebuild_growth=2, background=False))
    db.add_batch([f"v{i}" for i in range(700)], vectors[:700])
    first = db.index_type
    db.add_batch([f"v{i}" for i in range(700, 1500)], vectors[700:1500])
    assert db.index_type != first  # more lists for more items
    flat = DenseDatabase(DIMENSION, factory="Flat")
    flat.add_batch([f"v{i}" for i in range(1500)], vectors[:1500])
    assert db.memory_bytes < flat.memory_bytes - 1500 * DIMENSION * 3  # codes in memory, vectors on disk


def test_add_batch_refuses_a_bad_vector_and_counts_replacements():
    db = DenseDatabase(4)
    assert db.add_batch(["a", "b", "a"], np.eye(4, dtype=np.float32)[:3]) == 1
    assert len(db) == 2 and db.search(np.eye(4, dtype=np.float32)[2], 1)[0].item_id == "a"
    with pytest.raises(ValueError, match=r"item #1: .*all zeros"):
        db.add_batch(["c", "d"], np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32))
    assert "c" not in db and db.index_type == "flat"
