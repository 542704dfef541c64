import threading

import numpy as np
import pytest

from index_server.dense import DenseDatabase, SignatureError


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


@pytest.mark.parametrize("vector, message", [(np.zeros(3), "all zeros"), (np.ones(4), "3-d"),
                                             (np.array([np.nan, 1, 1]), "NaN")])
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
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)] + \
              [threading.Thread(target=reader) for _ in range(2)]
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
