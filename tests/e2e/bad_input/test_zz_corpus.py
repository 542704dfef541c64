"""After every service's cases: the shard still restarts, and the corpus covers every RPC."""

from __future__ import annotations

from mps.detector.v1 import detector_pb2
from mps.gateway.v1 import gateway_pb2
from mps.index.v1 import index_pb2
from mps.signature.v1 import signature_pb2
from tests.e2e.bad_input import test_detector, test_gateway, test_index, test_signature

MIN_CASES = 150


def test_the_shard_restarts_with_its_data_after_the_corpus(hostile):
    """Bad input must never keep a shard from starting again (a snapshot written at SIGTERM, then
    read back), nor lose what it held."""
    hostile.restart("index")
    hostile.assert_unchanged()


def test_the_corpus_covers_every_rpc_of_every_service():
    cases = test_detector.CASES + test_signature.CASES + test_index.CASES + test_gateway.CASES
    assert len(cases) >= MIN_CASES, f"{len(cases)} cases"
    assert len({case.id for case in cases}) == len(cases), "case ids must be unique"
    covered = {case.rpc for case in cases}
    every_rpc = {
        f"/{service.full_name}/{method.name}"
        for module in (detector_pb2, signature_pb2, index_pb2, gateway_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert every_rpc <= covered, f"RPCs without a case: {sorted(every_rpc - covered)}"
