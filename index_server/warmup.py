"""Warm-up: every compiled path a shard or a router runs at write and search time runs once, on a
throwaway in-memory catalogue, before the server says SERVING.

The bag-of-words and BLCF indexes and the router's merge are numba kernels (index_server/inverted.py,
index_server/blcf.py, index_server/merge.py, the codec's common/bow_codec.py), compiled (or loaded from numba's cache)
at their first call, per argument types: without this, the first bag-of-words search after a
start took ~1 s where later ones take 4-20 ms. numba specialises on read-only arrays apart, so the
paths of an index restored from a snapshot (its arrays are views of the stored bytes) run here too.
FAISS sets up its threads at its first search: a tiny dense search does that.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from common.blcf_codec import AssignmentMap
from common.bow_codec import BagOfWords, encode
from common.proto_convert import dense_to_proto
from index_server.blcf import BlcfIndex
from index_server.catalogue import Catalogue, DatabaseSettings
from index_server.convert import item_of, looked_up_item, scored_item, signature_of, signature_value
from index_server.dense import DenseDatabase
from index_server.domain import Hit, Rerank, item_key
from index_server.inverted import BowIndex
from index_server.limits import ItemLimits
from index_server.merge import best_of_groups, merge_top_k, sum_partials
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2

log = logging.getLogger(__name__)

VOCABULARY = 64
CODEBOOK = 0x5741524D  # any: the throwaway databases only ever hold these bags
DIMENSION = 8
ITEMS = 12
BOW_DATABASE = "warmup.bow"
DENSE_DATABASE = "warmup.deep"
BLCF_DATABASE = "warmup.blcf"


def _bags(rng: np.random.Generator, count: int) -> list[BagOfWords]:
    """`count` bags spread over the whole vocabulary (so every word-range shard holds some)."""
    bags = []
    for _ in range(count):
        words = np.sort(rng.choice(VOCABULARY, size=16, replace=False)).astype(np.int32)
        bags.append(BagOfWords(words, rng.integers(1, 5, size=16).astype(np.uint32), VOCABULARY, CODEBOOK))
    return bags


def _maps(rng: np.random.Generator, count: int) -> list[AssignmentMap]:
    """`count` assignment maps of several shapes, words over the whole vocabulary, some repeated
    (so both of the window kernel's paths run)."""
    maps = []
    for i in range(count):
        rows, columns = 4 + i % 3, 5 + i % 2
        words = rng.integers(0, VOCABULARY, (rows, columns)).astype(np.uint16)
        words[0, :2] = words[1, 0]
        maps.append(AssignmentMap(words, VOCABULARY, CODEBOOK, 32 * columns, 32 * rows))
    return maps


def _bow_signature(bag: BagOfWords) -> common_pb2.Signature:
    return common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=encode(bag))


def _requests(rng: np.random.Generator) -> list[index_pb2.AddRequest]:
    """Add requests of both kinds, as a client sends them: groups of two items, some with a box."""
    requests = []
    for i, bag in enumerate(_bags(rng, ITEMS)):
        bow = index_pb2.AddRequest(
            database=BOW_DATABASE,
            item_id=f"bow-{i}",
            group_id=f"group-{i // 2}",
            signature=_bow_signature(bag),
            metadata={"n": str(i)},
        )
        if i % 3 == 0:
            bow.box.CopyFrom(common_pb2.Box(x_min=1, y_min=2, x_max=30, y_max=40))
        dense = index_pb2.AddRequest(
            database=DENSE_DATABASE,
            item_id=f"deep-{i}",
            group_id=f"group-{i // 2}",
            signature=dense_to_proto(rng.standard_normal(DIMENSION).astype(np.float32)),
        )
        requests += [bow, dense]
    for i, amap in enumerate(_maps(rng, ITEMS)):
        blcf = index_pb2.AddRequest(
            database=BLCF_DATABASE, item_id=f"blcf-{i}", group_id=f"group-{i // 2}", signature=signature_of(amap)
        )
        if i % 3 == 0:
            blcf.box.CopyFrom(common_pb2.Box(x_min=1, y_min=2, x_max=30, y_max=40))
        requests.append(blcf)
    return requests


def _search_bow(index: BowIndex, queries: list[common_pb2.Signature]) -> list[Hit]:
    """Every read of a bag-of-words database, as the servicer runs it (from the query's bytes)
    -> the first query's hits."""
    first: list[Hit] = []
    for query in queries:
        bag = signature_value(query)
        assert isinstance(bag, BagOfWords)
        for one_per_group in (False, True):
            hits = index.search(bag, 5, one_per_group)
            [scored_item(hit) for hit in hits]
            first = first or hits
        index.search_batch([bag], 3, one_per_group=True)
        keys, _ = index.partial_scores_by_key(bag)
        index.partial_scores_with_groups(bag)
        for key, hit in index.lookup(keys).items():
            looked_up_item(key, hit)
        index.document_frequency()
    return first


