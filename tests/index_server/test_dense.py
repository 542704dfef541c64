"""Dense databases in FAISS: brute-force equality, grouped search and batches, snapshots."""

import threading

import numpy as np
import pytest

from index_server.dense import DenseDatabase
from index_server.domain import SignatureError
from tests.index_server.helpers import dense_scores, grouped_reference


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_search_equals_brute_force_after_adds_replaces_and_deletes():
    rng = np.random.default_rng(0)
    db = DenseDatabase(16)
    vectors = {}
    for i in range(300):
        v = rng.normal(size=16).astype(np.float32)
        db.add(f"id{i}", v, {"n": str(i)})
        vectors[f"id{i}"] = v
    for i in range(0, 300, 7):
        v = rng.normal(size=16).astype(np.float32)
        assert db.add(f"id{i}", v, {"n": "replaced"}) is True
        vectors[f"id{i}"] = v
    for i in range(0, 300, 5):
        assert db.delete(f"id{i}") is True
        del vectors[f"id{i}"]
    assert not db.delete("id0") and len(db) == len(vectors)
    ids = sorted(vectors)
    matrix = unit(np.stack([vectors[i] for i in ids]))
    for _ in range(10):
        q = rng.normal(size=16).astype(np.float32)
        scores = matrix @ (q / np.linalg.norm(q))
        expected = [ids[j] for j in np.argsort(-scores)[:10]]
        hits = db.search(q, 10)
        assert [h.item_id for h in hits] == expected
        np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:10], atol=1e-5)


def test_metadata_and_small_databases():
    db = DenseDatabase(3)
    db.add("a", np.array([1, 0, 0], dtype=np.float32), {"title": "A"})
    hits = db.search(np.array([1, 0, 0], dtype=np.float32), 10)
    assert [(h.item_id, h.metadata) for h in hits] == [("a", {"title": "A"})]
    assert hits[0].score == pytest.approx(1.0)


@pytest.mark.parametrize(
    "vector, message", [(np.zeros(3), "all zeros"), (np.ones(4), "3-d"), (np.array([np.nan, 1, 1]), "NaN")]
)
def test_bad_vectors_are_refused(vector, message):
    with pytest.raises(SignatureError, match=message):
        DenseDatabase(3).add("x", vector.astype(np.float32), {})


