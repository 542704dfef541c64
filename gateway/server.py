"""Gateway bootstrap: create_server(config) starts it; serve() runs it until SIGTERM."""

from __future__ import annotations

import grpc

from common.security import Access, method_policy
from common.serving import ServiceBundle, serve_forever, start_bundle
from gateway.backends import Backends
from gateway.config import GatewayConfig
from gateway.service import VisualSearchService
from mps.gateway.v1 import gateway_pb2, gateway_pb2_grpc

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["VisualSearchService"]


def create_bundle(config: GatewayConfig) -> ServiceBundle:
    backends = Backends(
        config.detector_address,
        config.signature_address,
        config.index_address,
        config.index_routes,
        config,
        config.catalogue_refresh_s,
        config.index_ready_wait_s,
    )
    service = VisualSearchService(config, backends)
    return start_bundle(
        config,
        lambda s: gateway_pb2_grpc.add_VisualSearchServiceServicer_to_server(service, s),
        [SERVICE.full_name],
        on_stop=service.close,
        policy=method_policy(SERVICE, IndexProducts=Access.WRITE, DeleteProducts=Access.WRITE),
    )


def create_server(config: GatewayConfig) -> tuple[grpc.Server, int]:
    bundle = create_bundle(config)
    return bundle.server, bundle.port


def serve(config: GatewayConfig) -> None:
    serve_forever("gateway", config, create_bundle)
