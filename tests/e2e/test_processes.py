"""Services as their own processes: `python -m <service>`, health, graceful SIGTERM."""

import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from common.config import REPO_ROOT
from common.proto_convert import dense_to_proto
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.helpers import free_port, wait_serving


def test_sigterm_lets_an_in_flight_call_finish():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "index_server", "--port", str(port), "--shutdown-grace-s", "10", "--data-dir", ""],
        cwd=REPO_ROOT,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = index_pb2_grpc.IndexServiceStub(channel)
        streaming = threading.Event()

        def slow_adds():
            for i in range(10):
                if i == 2:
                    streaming.set()
                time.sleep(0.1)
                yield index_pb2.AddRequest(
                    item_id=f"i{i}", database="d", signature=dense_to_proto(np.ones(4, dtype=np.float32))
                )

        future = stub.Add.future(slow_adds(), timeout=20)
        assert streaming.wait(5)
        process.send_signal(signal.SIGTERM)
        assert future.result().added == 10  # the call in flight finished after SIGTERM
        assert process.wait(timeout=15) == 0
        with pytest.raises(grpc.RpcError) as error:  # and no new call is taken
            stub.Stats(index_pb2.StatsRequest(), timeout=2)
        assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