def _search_blcf(index: BlcfIndex, queries: list[common_pb2.Signature]) -> list[Hit]:
    """Every read of a BLCF database, as the servicer runs it (from the query's bytes): the first
    stage, spatial re-ranking with and without query expansion, from a router's candidates, and
    partial scores -> the first query's hits."""
    first: list[Hit] = []
    for query in queries:
        amap = signature_value(query)
        assert isinstance(amap, AssignmentMap)
        for one_per_group in (False, True):
            for rerank in (None, Rerank(3), Rerank(3, 2)):
                hits = index.search(amap, 5, one_per_group, rerank=rerank)
                [scored_item(hit) for hit in hits]
                first = first or hits
        index.search_batch([amap], 3, rerank=Rerank(2, 1))
        keys, sums = index.partial_scores_by_key(amap)
        index.search(amap, 3, rerank=Rerank(3, 1, (keys[:3], sums[:3])))
        index.partial_scores_with_groups(amap)
        for key, hit in index.lookup(keys).items():
            looked_up_item(key, hit)
        index.document_frequency()
    return first


def _search_dense(database: DenseDatabase, rng: np.random.Generator) -> None:
    queries = []
    for _ in range(2):
        vector = signature_value(dense_to_proto(rng.standard_normal(DIMENSION).astype(np.float32)))
        assert isinstance(vector, np.ndarray)
        queries.append(vector)
    for one_per_group in (False, True):
        [scored_item(hit) for hit in database.search(queries[0], 3, one_per_group)]
        database.search_batch(queries, 3, one_per_group)


def warm_up_merge() -> None:
    """The router's reads: a query's bag decoded, and the merge of shard answers
    (index_server.merge) with the dtypes the shards' answers decode to."""
    rng = np.random.default_rng(0)
    signature_value(_bow_signature(_bags(rng, 1)[0]))
    keys = [np.frombuffer(rng.integers(0, 2**63, 6, dtype=np.uint64).astype("<u8").tobytes(), "<u8") for _ in range(2)]
    sums = [np.frombuffer(rng.random(6, dtype=np.float32).astype("<f4").tobytes(), "<f4") for _ in range(2)]
    groups = [np.frombuffer((k % np.uint64(3)).astype("<u8").tobytes(), "<u8") for k in keys]
    sum_partials(keys, sums)
    _, totals, total_groups = sum_partials(keys, sums, groups)
    best_of_groups(totals, total_groups, 2)
    best_of_groups(totals, total_groups, 100)


def warm_up(settings: DatabaseSettings, limits: ItemLimits = ItemLimits()) -> float:
    """Runs every compiled path of a shard built with `settings` on a throwaway in-memory catalogue
    (nothing of it is stored, logged or served) -> the seconds it took."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    catalogue = Catalogue(settings, store=None, limits=limits)
    # Writes as the servicer makes them: messages -> items (decoding each bag), one stream.
    stream = catalogue.stream()
    for request in _requests(rng):
        stream.stage(item_of(request, limits))
    catalogue.commit(stream)
    _, bow = catalogue.get(BOW_DATABASE)
    _, dense = catalogue.get(DENSE_DATABASE)
    _, blcf = catalogue.get(BLCF_DATABASE)
    assert isinstance(bow, BowIndex) and isinstance(dense, DenseDatabase) and isinstance(blcf, BlcfIndex)
    queries = [_bow_signature(bag) for bag in _bags(rng, 2)]
    _search_bow(bow, queries)  # postings in the append pool only
    bow.merge()
    _search_bow(bow, queries)  # in the merged base
    # Restored from a snapshot: read-only base arrays, then adds and merges over them.
    restored = BowIndex.from_state(bow.state())
    _search_bow(restored, queries)
    for i, bag in enumerate(_bags(rng, 2)):
        restored.add(f"more-{i}", bag, {}, group_id="group-0")
    restored.merge()
    _search_bow(restored, queries)
    restored.delete("bow-0")
    restored.delete_groups(["group-1"])
    restored.compact()
    _search_bow(restored, queries)
    catalogue.delete(BOW_DATABASE, ["bow-2"], ["group-2"])
    blcf_queries = [signature_of(amap) for amap in _maps(rng, 2)]
    _search_blcf(blcf, blcf_queries)  # postings in the append pool only
    blcf.merge()
    _search_blcf(blcf, blcf_queries)
    restored_blcf = BlcfIndex.from_state(blcf.state())
    _search_blcf(restored_blcf, blcf_queries)
    for i, amap in enumerate(_maps(rng, 2)):
        restored_blcf.add(f"more-{i}", amap, {}, group_id="group-0")
    restored_blcf.delete("blcf-0")
    restored_blcf.delete_groups(["group-1"])
    restored_blcf.compact()
    _search_blcf(restored_blcf, blcf_queries)
    _search_dense(dense, rng)
    DenseDatabase.from_state(dense.state())
    merge_top_k([_search_bow(bow, queries)] * 2, 3, one_per_group=True)
    warm_up_merge()
    item_key("warm")
    catalogue.close(snapshot=False)
    return time.perf_counter() - start


_warmed = False
_warming = threading.Lock()


def warm_up_once(settings: DatabaseSettings, limits: ItemLimits = ItemLimits()) -> float | None:
    """warm_up the first time in this process -> its seconds; None afterwards (compiled code and
    FAISS's threads belong to the process: a second shard in it, as tests start, finds them ready)."""
    global _warmed
    with _warming:
        if _warmed:
            return None
        seconds = warm_up(settings, limits)
        _warmed = True
        return seconds
