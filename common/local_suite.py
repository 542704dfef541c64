"""The four services as local processes on free ports: what `make run` and the benchmarks start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import REPO_ROOT

SERVICES = ("detector", "signature", "index", "gateway")
MODULES = {
    "detector": "detector_server",
    "signature": "signature_server",
    "index": "index_server",
    "gateway": "gateway",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(
    address: str,
    process: subprocess.Popen,
    timeout_s: float = 120.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Waits until the process at `address` reports SERVING; raises if it dies or takes too long.
    `credentials`: TLS (and a client certificate) for a server with TLS on."""
    deadline = time.monotonic() + timeout_s
    with (
        grpc.secure_channel(address, credentials)
        if credentials is not None
        else grpc.insecure_channel(address) as channel
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server for {address} exited with {process.returncode}; see its log above")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)  # not up yet, or up but NOT_SERVING (e.g. a replica catching up)
    raise TimeoutError(f"{address} did not become healthy in {timeout_s} s")


@dataclass
class LocalSuite:
    """Running service processes and their addresses."""

    addresses: dict[str, str]
    extra: dict[str, list[str]]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # For servers with TLS on: the credentials a health check needs.
    credentials: grpc.ChannelCredentials | None = None
    # Added to every process's environment (secrets go here, not in flags).
    environment: dict[str, str] = field(default_factory=dict)

    def command(self, name: str) -> list[str]:
        args = [sys.executable, "-m", MODULES[name], "--port", self.addresses[name].rpartition(":")[2]]
        if name == "gateway":
            args += [
                "--detector-address",
                self.addresses["detector"],
                "--signature-address",
                self.addresses["signature"],
                "--index-address",
                self.addresses["index"],
            ]
        return args + self.extra.get(name, [])

    def start(self, name: str, extra: Sequence[str] | None = None) -> None:
        """Starts (or, with new flags, restarts) one service and waits until it serves."""
        if extra is not None:
            self.extra[name] = list(extra)
        if name in self.processes:
            self._stop([self.processes.pop(name)])
        self.spawn(name)
        wait_serving(self.addresses[name], self.processes[name], credentials=self.credentials)

    def spawn(self, name: str) -> None:
        """Starts one service's process without waiting for it."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.environment}
        self.processes[name] = subprocess.Popen(self.command(name), cwd=REPO_ROOT, env=env)

    def stop(self) -> None:
        self._stop(list(self.processes.values()))
        self.processes.clear()

    @staticmethod
    def _stop(processes: list[subprocess.Popen]) -> None:
        """SIGTERM (they drain in-flight calls), then a kill for any still there after 20 s."""
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def start_local_suite(
    extra: dict[str, list[str]] | None = None,
    environment: dict[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> LocalSuite:
    """Starts the four services (the back ends in parallel, then the gateway); `extra` adds flags
    per service, e.g. {"index": ["--data-dir", ""]}; `environment` adds variables to every process
    (e.g. MPS_INDEX_INTERNAL_TOKEN); `credentials` are what a health check needs where TLS is on."""
    suite = LocalSuite(
        {name: f"127.0.0.1:{free_port()}" for name in SERVICES},
        dict(extra or {}),
        credentials=credentials,
        environment=dict(environment or {}),
    )
    try:
        for name in SERVICES[:3]:
            suite.spawn(name)
        for name in SERVICES[:3]:
            wait_serving(suite.addresses[name], suite.processes[name], credentials=credentials)
        suite.start("gateway")
    except BaseException:
        suite.stop()
        raise
    return suite
