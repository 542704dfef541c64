"""Channels from one service of the suite to another: TLS from config, the internal credential and
the request id on every call, prompt reconnection (common.serving.channel_options); and, for a
service run as several replicas behind one address, round_robin over every address the target
resolves to, client-side health checking and retries of idempotent calls (balanced_channel)."""

from __future__ import annotations

import ipaddress
import json
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


def split_addresses(addresses: str | Sequence[str]) -> list[str]:
    """ "a:1, b:2" or ["a:1", "b:2"] -> ["a:1", "b:2"] (blanks dropped)."""
    parts = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    return [part.strip() for part in parts if part.strip()]


def channel_target(addresses: str | Sequence[str]) -> str:
    """One gRPC target over every replica of a service, for round_robin: a single address
    (`host:port`, `dns:///name:port`, any target gRPC resolves) as it is; several `IP:port`
    (comma-separated, or a list) as gRPC's `ipv4:a,b` or `ipv6:[a]:p,[b]:p` target. Several
    replicas under a host name are one `dns:///name:port` resolving to all of them: gRPC has no
    target listing several names. Raises ValueError saying what to write instead."""
    listed = split_addresses(addresses)
    if not listed:
        raise ValueError("no address given: write host:port, dns:///name:port, or several IP:port separated by commas")
    if len(listed) == 1:
        return listed[0]
    versions = set()
    for address in listed:
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"replica address {address!r} has no port")
        try:
            versions.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(
                f"replica address {address!r}: several replicas must be given as IP:port "
                "(or as one dns:///name:port resolving to all of them)"
            ) from None
    if len(versions) > 1:
        raise ValueError(
            f"replica addresses {listed} mix IPv4 and IPv6: gRPC takes one family per target "
            "(use one dns:///name:port resolving to all of them)"
        )
    return ("ipv4:" if versions == {4} else "ipv6:") + ",".join(listed)


# Retries of an idempotent call refused UNAVAILABLE (a replica killed or draining): the next pick of
# round_robin is another replica, so a few attempts a few milliseconds apart ride over a lost one.
RETRY_ATTEMPTS = 4
RETRY_INITIAL_BACKOFF_S = 0.02
RETRY_MAX_BACKOFF_S = 0.2


def service_config(
    service: str, idempotent: Sequence[str], attempts: int = RETRY_ATTEMPTS, health: bool = True
) -> dict[str, Any]:
    """gRPC's service config for a channel to `service` (its full name, e.g.
    "mps.detector.v1.DetectorService"): round_robin over every resolved address; with `health`,
    only replicas whose grpc.health.v1 status for `service` is SERVING get calls (one loading its
    models, catching up or draining gets none); the `idempotent` methods are retried on
    UNAVAILABLE, at most `attempts` tries in all (gRPC caps it at 5). Methods that change state
    (Add, Delete, IndexProducts, LoadModel, UnloadModel) must not be listed: a write whose answer
    was lost may have been applied."""
    if not 2 <= attempts <= 5:
        raise ValueError(f"attempts {attempts}: gRPC retries take 2 to 5 attempts")
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health:
        config["healthCheckConfig"] = {"serviceName": service}
    if idempotent:
        config["methodConfig"] = [
            {
                "name": [{"service": service, "method": method} for method in idempotent],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": f"{RETRY_INITIAL_BACKOFF_S}s",
                    "maxBackoff": f"{RETRY_MAX_BACKOFF_S}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config


def balanced_options(
    service: str, idempotent: Sequence[str], max_message_bytes: int, attempts: int = RETRY_ATTEMPTS, health: bool = True
) -> list[tuple[str, Any]]:
    """Channel options for service_config, with retries on. gRPC keeps a call's request to send
    it again only up to grpc.per_rpc_retry_buffer_size (256 KiB by default), and never retries a
    larger one: a photo for the detector or a batch of crops for the signature service is larger,
    so the buffer is raised to the largest message the channel sends."""
    return [
        ("grpc.service_config", json.dumps(service_config(service, idempotent, attempts, health))),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
    ]


def balanced_channel(
    addresses: str | Sequence[str],
    config: ServerConfig,
    service: str,
    idempotent: Sequence[str],
    attempts: int = RETRY_ATTEMPTS,
    health: bool = True,
) -> grpc.Channel:
    """open_channel over every replica of `service` at `addresses` (see channel_target), with
    round_robin, health checking and retries of the idempotent methods (service_config)."""
    return open_channel(
        channel_target(addresses),
        config,
        balanced_options(service, idempotent, config.max_message_bytes, attempts, health),
    )
