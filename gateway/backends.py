"""Channels and stubs to the services behind the gateway, with per-category index routing."""

from __future__ import annotations

import grpc

from common.serving import channel_options
from mps.detector.v1 import detector_pb2_grpc
from mps.index.v1 import index_pb2_grpc
from mps.signature.v1 import signature_pb2_grpc


class Backends:
    def __init__(self, detector_address: str, signature_address: str, index_address: str,
                 index_routes: dict[str, str], max_message_bytes: int):
        options = channel_options(max_message_bytes)
        self._channels: dict[str, grpc.Channel] = {}

        def channel(address: str) -> grpc.Channel:
            if address not in self._channels:
                self._channels[address] = grpc.insecure_channel(address, options=options)
            return self._channels[address]

        self.detector = detector_pb2_grpc.DetectorServiceStub(channel(detector_address))
        self.signature = signature_pb2_grpc.SignatureServiceStub(channel(signature_address))
        self._default_index = index_pb2_grpc.IndexServiceStub(channel(index_address))
        self._index_routes = {category: index_pb2_grpc.IndexServiceStub(channel(address))
                              for category, address in index_routes.items()}

    def index_for(self, category: str) -> index_pb2_grpc.IndexServiceStub:
        return self._index_routes.get(category, self._default_index)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
