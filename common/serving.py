"""Server bootstrap shared by every service: options, health, reflection, graceful SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.config import ServerConfig
from common.errors import ServiceError

log = logging.getLogger(__name__)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


@dataclass
class ServiceBundle:
    """A started server with what its shutdown needs."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    # Called after the server has drained (flush stores, close channels).
    on_stop: Callable[[], None] | None = None


def start_bundle(config: ServerConfig, register: Callable[[grpc.Server], None],
                 service_names: Iterable[str], on_stop: Callable[[], None] | None = None) -> ServiceBundle:
    """Creates and starts a server with health and reflection, bound to config.host:config.port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers),
                         options=channel_options(config.max_message_bytes))
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise RuntimeError(f"cannot bind {config.host}:{config.port}")
    server.start()
    for name in names + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return ServiceBundle(server, port, health_servicer, on_stop)


def serve_forever(name: str, config: ServerConfig,
                  create_bundle: Callable[[Any], ServiceBundle]) -> None:
    """Starts the service and blocks until SIGTERM/SIGINT; then stops taking calls, lets
    in-flight ones finish (up to config.shutdown_grace_s) and runs the bundle's on_stop."""
    setup_logging(config.log_level)
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


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
    def of(cls, context: grpc.ServicerContext, default_s: float) -> "Deadline":
        """The caller's deadline, or `default_s` from now when the caller set none."""
        remaining = context.time_remaining()
        return cls(default_s if remaining is None or remaining > 1e8 else remaining)

    def remaining(self, reserve_s: float = 0.0) -> float:
        """Seconds left for a downstream call, keeping back `reserve_s` (at most a tenth of what is
        left) so that a partial answer can still be sent in time."""
        left = self._end - time.monotonic()
        return max(left - min(reserve_s, max(left, 0.0) / 10), 0.001)


@contextlib.contextmanager
def abort_on(context: grpc.ServicerContext) -> Iterator[None]:
    """Turns a domain error (common.errors) raised inside the block into its status code."""
    try:
        yield
    except ServiceError as error:
        context.abort(getattr(grpc.StatusCode, error.status), str(error))
