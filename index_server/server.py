"""Index shard and router bootstrap: create_server(config) starts one; serve() runs it until SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from common.channels import open_channel
from common.config import REPO_ROOT
from common.security import Access, method_policy
from common.serving import ServiceBundle, serve_forever, start_bundle
from common.telemetry import GAUGE_SOURCES
from index_server.catalogue import Catalogue, DatabaseSettings
from index_server.config import IndexConfig, RouterConfig
from index_server.dense import DenseTuning
from index_server.health_watch import ReplicaWatch
from index_server.limits import limits_of
from index_server.replication import ReplicaStatus, start_catch_up
from index_server.router import Router
from index_server.service import IndexService
from index_server.store import ShardStore
from index_server.warmup import warm_up_merge, warm_up_once
from mps.index.v1 import index_pb2, index_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = index_pb2.DESCRIPTOR.services_by_name["IndexService"]
SERVICE_NAMES = [SERVICE.full_name]
# Writes come only from the suite's own services (the gateway, a router): the internal credential.
# Replicate copies a replica's whole state to a fellow replica: internal too.
POLICY = method_policy(
    SERVICE, Add=Access.INTERNAL, Delete=Access.INTERNAL, UpdateGroups=Access.INTERNAL, Replicate=Access.INTERNAL
)


def open_catalogue(config: IndexConfig) -> Catalogue:
    """The shard's databases, recovered from config.data_dir (relative to the repository root).
    The settings' ranges (word shard, stop-word share) were checked when the config was built."""
    store = None
    if config.data_dir:
        path = Path(config.data_dir)
        store = ShardStore(path if path.is_absolute() else REPO_ROOT / path, config.store_map_bytes)
    settings = DatabaseSettings(
        config.word_shard_index,
        config.word_shard_count,
        config.dense_factory,
        config.dense_train_size,
        config.max_word_share,
        DenseTuning(
            exact_below=config.dense_exact_below,
            rerank_min=config.dense_rerank_min,
            nprobe=config.dense_nprobe,
            filter_exact_rows=config.dense_filter_exact_rows,
            rows_dir=str(store.path / "dense-rows") if store is not None else "",
        ),
        config.windows(),
    )
    return Catalogue(settings, store, config.snapshot_every, limits_of(config))


def create_bundle(config: IndexConfig) -> ServiceBundle:
    catalogue = open_catalogue(config)
    # Before the health check says SERVING: no user's first search compiles anything.
    seconds = warm_up_once(catalogue.settings, limits_of(config))
    if seconds is not None:
        log.info("warm-up took %.0f ms", 1000 * seconds)
    peers = config.peer_list()
    # With peers, this replica catches up before it serves reads; writes are deferred from the start.
    replica = ReplicaStatus(catching_up=bool(peers), source=peers[0] if peers else "")
    if peers:
        catalogue.begin_deferral()
    service = IndexService(
        catalogue,
        config.chunk_size,
        config.max_top_k,
        config.partial_chunk,
        config.max_batch,
        replica=replica,
        replicate_chunk_bytes=config.replicate_chunk_bytes,
        replicate_settle_s=config.replicate_settle_s,
        max_message_bytes=config.max_message_bytes,
        cancel_settle_s=config.cancel_settle_s,
        max_rerank_k=config.max_rerank_k,
    )
    source = f"index-items-{id(catalogue)}"
    GAUGE_SOURCES.add(
        source,
        "mps_index_items",
        "Items held per database",
        ["database"],
        lambda: [([d.name], d.items) for d in catalogue.stats()],
    )

    def stop() -> None:
        GAUGE_SOURCES.remove(source)
        catalogue.close()

    bundle = start_bundle(
        config,
        lambda s: index_pb2_grpc.add_IndexServiceServicer_to_server(service, s),
        SERVICE_NAMES,
        on_stop=stop,
        policy=POLICY,
    )
    if peers:
        _catch_up_in_background(config, bundle, catalogue, replica, peers)
    return bundle


def _catch_up_in_background(
    config: IndexConfig, bundle: ServiceBundle, catalogue: Catalogue, replica: ReplicaStatus, peers: list[str]
) -> None:
    """Health NOT_SERVING (routers read the other replicas; the service refuses reads anyway)
    until this replica has copied a peer (index_server.replication), then SERVING."""
    for name in SERVICE_NAMES + [""]:
        bundle.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    channels: dict[str, grpc.Channel] = {}

    def stub_for(peer: str) -> index_pb2_grpc.IndexServiceStub:
        if peer not in channels:
            channels[peer] = open_channel(peer, config)  # TLS and the internal credential, as configured
        return index_pb2_grpc.IndexServiceStub(channels[peer])

    def done() -> None:
        for channel in channels.values():
            channel.close()
        for name in SERVICE_NAMES + [""]:  # ignored once shutting down
            bundle.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    request = index_pb2.ReplicateRequest(
        word_shard_index=config.word_shard_index,
        word_shard_count=config.word_shard_count,
        replica=f"{config.host}:{bundle.port}",
        min_tail_ms=int(config.catch_up_tail_s * 1000),
    )
    start_catch_up(
        catalogue, replica, peers, stub_for, request, config.catch_up_timeout_s, config.replicate_timeout_s, done
    )


def create_server(config: IndexConfig) -> tuple[grpc.Server, int]:
    bundle = create_bundle(config)
    return bundle.server, bundle.port


def serve(config: IndexConfig) -> None:
    serve_forever("index_server", config, create_bundle)


def create_router_bundle(config: RouterConfig) -> ServiceBundle:
    warm_up_merge()
    router = Router(config)
    watch = ReplicaWatch(config.shards, lambda address: open_channel(address, config))

    def stop() -> None:
        watch.close()
        router.close()

    return start_bundle(
        config,
        lambda s: index_pb2_grpc.add_IndexServiceServicer_to_server(router, s),
        SERVICE_NAMES,
        on_stop=stop,
        policy=POLICY,
        name="router",
    )


def serve_router(config: RouterConfig) -> None:
    serve_forever("index_router", config, create_router_bundle)
