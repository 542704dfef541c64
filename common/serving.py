"""Server bootstrap shared by every service: options, interceptors, TLS, health, reflection,
metrics, graceful SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.config import ServerConfig
from common.interceptors import LayeredInterceptor
from common.security import Access, ClientLimits, Gatekeeper, server_credentials
from common.telemetry import setup_logging, start_metrics_server, telemetry_layer

log = logging.getLogger(__name__)


def channel_options(
    max_message_bytes: int,
    max_reconnect_backoff_ms: int = 1000,
    initial_reconnect_backoff_ms: int = 100,
    min_connect_timeout_ms: int = 20_000,
) -> list[tuple[str, int]]:
    """Message limits, and prompt reconnection: gRPC's default backoff (1 s growing by 1.6x up to
    120 s) keeps a channel failing for many seconds after its server is back (17 s was measured
    at the gateway); capped at `max_reconnect_backoff_ms`, a restarted server is reached within
    about that long. gRPC core reads grpc.min_reconnect_backoff_ms as the time a connection
    attempt (TCP, TLS and HTTP/2 handshakes) may take: it stays at gRPC's default of 20 s, since
    a short one would never connect over a slow link. Servers ignore these options."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", initial_reconnect_backoff_ms),
        ("grpc.min_reconnect_backoff_ms", min_connect_timeout_ms),
        ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
    ]


def connection_age_options(max_age_s: float) -> list[tuple[str, int]]:
    """Server options that close each connection after about `max_age_s` (gRPC adds +-10% jitter)
    with a GOAWAY: calls in flight finish (no grace limit), new ones go over a new connection after
    a new name lookup. [] for 0 (never)."""
    return [("grpc.max_connection_age_ms", int(max_age_s * 1000))] if max_age_s > 0 else []


@dataclass
class ServiceBundle:
    """A started server with what its shutdown needs."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    # Called after the server has drained (flush stores, close channels).
    on_stop: Callable[[], None] | None = None


def start_bundle(
    config: ServerConfig,
    register: Callable[[grpc.Server], None],
    service_names: Iterable[str],
    on_stop: Callable[[], None] | None = None,
    policy: Mapping[str, Access] | None = None,
    name: str | None = None,
) -> ServiceBundle:
    """Creates and starts a server with health and reflection, bound to config.host:config.port.

    Every call goes through the telemetry layer (request id, metrics, access log), then the
    gatekeeper (`policy`: the access each method needs, see common.security), then the per-client
    limits. `name` labels the metrics and logs (default: the service's package, e.g. "index").
    """
    names = list(service_names)
    name = name or names[0].split(".")[1]
    layers = [telemetry_layer(name, config.access_log), Gatekeeper.from_config(config, policy or {}).layer()]
    limits = ClientLimits(config.rate_limit_per_s, config.rate_burst, config.max_concurrent_per_client)
    if limits.enabled:
        layers.append(limits.layer())
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers),
        interceptors=[LayeredInterceptor(layers)],
        options=channel_options(config.max_message_bytes) + connection_age_options(config.max_connection_age_s),
    )
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    credentials = server_credentials(config)
    address = f"{config.host}:{config.port}"
    port = (
        server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
    )
    if port == 0:
        raise RuntimeError(f"cannot bind {address}")
    stop_metrics = start_metrics_server(config.host, config.metrics_port)
    server.start()
    for service in names + [""]:
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop() -> None:
        if on_stop is not None:
            on_stop()
        if stop_metrics is not None:
            stop_metrics()

    return ServiceBundle(server, port, health_servicer, stop)


def serve_forever(name: str, config: ServerConfig, create_bundle: Callable[[Any], ServiceBundle]) -> None:
    """Starts the service and blocks until SIGTERM/SIGINT; then stops taking calls, lets
    in-flight ones finish (up to config.shutdown_grace_s) and runs the bundle's on_stop."""
    setup_logging(name, config.log_level, config.log_format)
    bundle = create_bundle(config)
    log.info("%s listening on %s:%d", name, config.host, bundle.port)
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %d: draining for up to %.1f s", signum, config.shutdown_grace_s)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    stop.wait()
    bundle.health.enter_graceful_shutdown()
    bundle.server.stop(config.shutdown_grace_s).wait()
    if bundle.on_stop is not None:
        bundle.on_stop()
    log.info("%s stopped", name)


def timeout_from(context: grpc.ServicerContext, default_s: float, reserve_s: float = 0.0) -> float:
    """The caller's remaining time to pass downstream; `default_s` when the caller set none.

    `reserve_s` (at most a tenth of what remains) is kept back so that a call which tolerates a
    late dependency can still answer with partial results before its own deadline.
    """
    return Deadline.of(context, default_s).remaining(reserve_s)


class Deadline:
    """A point in time that calls made on a request's behalf must finish by (monotonic clock)."""

    def __init__(self, seconds: float):
        self._end = time.monotonic() + seconds

    @classmethod
    def of(cls, context: grpc.ServicerContext, default_s: float) -> Deadline:
        """The caller's deadline, or `default_s` from now when the caller set none."""
        remaining = context.time_remaining()
        return cls(default_s if remaining is None or remaining > 1e8 else remaining)

    def remaining(self, reserve_s: float = 0.0) -> float:
        """Seconds left for a downstream call, keeping back `reserve_s` (at most a tenth of what is
        left) so that a partial answer can still be sent in time."""
        left = self._end - time.monotonic()
        return max(left - min(reserve_s, max(left, 0.0) / 10), 0.001)
