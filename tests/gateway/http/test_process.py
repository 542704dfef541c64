"""`python -m gateway.http` as its own process: it serves, reports the gateway's health, and stops
cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from common.config import REPO_ROOT
from tests.helpers import free_port


def test_the_front_runs_as_its_own_process(front):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.http",
            "--port",
            str(port),
            "--gateway-address",
            front.suite.addresses["gateway"],
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the front did not start listening"
                time.sleep(0.2)
        assert reply.status_code == 200 and reply.json() == {"status": "SERVING"}
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/stats", timeout=30).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    # uvicorn drains, then ends by the signal it was sent (as a process killed by it would).
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Finished server process" in output
    assert '"service": "http"' in output and "GET /v1/stats 200" in output  # JSON logs, one access line per request
