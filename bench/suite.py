"""The four services in this process, on free ports: what bench/search_latency.py measures (the
benchmarks do not import the tests, which have the same starter in tests/helpers.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from common.config import load_config
from detector_server.config import DetectorConfig
from detector_server.server import create_server as detector_server
from gateway.config import GatewayConfig
from gateway.server import create_server as gateway_server
from index_server.config import IndexConfig
from index_server.server import create_server as index_server
from signature_server.config import SignatureConfig
from signature_server.server import create_server as signature_server


@dataclass
class Suite:
    servers: dict[str, grpc.Server]
    addresses: dict[str, str]

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop(None)


def start_suite(**gateway_overrides: Any) -> Suite:
    """Detector, signature service, index (in memory) and a gateway over them."""
    servers: dict[str, grpc.Server] = {}
    ports: dict[str, int] = {}
    servers["detector"], ports["detector"] = detector_server(
        load_config(DetectorConfig, "detector", environ={}, port=0, intra_op_threads=2)
    )
    servers["signature"], ports["signature"] = signature_server(
        load_config(SignatureConfig, "signature", environ={}, port=0, intra_op_threads=2)
    )
    servers["index"], ports["index"] = index_server(load_config(IndexConfig, "index", environ={}, port=0, data_dir=""))
    addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    config = load_config(
        GatewayConfig,
        "gateway",
        environ={},
        port=0,
        detector_address=addresses["detector"],
        signature_address=addresses["signature"],
        index_address=addresses["index"],
        **gateway_overrides,
    )
    servers["gateway"], port = gateway_server(config)
    addresses["gateway"] = f"127.0.0.1:{port}"
    return Suite(servers, addresses)
