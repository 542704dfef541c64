"""common.healthcheck (the images' HEALTHCHECK) against a real index shard on loopback: SERVING is
exit 0, anything else exit 1 with one line saying what it got, a closed port at once; plain, TLS
and mTLS; and the http(s):// form against a small HTTP server."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health, health_pb2

from common import healthcheck
from common.config import REPO_ROOT, load_config
from common.local_suite import free_port
from index_server.config import IndexConfig
from index_server.server import SERVICE_NAMES, create_bundle
from tests.tls import Authority

INDEX = SERVICE_NAMES[0]


@pytest.fixture(scope="module")
def shard() -> Iterator[tuple[str, health.HealthServicer]]:
    """An in-memory index shard: its address and its health servicer."""
    bundle = create_bundle(load_config(IndexConfig, "index", environ={}, port=0, data_dir=""))
    try:
        yield f"127.0.0.1:{bundle.port}", bundle.health
    finally:
        bundle.server.stop(None)
        if bundle.on_stop is not None:
            bundle.on_stop()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line as a HEALTHCHECK runs it."""
    return subprocess.run(
        [sys.executable, "-m", "common.healthcheck", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith(healthcheck.ENV_PREFIX)},
    )


def test_serving_server_exits_0_saying_serving(shard: tuple[str, health.HealthServicer]) -> None:
    address, _ = shard
    done = run_cli(address, "--service", INDEX)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{address} service {INDEX!r}: SERVING"]


def test_closed_port_exits_1_at_once() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = run_cli(address, "--timeout", "20")
    assert done.returncode == 1, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith(f"{address}: unreachable (UNAVAILABLE")
    assert time.monotonic() - started < 10  # not the 20 s deadline: no wait_for_ready


def test_whole_server_and_not_serving_and_unknown_service(shard: tuple[str, health.HealthServicer], capsys) -> None:
    address, health = shard
    assert healthcheck.main([address], environ={}) == 0
    assert capsys.readouterr().out == f"{address}: SERVING\n"
    health.set(INDEX, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert healthcheck.main([address, "--service", INDEX], environ={}) == 1
        assert capsys.readouterr().out == f"{address} service {INDEX!r}: NOT_SERVING\n"
    finally:
        health.set(INDEX, health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([address, "--service", "no.such.Service"], environ={}) == 1
    assert "unknown service (NOT_FOUND" in capsys.readouterr().out


def test_bad_arguments_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        healthcheck.main(["127.0.0.1:1", "--timeout", "0"], environ={})
    assert exit.value.code == 2
    with pytest.raises(SystemExit) as exit:
        healthcheck.main(["127.0.0.1:1", "--tls-ca", "ca.crt", "--tls-client-cert", "c.crt"], environ={})
    assert exit.value.code == 2
    capsys.readouterr()


def test_tls_and_mtls_with_flags_or_the_environment(tmp_path: Path, capsys) -> None:
    authority = Authority(tmp_path)
    server, client = authority.issue("index", server=True), authority.issue("probe", server=False)
    bundle = create_bundle(
        load_config(
            IndexConfig,
            "index",
            environ={},
            port=0,
            data_dir="",
            tls_cert=str(server.cert),
            tls_key=str(server.key),
            tls_client_ca=str(authority.pem.cert),  # mTLS: a client certificate is required
        )
    )
    address = f"127.0.0.1:{bundle.port}"
    try:
        # Plaintext against TLS: no answer, exit 1.
        assert healthcheck.main([address, "--timeout", "2"], environ={}) == 1
        assert capsys.readouterr().out.startswith(f"{address}: ")
        # Without the client certificate the handshake fails.
        assert healthcheck.main([address, "--tls-ca", str(authority.pem.cert), "--timeout", "2"], environ={}) == 1
        capsys.readouterr()
        flags = ["--tls-ca", str(authority.pem.cert), "--tls-client-cert", str(client.cert)]
        flags += ["--tls-client-key", str(client.key)]
        assert healthcheck.main([address, *flags, "--service", INDEX], environ={}) == 0
        assert capsys.readouterr().out.endswith(": SERVING\n")
        # The same from MPS_HEALTHCHECK_* (a container's HEALTHCHECK line stays the same with TLS on),
        # dialling the certificate's other name.
        environ = {
            "MPS_HEALTHCHECK_TLS_CA": str(authority.pem.cert),
            "MPS_HEALTHCHECK_TLS_CLIENT_CERT": str(client.cert),
            "MPS_HEALTHCHECK_TLS_CLIENT_KEY": str(client.key),
            "MPS_HEALTHCHECK_TLS_SERVER_NAME": "localhost",
        }
        assert healthcheck.main([address], environ=environ) == 0
        assert capsys.readouterr().out == f"{address}: SERVING\n"
    finally:
        bundle.server.stop(None)
        if bundle.on_stop is not None:
            bundle.on_stop()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_http_address_is_a_get_healthy_on_200(capsys) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert healthcheck.main([f"{base}/healthz"], environ={}) == 0
        assert capsys.readouterr().out == f"{base}/healthz: 200 OK\n"
        assert healthcheck.main([f"{base}/down"], environ={}) == 1
        assert capsys.readouterr().out == f"{base}/down: 503 Service Unavailable\n"
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.main([f"{base}/healthz", "--timeout", "2"], environ={}) == 1
    assert capsys.readouterr().out.startswith(f"{base}/healthz: unreachable (")
