"""Index shard and router bootstrap: create_server(config) starts one; serve() runs it until SIGTERM."""

from __future__ import annotations

from pathlib import Path

import grpc

from common.config import REPO_ROOT
from common.serving import ServiceBundle, serve_forever, start_bundle
from index_server.catalogue import Catalogue, DatabaseSettings
from index_server.config import IndexConfig, RouterConfig
from index_server.router import Router
from index_server.service import IndexService
from index_server.store import ShardStore
from mps.index.v1 import index_pb2, index_pb2_grpc

SERVICE_NAMES = [index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name]


def open_catalogue(config: IndexConfig) -> Catalogue:
    """The shard's databases, recovered from config.data_dir (relative to the repository root)."""
    store = None
    if config.data_dir:
        path = Path(config.data_dir)
        store = ShardStore(path if path.is_absolute() else REPO_ROOT / path, config.store_map_bytes)
    if not 0 <= config.word_shard_index < config.word_shard_count:
        raise ValueError(f"word_shard_index {config.word_shard_index} is not in [0, word_shard_count "
                         f"{config.word_shard_count})")
    if not 0.0 < config.max_word_share <= 1.0:
        raise ValueError(f"max_word_share {config.max_word_share} is not in (0, 1]")
    settings = DatabaseSettings(config.word_shard_index, config.word_shard_count, config.dense_factory,
                                config.dense_train_size, config.max_word_share)
    return Catalogue(settings, store, config.snapshot_every)


def create_bundle(config: IndexConfig) -> ServiceBundle:
    catalogue = open_catalogue(config)
    service = IndexService(catalogue, config.chunk_size, config.max_top_k, config.write_batch,
                           config.partial_chunk, config.max_batch)
    return start_bundle(config, lambda s: index_pb2_grpc.add_IndexServiceServicer_to_server(service, s),
                        SERVICE_NAMES, on_stop=catalogue.close)


def create_server(config: IndexConfig) -> tuple[grpc.Server, int]:
    bundle = create_bundle(config)
    return bundle.server, bundle.port


def serve(config: IndexConfig) -> None:
    serve_forever("index_server", config, create_bundle)


def create_router_bundle(config: RouterConfig) -> ServiceBundle:
    router = Router(config)
    return start_bundle(config, lambda s: index_pb2_grpc.add_IndexServiceServicer_to_server(router, s),
                        SERVICE_NAMES, on_stop=router.close)


def serve_router(config: RouterConfig) -> None:
    serve_forever("index_router", config, create_router_bundle)
