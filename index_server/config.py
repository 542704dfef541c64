"""Index shard and router configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import ServerConfig


@dataclass
class IndexConfig(ServerConfig):
    """Serves one index shard over gRPC (mps.index.v1.IndexService)."""

    port: int = 50053
    # Where the write-ahead log and snapshots live (LMDB); "" keeps everything in memory only, so
    # nothing survives a restart (tests, throw-away shards). One process per directory.
    data_dir: str = "data/index"
    # Virtual size LMDB may grow to (sparse; only what is written takes disk).
    store_map_bytes: int = 1 << 38
    # A snapshot is written after this many logged operations (and at shutdown), so start-up
    # replays at most this many.
    snapshot_every: int = 100_000
    # Items per logged (fsynced) batch within one Add stream.
    write_batch: int = 256
    # Word-range sharding: this shard keeps words [V*index/count, V*(index+1)/count) of each
    # bag-of-words item; the router must list the shards in this order.
    word_shard_index: int = 0
    word_shard_count: int = 1
    # FAISS index factory string for dense (deep) databases, inner product on unit vectors:
    # "Flat" is exact; e.g. "IVF1024,Flat" trades recall for speed at millions of items.
    dense_factory: str = "Flat"
    # A factory that needs training searches exactly until this many vectors, then is trained.
    dense_train_size: int = 50_000
    # Bag-of-words stop words: query words held by more than this share of a database's items are
    # skipped (faster, approximate: bench/index.py measures both); 1.0 keeps search exact.
    max_word_share: float = 1.0
    # Items per streamed SearchResponse message.
    chunk_size: int = 64
    # Partial scores per streamed PartialScoresResponse message (12 bytes each).
    partial_chunk: int = 65_536
    max_top_k: int = 1000
    # Queries per SearchBatch; more is RESOURCE_EXHAUSTED.
    max_batch: int = 256


@dataclass
class RouterConfig(ServerConfig):
    """Serves mps.index.v1.IndexService in front of several shards, merging their answers."""

    port: int = 50054
    # "item": each shard holds some items (by a hash of the id) and returns its top k;
    # "word": each shard holds a range of visual words of every item and returns partial scores
    # (seed 000, 3.2); dense databases are spread by item in both layouts.
    layout: str = "item"
    # One entry per shard, in order: the addresses of its replicas. Searches are spread over a
    # shard's replicas (gRPC round_robin); Adds and Deletes go to every replica.
    shards: list[list[str]] = field(default_factory=lambda: [["127.0.0.1:50053"]])
    # Used when the caller sets no deadline.
    default_timeout_s: float = 10.0
    # Kept back from the caller's deadline so late shards still leave time for a degraded answer.
    reply_reserve_s: float = 0.05
    chunk_size: int = 64
    max_top_k: int = 1000
    # Queries per SearchBatch; more is RESOURCE_EXHAUSTED.
    max_batch: int = 256
    # Items forwarded per Add batch.
    write_batch: int = 256
