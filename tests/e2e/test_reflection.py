"""Every server answers health checks and lists its services by reflection."""

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

EXPECTED = {
    "detector": "mps.detector.v1.DetectorService",
    "signature": "mps.signature.v1.SignatureService",
    "index": "mps.index.v1.IndexService",
    "gateway": "mps.gateway.v1.VisualSearchService",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reflection_lists_the_service_and_health(suite, name):
    with grpc.insecure_channel(suite.addresses[name]) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {EXPECTED[name], "grpc.health.v1.Health"} <= services
