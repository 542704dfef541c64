"""Index shard and router configuration."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from common.config import ConfigError, ServerConfig, Validated
from index_server.limits import ItemLimits

# How the router spreads a database over the shards (RouterConfig.layout).
Layout = Literal["item", "word"]


@dataclass(frozen=True)
class WindowSpec:
    """The windows that spatial re-ranking (BLCF) slides over a candidate's assignment map: heights
    are `fractions` of the map's rows and, independently, widths the same fractions of its columns
    (so aspect ratios vary), each rounded to whole cells (at least one); windows move `stride`
    cells at a time, and the whole map is always one of them (its score is the first stage's)."""

    fractions: tuple[float, ...] = (0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
    stride: int = 2

    def __post_init__(self) -> None:
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ConfigError(
                f"rerank_window_fractions {list(self.fractions)}: give at least one, each in (0, 1] "
                "(a window side as a share of the map's rows or columns)"
            )
        if self.stride < 1:
            raise ConfigError(f"rerank_window_stride {self.stride} is below 1 (cells a window moves by)")

    def sizes(self, cells: int) -> list[int]:
        """The distinct window sides, in cells, over a side of `cells` cells, smallest first."""
        sides = {min(cells, max(1, int(f * cells + 0.5))) for f in self.fractions}
        return sorted(sides | {cells})


def _check_item_limits(config: Validated) -> None:
    """The ranges of the ItemLimits fields, shared by IndexConfig and RouterConfig."""
    config._within("max_dense_dimension", 1, (1 << 20) - 1)
    config._within("max_bow_vocabulary", 1, 65535)
    config._at_least(1, "max_id_bytes", "max_items_per_stream", "max_blcf_cells")
    config._at_least(0, "max_thumbnail_bytes", "max_local_features_bytes")
    config._at_least(0, "max_metadata_keys", "max_metadata_key_bytes", "max_metadata_value_bytes", "max_metadata_bytes")


@dataclass
class IndexConfig(ServerConfig, ItemLimits):
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
    # grpc python ends a server's request iterator on a client's cancel as if the stream had ended,
    # and reports the cancel a moment later (tests/index_server/test_cancel.py): an Add waits this
    # long for that report before it commits. Costs each Add stream this much latency.
    cancel_settle_s: float = 0.005
    # Word-range sharding: this shard keeps words [V*index/count, V*(index+1)/count) of each
    # bag-of-words item; the router must list the shards in this order.
    word_shard_index: int = 0
    word_shard_count: int = 1
    # Dense (deep) databases, inner product on unit vectors (index_server/dense.py). "auto": exact
    # FAISS Flat below dense_exact_below items, then an approximate index learned from the
    # database's own vectors (PCA, IVF, PQ codes: ~100 bytes per item in memory) whose candidates
    # are re-ranked exactly with the float32 vectors, kept in a file on disk (under data_dir, or
    # the system's temporary directory for an in-memory shard). Any other FAISS factory string
    # overrides it: "Flat" keeps every database exact (4 bytes per dimension per item in memory);
    # e.g. "IVF1024,Flat" is that index alone, no re-rank.
    dense_factory: str = "auto"
    # An overriding factory that needs training searches exactly until this many vectors.
    dense_train_size: int = 50_000
    # "auto": the approximate index from this many items in a database on (built in the
    # background, searches answered meanwhile), rebuilt each time the database has grown 4x.
    dense_exact_below: int = 100_000
    # Candidates re-ranked exactly per query: max(dense_rerank_min, 4 * top_k). More: higher
    # recall, slower (bench/dense.py measures both).
    dense_rerank_min: int = 1000
    # IVF lists probed per query; 0 = one in 32 (at least 16).
    dense_nprobe: int = 0
    # A filtered search of an approximate database where at most this many items pass scores them
    # all exactly (reading ~4 bytes per dimension of each from disk); above, the IVF searches
    # through the filter.
    dense_filter_exact_rows: int = 20_000
    # Bag-of-words stop words: query words held by more than this share of a database's items are
    # skipped (faster, approximate: bench/index.py measures both); 1.0 keeps search exact.
    max_word_share: float = 1.0
    # BLCF spatial re-ranking (SearchRequest.spatial_rerank): the most items one search re-scores
    # by windows, and the windows (WindowSpec): side fractions of the map's rows and columns, and
    # the stride in cells. More fractions or a stride of 1: finer boxes, slower re-ranking.
    max_rerank_k: int = 200
    rerank_window_fractions: list[float] = field(default_factory=lambda: list(WindowSpec().fractions))
    rerank_window_stride: int = 2
    # Items per streamed SearchResponse message.
    chunk_size: int = 64
    # Partial scores per streamed PartialScoresResponse message (12 bytes each).
    partial_chunk: int = 65_536
    max_top_k: int = 1000
    # Queries per SearchBatch; more is RESOURCE_EXHAUSTED.
    max_batch: int = 256
    # The other replicas of this shard (host:port, comma-separated). When set, this replica first
    # copies the state of one of them (index_server.replication) and serves reads only after.
    peers: str = ""
    # How long to keep asking the peers for a copy before serving what this replica holds.
    catch_up_timeout_s: float = 60.0
    # Deadline of one copy (the whole stream, which may wait up to the source's replicate_settle_s).
    replicate_timeout_s: float = 3600.0
    # The source keeps sending writes for this long after its copy: at least the routers'
    # reconnection backoff (common.serving.channel_options: 1 s), so that writes a router could
    # not yet deliver to this returning replica are in the stream.
    catch_up_tail_s: float = 3.0
    # As a source: bytes per streamed part of a copy, and how long to wait for the writes in
    # flight when the copy began (an Add stream is committed when it ends: as long as a router's
    # add_timeout_s, so that one a returning replica missed is in its copy).
    replicate_chunk_bytes: int = 1 << 20
    replicate_settle_s: float = 600.0

    def peer_list(self) -> list[str]:
        return [peer.strip() for peer in self.peers.split(",") if peer.strip()]

    def windows(self) -> WindowSpec:
        return WindowSpec(tuple(self.rerank_window_fractions), self.rerank_window_stride)

    def _check(self) -> None:
        super()._check()
        _check_item_limits(self)
        self._at_least(1, "store_map_bytes", "snapshot_every", "word_shard_count", "dense_train_size")
        self._at_least(2, "dense_exact_below")
        self._at_least(1, "dense_rerank_min")
        self._at_least(0, "dense_nprobe", "dense_filter_exact_rows")
        self._at_least(1, "chunk_size", "partial_chunk", "max_top_k", "max_batch", "replicate_chunk_bytes")
        self._at_least(0, "max_rerank_k")
        self.windows()  # raises ConfigError naming what is wrong
        if not 0 <= self.word_shard_index < self.word_shard_count:
            raise ConfigError(
                f"word_shard_index {self.word_shard_index} is not in [0, word_shard_count {self.word_shard_count})"
            )
        self._within("max_word_share", 0, 1, low_open=True)
        self._at_least(0, "cancel_settle_s", "catch_up_timeout_s", "catch_up_tail_s", "replicate_settle_s")
        self._above(0, "replicate_timeout_s")


@dataclass
class RouterConfig(ServerConfig, ItemLimits):
    """Serves mps.index.v1.IndexService in front of several shards, merging their answers."""

    port: int = 50054
    # "item": each shard holds some items (by a hash of the id) and returns its top k;
    # "word": each shard holds a range of visual words of every item and returns partial scores
    # (the paper, section 3.2); dense databases are spread by item in both layouts.
    layout: Layout = "item"
    # One entry per shard, in order: the addresses of its replicas. Searches are spread over a
    # shard's replicas (gRPC round_robin over those whose health is SERVING: not one catching up);
    # Adds and Deletes go to every replica.
    shards: list[list[str]] = field(default_factory=lambda: [["127.0.0.1:50053"]])
    # Used when the caller sets no deadline.
    default_timeout_s: float = 10.0
    # Kept back from the caller's deadline so late shards still leave time for a degraded answer.
    reply_reserve_s: float = 0.05
    chunk_size: int = 64
    max_top_k: int = 1000
    # BLCF spatial re-ranking: the most items one search re-scores (as IndexConfig.max_rerank_k;
    # keep them equal, the shards refuse above theirs).
    max_rerank_k: int = 200
    # Queries per SearchBatch; more is RESOURCE_EXHAUSTED.
    max_batch: int = 256
    # The deadline of an Add stream's calls to the shards when the caller set none (an ingest
    # stream may run long; a Search gets default_timeout_s).
    add_timeout_s: float = 600.0
    # As IndexConfig.cancel_settle_s: a cancelled stream must not be committed on the shards.
    cancel_settle_s: float = 0.005
    # A write succeeds once this many replicas of each shard it goes to acknowledged it (all of
    # them, where a shard has fewer). A replica that missed it (down, or catching up) copies a
    # fellow replica when it returns (IndexConfig.peers); one that stays up after missing a write
    # (a timeout) lags until it restarts: raise this to refuse such writes (the caller re-sends).
    min_write_replicas: int = 1

    def _check(self) -> None:
        super()._check()
        _check_item_limits(self)
        if not self.shards or not all(self.shards):
            raise ConfigError("shards must list at least one shard, each with at least one address")
        for i, replicas in enumerate(self.shards):
            if len(replicas) > 1:  # one channel over them all (common.channels.channel_target)
                for j, address in enumerate(replicas):
                    _check_replica_address(f"shards[{i}][{j}]", address)
        self._above(0, "default_timeout_s", "add_timeout_s")
        self._at_least(0, "reply_reserve_s", "cancel_settle_s")
        self._at_least(1, "chunk_size", "max_top_k", "max_batch", "min_write_replicas")
        self._at_least(0, "max_rerank_k")


def _check_replica_address(name: str, address: str) -> None:
    """One of several replicas of a shard: an IP address and a port (gRPC's ipv4:/ipv6: target)."""
    host, _, port = address.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ConfigError(
            f"{name} {address!r}: several replicas must be given as IP:port "
            "(or as one dns:///name:port resolving to all of them)"
        ) from None
    if not port.isdigit():
        raise ConfigError(f"{name} {address!r} has no port")
