"""The router's view of its shard replicas, for metrics: each replica's gRPC health, polled.

Reads already avoid replicas that are not SERVING (the channels' client-side health checks, see
router.read_options); this watch only makes that view visible as `mps_router_replica_up`
(1 serving, 0 not serving or unreachable), per shard and replica.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.telemetry import GAUGE_SOURCES

SERVICE = "mps.index.v1.IndexService"


class ReplicaWatch:
    def __init__(self, shards: list[list[str]], open_channel: Callable[[str], grpc.Channel], every_s: float = 2.0):
        self._channels = {
            (shard, address): open_channel(address) for shard, addresses in enumerate(shards) for address in addresses
        }
        self._up = {key: 0.0 for key in self._channels}
        self._every_s = every_s
        self._stop = threading.Event()
        self._key = f"router-replicas-{id(self)}"
        GAUGE_SOURCES.add(
            self._key,
            "mps_router_replica_up",
            "1 when the replica reports SERVING to the router",
            ["shard", "replica"],
            self.samples,
        )
        self._thread = threading.Thread(target=self._run, name="replica-watch", daemon=True)
        self._thread.start()

    def samples(self) -> list[tuple[list[str], float]]:
        return [([str(shard), address], up) for (shard, address), up in sorted(self._up.items())]

    def poll(self) -> None:
        for key, channel in self._channels.items():
            try:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                    .status
                )
                self._up[key] = float(status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.RpcError:
                self._up[key] = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self._every_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        GAUGE_SOURCES.remove(self._key)
        for channel in self._channels.values():
            channel.close()
