"""Index shard bootstrap: create_server(config) starts it; serve() runs it until SIGTERM."""

from __future__ import annotations

import grpc

from common.serving import ServiceBundle, serve_forever, start_bundle
from index_server.catalogue import Catalogue
from index_server.config import IndexConfig
from index_server.service import IndexService
from mps.index.v1 import index_pb2, index_pb2_grpc


def create_bundle(config: IndexConfig) -> ServiceBundle:
    service = IndexService(Catalogue(), config.chunk_size, config.max_top_k)
    return start_bundle(config, lambda s: index_pb2_grpc.add_IndexServiceServicer_to_server(service, s),
                        [index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name])


def create_server(config: IndexConfig) -> tuple[grpc.Server, int]:
    bundle = create_bundle(config)
    return bundle.server, bundle.port


def serve(config: IndexConfig) -> None:
    serve_forever("index_server", config, create_bundle)