def test_concurrent_adds_and_searches():
    db = DenseDatabase(8)
    rng = np.random.default_rng(1)
    errors = []

    def writer(offset):
        for i in range(500):
            db.add(f"{offset}-{i}", rng.normal(size=8).astype(np.float32), {})

    def reader():
        try:
            for _ in range(200):
                hits = db.search(np.ones(8, dtype=np.float32), 5)
                assert len({h.item_id for h in hits}) == len(hits)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)] + [
        threading.Thread(target=reader) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(db) == 1500


def test_trained_factories_search_exactly_until_trained_then_approximately():
    rng = np.random.default_rng(2)
    db = DenseDatabase(16, factory="IVF4,Flat", train_size=200)
    vectors = rng.normal(size=(400, 16)).astype(np.float32)
    for i, v in enumerate(vectors[:199]):
        db.add(f"v{i}", v, {})
    assert db.search(vectors[10], 1)[0].item_id == "v10"  # exact flat buffer before training
    for i, v in enumerate(vectors[199:], start=199):
        db.add(f"v{i}", v, {})
    assert db._trained and len(db) == 400
    assert db.search(vectors[300], 1)[0].item_id == "v300"  # its own cell is always probed
    assert db.delete("v300") and all(h.item_id != "v300" for h in db.search(vectors[300], 400))


def test_a_bad_factory_string_is_refused():
    with pytest.raises(ValueError, match="factory"):
        DenseDatabase(16, factory="NotAnIndex")


def test_state_round_trip():
    rng = np.random.default_rng(3)
    db = DenseDatabase(8)
    for i in range(50):
        db.add(f"v{i}", rng.normal(size=8).astype(np.float32), {"i": str(i)})
    db.delete("v3")
    copy = DenseDatabase.from_state(db.state())
    q = rng.normal(size=8).astype(np.float32)
    assert copy.search(q, 10) == db.search(q, 10) and len(copy) == 49
    copy.add("new", q, {})
    assert copy.search(q, 1)[0].item_id == "new"


def clustered_groups(rng, groups=40, dimension=16):
    """Groups of near-duplicate images around one centre each, so the nearest items of a query are
    mostly one group's: the grouped search has to look past the first 4k items."""
    db, vectors, group_of = DenseDatabase(dimension), {}, {}
    centres = rng.normal(size=(groups, dimension))
    for g, centre in enumerate(centres):
        for n in range(50 if g in (1, 2) else int(rng.integers(1, 20))):
            item_id, group = (f"solo-{g}", "") if g % 9 == 0 else (f"g{g}-{n}", f"g{g}")
            v = (centre + 0.05 * rng.normal(size=dimension)).astype(np.float32)
            db.add(item_id, v, {"g": str(g)}, group, np.array([n, 0, n + 5, 5], np.float32) if n % 3 else None)
            vectors[item_id], group_of[item_id] = v, group
    return db, vectors, group_of


def test_one_per_group_equals_brute_force_even_when_a_few_groups_own_the_nearest_items():
    rng = np.random.default_rng(4)
    db, vectors, group_of = clustered_groups(rng)
    near = [vectors["g1-0"], vectors["g2-0"] + 0.01]  # inside a big group: top 4k items are all its own
    for top_k in (1, 3, 10, 100):
        for q in near + list(rng.normal(size=(4, 16)).astype(np.float32)):
            hits = db.search(q, top_k, one_per_group=True)
            expected = grouped_reference(dense_scores(q, vectors), group_of, top_k)
            assert [h.item_id for h in hits] == [i for i, _ in expected]
            np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
            assert len(hits) == min(top_k, len({g or i for i, g in group_of.items()}))
    assert {h.group for h in db.search(near[0], 4 * 10)} == {"g1"}  # so the first 4k were not enough


def test_search_batch_equals_each_search_from_one_faiss_call(monkeypatch):
    rng = np.random.default_rng(5)
    db, _, _ = clustered_groups(rng)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    expected = {grouped: [db.search(q, 6, grouped) for q in queries] for grouped in (False, True)}
    calls = []
    search = db._index.search
    monkeypatch.setattr(db._index, "search", lambda x, k: calls.append(len(x)) or search(x, k))
    for grouped in (False, True):
        calls.clear()
        got = db.search_batch(queries, 6, grouped)
        assert [[h.item_id for h in hits] for hits in got] == [[h.item_id for h in hits] for hits in expected[grouped]]
        for a, b in zip(got, expected[grouped]):
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
        assert calls[0] == 7  # the whole batch at once (grouped: then only the queries still short)
    with pytest.raises(SignatureError, match="query #1"):
        db.search_batch(np.stack([queries[0], np.zeros(16, np.float32)]), 5)


def test_groups_boxes_deletes_and_snapshots_old_and_new():
    rng = np.random.default_rng(6)
    db, vectors, group_of = clustered_groups(rng)
    hit = db.search(vectors["g1-1"], 1)[0]
    assert (hit.item_id, hit.group_id) == ("g1-1", "g1")
    np.testing.assert_array_equal(hit.box, np.array([1, 0, 6, 5], np.float32))
    assert db.search(vectors["g1-0"], 1)[0].box is None and db.search(vectors["solo-0"], 1)[0].group_id == ""
    size = db.group_size("g1")
    assert size == sum(g == "g1" for g in group_of.values()) and db.delete_groups(["g1", "nope"]) == size
    assert db.group_size("g1") == 0 and all(h.group != "g1" for h in db.search(vectors["g1-0"], 200))
    copy = DenseDatabase.from_state(db.state())
    q = rng.normal(size=16).astype(np.float32)
    assert copy.search(q, 10, True) == db.search(q, 10, True) and copy.group_size("g2") == db.group_size("g2")
    old = {k: v for k, v in db.state().items() if k not in ("groups", "group_names", "boxes", "attributes")}
    assert sorted(old) == ["config", "ids", "index", "labels", "metadata"]
    before_groups = DenseDatabase.from_state(old)
    hits = before_groups.search(q, 10, one_per_group=True)
    assert [h.item_id for h in hits] == [h.item_id for h in db.search(q, 10)]  # every item its own group
    assert all(h.group_id == "" and h.box is None for h in hits)
    assert before_groups.delete_groups([hits[0].item_id]) == 1 and hits[0].item_id not in before_groups
