"""Channels from one service of the suite to another: TLS from config, the internal credential and
the request id on every call, prompt reconnection (common.serving.channel_options)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from common.config import ServerConfig
from common.security import channel_credentials
from common.serving import channel_options
from common.telemetry import REQUEST_ID_KEY, current_request_id


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class OutgoingMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` (when there is one) and the current request id."""

    def __init__(self, token: str = "", request_id: Callable[[], str] = current_request_id):
        self._auth = [("authorization", f"Bearer {token}")] if token else []
        self._request_id = request_id

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [(k, v) for k, v in (details.metadata or ()) if k not in ("authorization", REQUEST_ID_KEY)]
        request_id = self._request_id()
        extra = self._auth + ([(REQUEST_ID_KEY, request_id)] if request_id else [])
        return _Details(details, metadata + extra)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def open_channel(target: str, config: ServerConfig, extra_options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to another service of the suite, as `config` (the calling service's) says."""
    options = channel_options(config.max_message_bytes) + list(extra_options)
    credentials = channel_credentials(config)
    channel = (
        grpc.secure_channel(target, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(target, options=options)
    )
    return grpc.intercept_channel(channel, OutgoingMetadata(config.internal_token))
