"""The gateway's channels (gateway/backends.py): which calls may be retried on another replica."""

from __future__ import annotations

from gateway.backends import IDEMPOTENT
from mps.detector.v1 import detector_pb2
from mps.index.v1 import index_pb2
from mps.signature.v1 import signature_pb2

SERVICES = {
    service.full_name: service
    for module in (detector_pb2, index_pb2, signature_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
}
# Calls that change state (a retry of one whose answer was lost could apply it twice), and
# Replicate, a replica's copy stream that the gateway never makes.
WRITES = {"Add", "Delete", "UpdateGroups", "LoadModel", "UnloadModel", "Replicate"}


def test_only_reads_are_retried_and_every_read_is() -> None:
    assert set(IDEMPOTENT) == set(SERVICES)
    for service, methods in IDEMPOTENT.items():
        names = {method.name for method in SERVICES[service].methods}
        assert set(methods) <= names, f"{service} has no {set(methods) - names}"
        assert not set(methods) & WRITES
        assert set(methods) == names - WRITES, f"{service}: {names - WRITES - set(methods)} not retried"
