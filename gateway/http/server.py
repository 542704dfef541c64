"""Running the HTTP front: serve(config) until SIGTERM (uvicorn drains in-flight requests), or
start(config) in a background thread (tests, the demo) with its port and a stop()."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from common.telemetry import setup_logging
from gateway.http.app import create_app
from gateway.http.config import HttpConfig

log = logging.getLogger(__name__)


def _uvicorn_config(config: HttpConfig) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        log_config=None,  # the suite's own logging (common.telemetry)
        access_log=False,  # app.AccessLog writes one line per request, with its request id
        lifespan="on",
        timeout_graceful_shutdown=int(config.shutdown_grace_s) or None,
        ssl_certfile=config.tls_cert or None,
        ssl_keyfile=config.tls_key or None,
    )


def serve(config: HttpConfig) -> None:
    setup_logging("http", config.log_level, config.log_format)
    log.info("http front on %s:%d for the gateway at %s", config.host, config.port, config.gateway_address)
    uvicorn.Server(_uvicorn_config(config)).run()


@dataclass
class RunningFront:
    """A front serving in a background thread of this process."""

    port: int
    server: uvicorn.Server
    thread: threading.Thread
    https: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.https else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start(config: HttpConfig, timeout_s: float = 30.0) -> RunningFront:
    """Binds config.host:config.port (0 = a free port), serves in a thread, returns once it listens."""
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(_uvicorn_config(config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http-front", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the HTTP front did not start on {config.host}:{port}")
        time.sleep(0.02)
    return RunningFront(port, server, thread, https=bool(config.tls_cert))
