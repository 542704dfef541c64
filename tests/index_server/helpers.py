"""Test helpers for the index service: shard processes and in-process clusters on loopback, signature
builders, and brute-force references (grouped search included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from common import blcf_codec
from common.blcf_codec import EMPTY, AssignmentMap
from common.bow_codec import BagOfWords, encode
from common.config import REPO_ROOT, load_config
from common.proto_convert import box_to_proto, dense_to_proto
from index_server.config import IndexConfig, RouterConfig, WindowSpec
from index_server.domain import Item
from index_server.server import create_bundle, create_router_bundle
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.helpers import chi2, wait_serving

# -- processes and servers ------------------------------------------------------------------------


def start_shard(data_dir: Path, port: int, *flags: str) -> subprocess.Popen:
    """A shard process (`python -m index_server`) on `port`, serving when this returns."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "index_server",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "WARNING",
            *flags,
        ],
        cwd=REPO_ROOT,
    )
    wait_serving(f"127.0.0.1:{port}", process)
    return process


class Cluster:
    """Shard servers (in this process) and a router over them; `stubs` talk to each directly."""

    def __init__(self, layout: str, shards: int, replicas: int = 1, **router: Any):
        self.bundles, addresses = [], []
        for number in range(shards):
            replica_addresses = []
            for _ in range(replicas):
                config = load_config(
                    IndexConfig,
                    "index",
                    environ={},
                    port=0,
                    data_dir="",
                    word_shard_index=number if layout == "word" else 0,
                    word_shard_count=shards if layout == "word" else 1,
                )
                bundle = create_bundle(config)
                self.bundles.append(bundle)
                replica_addresses.append(f"127.0.0.1:{bundle.port}")
            addresses.append(replica_addresses)
        self.addresses = addresses
        self.router = create_router_bundle(
            load_config(RouterConfig, "index_router", environ={}, port=0, layout=layout, shards=addresses, **router)
        )
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{self.router.port}")]
        self.stub = index_pb2_grpc.IndexServiceStub(self.channels[0])

    def direct(self, address: str) -> index_pb2_grpc.IndexServiceStub:
        self.channels.append(grpc.insecure_channel(address))
        return index_pb2_grpc.IndexServiceStub(self.channels[-1])

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.router.server.stop(None)
        if self.router.on_stop is not None:
            self.router.on_stop()
        for bundle in self.bundles:
            bundle.server.stop(None)


# -- signatures and requests -----------------------------------------------------------------------


def bow(bag: BagOfWords) -> common_pb2.Signature:
    return common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=encode(bag))


def blcf(amap: AssignmentMap) -> common_pb2.Signature:
    return common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BLCF, blcf=blcf_codec.encode(amap))


def random_maps(
    rng: np.random.Generator,
    count: int,
    vocabulary: int,
    fingerprint: int = 1,
    largest: int = 14,
    empty: float = 0.0,
) -> list[AssignmentMap]:
    """Assignment maps of 3..largest rows and columns: Zipf-distributed words (a few common, most
    rare, as visual words are), a third of the cells repeating their left neighbour's word (as
    neighbouring cells of one surface do), and a share `empty` of cells without a word."""
    maps = []
    for _ in range(count):
        rows, columns = (int(v) for v in rng.integers(3, largest + 1, 2))
        words = rng.zipf(1.3, (rows, columns)) % vocabulary
        words = np.where(rng.random((rows, columns)) < 0.33, np.roll(words, 1, axis=1), words)
        if empty:
            holes = rng.random((rows, columns)) < empty
            holes[0, 0] = False  # at least one word
            words = np.where(holes, EMPTY, words)
        maps.append(AssignmentMap(words.astype(np.uint16), vocabulary, fingerprint, 32 * columns, 24 * rows))
    return maps


def planted(
    rng: np.random.Generator,
    instance: AssignmentMap,
    vocabulary: int,
    shape: tuple[int, int] = (14, 14),
    at: tuple[int, int] = (8, 8),
    fingerprint: int = 1,
) -> AssignmentMap:
    """A map of `shape` cells of random background words with `instance`'s cells pasted at cell
    `at` (row, column): an instance filling a small part of a catalogue photo."""
    words = rng.integers(0, vocabulary, shape).astype(np.uint16)
    r, c = at
    words[r : r + instance.rows, c : c + instance.columns] = instance.words
    return AssignmentMap(words, vocabulary, fingerprint, 32 * shape[1], 32 * shape[0])


def random_bags(
    rng: np.random.Generator, count: int, vocabulary: int, codebook: int = 1, longest: int = 200
) -> list[BagOfWords]:
    """Zipf-distributed words, as real visual words are: a few common, most rare."""
    return [
        BagOfWords.from_words(rng.zipf(1.3, rng.integers(5, longest)) % vocabulary, vocabulary, codebook)
        for _ in range(count)
    ]


def add_request(
    item_id: str,
    database: str,
    value: BagOfWords | np.ndarray,
    group_id: str = "",
    box: np.ndarray | None = None,
    **metadata: str,
) -> index_pb2.AddRequest:
    signature = bow(value) if isinstance(value, BagOfWords) else dense_to_proto(np.asarray(value, np.float32))
    request = index_pb2.AddRequest(
        item_id=item_id, database=database, signature=signature, metadata=metadata, group_id=group_id
    )
    if box is not None:
        request.box.CopyFrom(box_to_proto(box))
    return request


