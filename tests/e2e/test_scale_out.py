"""Scale-out of a stateless service behind one address: two detector processes, one gateway whose
detector_address names both (round_robin over the healthy ones, idempotent calls retried on
another replica: common.channels.balanced_channel), clients searching without pause; one detector
is killed (SIGKILL, no drain) mid-run and no query fails."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request

from common.config import REPO_ROOT
from common.images import encode_jpeg
from common.local_suite import LocalSuite, free_port, wait_serving
from common.photos import load_photo
from gateway.client import Product, VisualSearchClient
from mps.gateway.v1 import gateway_pb2

QUIET = ["--log-format", "text", "--access-log", "false", "--log-level", "WARNING"]
CLIENTS = 3


def detects_served(metrics_port: int) -> float:
    """Detect calls a detector process has answered OK, from its Prometheus metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("grpc_server_handled_total{") and 'grpc_method="Detect"' in line and '"OK"' in line
    )


def test_a_detector_killed_mid_run_fails_no_query() -> None:
    ports, metrics = [free_port(), free_port()], [free_port(), free_port()]
    detectors = [
        subprocess.Popen(
            [sys.executable, "-m", "detector_server", "--port", str(port), "--metrics-port", str(metrics_port)]
            + ["--intra-op-threads", "1", *QUIET],
            cwd=REPO_ROOT,
        )
        for port, metrics_port in zip(ports, metrics)
    ]
    suite = LocalSuite(
        {
            "detector": ",".join(f"127.0.0.1:{port}" for port in ports),
            "signature": f"127.0.0.1:{free_port()}",
            "index": f"127.0.0.1:{free_port()}",
            "gateway": f"127.0.0.1:{free_port()}",
        },
        {"signature": QUIET + ["--intra-op-threads", "1"], "index": QUIET + ["--data-dir", ""], "gateway": QUIET},
    )
    try:
        suite.spawn("signature")
        suite.spawn("index")
        for port, process in zip(ports, detectors):
            wait_serving(f"127.0.0.1:{port}", process)
        wait_serving(suite.addresses["signature"], suite.processes["signature"])
        wait_serving(suite.addresses["index"], suite.processes["index"])
        suite.start("gateway")
        coffee = encode_jpeg(load_photo("coffee"))
        with VisualSearchClient(suite.addresses["gateway"], timeout_s=30) as client:
            client.index_products([Product("cup", "tableware", coffee, {"title": "cup and saucer"})])
            done = threading.Event()
            answered: list[float] = []  # when each query was answered
            failures: list[str] = []

            def search() -> None:
                while not done.is_set():
                    try:
                        response = client.search(coffee, top_k=1, sources=[gateway_pb2.ITEM_SOURCE_DETECTOR])
                    except Exception as exc:  # every failure is what this test counts
                        failures.append(repr(exc)[:300])
                        continue
                    if not response.items:
                        failures.append("an answer without the cup")
                    answered.append(time.monotonic())

            threads = [threading.Thread(target=search) for _ in range(CLIENTS)]
            for thread in threads:
                thread.start()
            try:
                deadline = time.monotonic() + 30
                while len(answered) < 10 and time.monotonic() < deadline:
                    time.sleep(0.05)
                # round_robin has sent calls to both.
                assert detects_served(metrics[0]) > 0 and detects_served(metrics[1]) > 0
                killed_at = time.monotonic()
                detectors[0].send_signal(signal.SIGKILL)
                detectors[0].wait(timeout=10)
                while len([t for t in answered if t > killed_at]) < 10 and time.monotonic() < deadline + 15:
                    time.sleep(0.05)
            finally:
                done.set()
                for thread in threads:
                    thread.join(timeout=60)
        after = [t for t in answered if t > killed_at]
        assert failures == []
        assert len(answered) - len(after) >= 10
        assert len(after) >= 10  # and queries go on after it
    finally:
        suite.stop()
        for process in detectors:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)