def item(
    item_id: str,
    database: str,
    value: BagOfWords | np.ndarray,
    group_id: str = "",
    box: np.ndarray | None = None,
    **metadata: str,
) -> Item:
    """The Item that add_request(...) with the same arguments adds, made directly (unchecked, so a
    test may hand the catalogue an item the servicer would refuse)."""
    if not isinstance(value, BagOfWords):
        value = np.asarray(value, np.float32)
    return Item(database, item_id, value, metadata, group_id, None if box is None else np.asarray(box, np.float32))


def search(
    stub: index_pb2_grpc.IndexServiceStub,
    database: str,
    signature: common_pb2.Signature,
    top_k: int = 10,
    one_per_group: bool = False,
    timeout: float = 10,
) -> tuple[index_pb2.SearchResponse, list[index_pb2.ScoredItem]]:
    """(first message, every item) of a streamed Search."""
    chunks = list(
        stub.Search(
            index_pb2.SearchRequest(database=database, signature=signature, top_k=top_k, one_per_group=one_per_group),
            timeout=timeout,
        )
    )
    return chunks[0], [i for c in chunks for i in c.items]


def search_batch(
    stub: index_pb2_grpc.IndexServiceStub,
    database: str,
    signatures: list[common_pb2.Signature],
    top_k: int = 10,
    one_per_group: bool = False,
    timeout: float = 10,
) -> index_pb2.SearchBatchResponse:
    return stub.SearchBatch(
        index_pb2.SearchBatchRequest(
            database=database, signatures=signatures, top_k=top_k, one_per_group=one_per_group
        ),
        timeout=timeout,
    )


def as_tuples(items: list[index_pb2.ScoredItem]) -> list[tuple]:
    """Items as comparable tuples: (id, score rounded to float32 noise, metadata, group, box or None)."""
    return [
        (
            i.item_id,
            round(i.score, 5),
            dict(i.metadata),
            i.group_id,
            (i.box.x_min, i.box.y_min, i.box.x_max, i.box.y_max) if i.HasField("box") else None,
        )
        for i in items
    ]


# -- brute-force references ------------------------------------------------------------------------


def bow_scores(query: BagOfWords, bags: dict[str, BagOfWords]) -> dict[str, float]:
    """Score (1 - chi2 / 2) of every item sharing a word with the query, by brute force."""
    scores = {item_id: 1.0 - chi2(query, bag) / 2.0 for item_id, bag in bags.items()}
    return {item_id: s for item_id, s in scores.items() if s > 0}


def tfidf_idf(maps: list[AssignmentMap], vocabulary: int) -> np.ndarray:
    """(V,) float64 idf_w = log(1 + N / df_w) over these maps (the live items), 0 where df_w = 0."""
    df = np.zeros(vocabulary, np.int64)
    for amap in maps:
        df[np.unique(amap.words[amap.words != EMPTY])] += 1
    return np.where(df > 0, np.log1p(len(maps) / np.maximum(df, 1)), 0.0)


def tfidf_vector(words: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """(V,) float64 tf-idf vector of an array of cells' words (EMPTY cells left out)."""
    present = np.asarray(words).reshape(-1)
    present = present[present != EMPTY]
    return np.bincount(present, minlength=len(idf)) * idf


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norms if norms > 0 else 0.0


def blcf_scores(query: AssignmentMap, maps: dict[str, AssignmentMap]) -> dict[str, float]:
    """tf-idf cosine of every item with a positive score, the items being the whole database."""
    idf = tfidf_idf(list(maps.values()), query.vocabulary)
    q = tfidf_vector(query.words, idf)
    scores = {item_id: cosine(q, tfidf_vector(amap.words, idf)) for item_id, amap in maps.items()}
    return {item_id: s for item_id, s in scores.items() if s > 0}


def window_scores(
    query: np.ndarray, amap: AssignmentMap, idf: np.ndarray, windows: WindowSpec | None = None
) -> list[tuple[float, tuple[int, int, int, int]]]:
    """(cosine with the (V,) query vector, (row0, column0, row1, column1)) of every window of the
    map, by brute force, in the order the index tries them (heights, widths, rows, columns)."""
    windows = windows or WindowSpec()
    out = []
    for height in windows.sizes(amap.rows):
        for width in windows.sizes(amap.columns):
            ys = sorted({*range(0, amap.rows - height + 1, windows.stride), amap.rows - height})
            xs = sorted({*range(0, amap.columns - width + 1, windows.stride), amap.columns - width})
            for y in ys:
                for x in xs:
                    vector = tfidf_vector(amap.words[y : y + height, x : x + width], idf)
                    out.append((cosine(query, vector), (y, x, y + height, x + width)))
    return out


def dense_scores(query: np.ndarray, vectors: dict[str, np.ndarray]) -> dict[str, float]:
    """Cosine similarity of every item, by brute force in float64."""
    q = np.asarray(query, np.float64) / np.linalg.norm(query)
    return {item_id: float(np.dot(q, v) / np.linalg.norm(v)) for item_id, v in vectors.items()}


def grouped_reference(scores: dict[str, float], group_of: dict[str, str], top_k: int) -> list[tuple[str, float]]:
    """(id, score) of the best item of each of the top_k best groups, best first, ties by id: every
    group's best found by scanning all its items (an item without a group is its own group)."""
    best: dict[str, tuple[float, str]] = {}
    for item_id, score in scores.items():
        group = group_of.get(item_id) or item_id
        if group not in best or (-score, item_id) < (-best[group][0], best[group][1]):
            best[group] = (score, item_id)
    ranked = sorted(best.values(), key=lambda t: (-t[0], t[1]))[:top_k]
    return [(item_id, score) for score, item_id in ranked]


def ungrouped_reference(scores: dict[str, float], top_k: int) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda t: (-t[1], t[0]))[:top_k]
