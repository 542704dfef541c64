"""The `hostile` fixture: the four services as processes, a reference catalogue, and the checks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.images import encode_jpeg
from common.local_suite import LocalSuite, start_local_suite
from common.photos import load_photo
from common.proto_convert import dense_from_proto
from common.status import details_of
from mps.common.v1 import common_pb2
from mps.detector.v1 import detector_pb2, detector_pb2_grpc
from mps.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from mps.index.v1 import index_pb2, index_pb2_grpc
from mps.signature.v1 import signature_pb2, signature_pb2_grpc
from tests.e2e.bad_input.harness import MAX_MESSAGE_CHARS, Case, Stubs

REFERENCE_CATEGORY = "reference"


def _reference_products() -> list[gateway_pb2.IndexProductsRequest]:
    requests = []
    for name in ("coffee", "chelsea", "astronaut", "rocket"):
        photo = load_photo(name)
        h, w = photo.shape[:2]
        crop = photo[h // 8 : 7 * h // 8, w // 8 : 7 * w // 8]
        requests.append(
            gateway_pb2.IndexProductsRequest(
                product_id=f"ref-{name}",
                category=REFERENCE_CATEGORY,
                image=common_pb2.Image(encoded=encode_jpeg(crop)),
                metadata={"title": name},
            )
        )
    return requests


class Hostile:
    """The running suite, stubs on it, and the answers to the reference queries before any case."""

    def __init__(self, suite: LocalSuite):
        self.suite = suite
        self.stubs = self._connect()
        self.reference = self.answers()

    def _connect(self) -> Stubs:
        channels = {name: grpc.insecure_channel(address) for name, address in self.suite.addresses.items()}
        coffee = load_photo("coffee")
        photo = common_pb2.Image(encoded=encode_jpeg(coffee))
        crop = common_pb2.Image(encoded=encode_jpeg(coffee[23:310, 150:429]))
        signature = signature_pb2_grpc.SignatureServiceStub(channels["signature"])
        signed = signature.ComputeSignatures(
            signature_pb2.ComputeSignaturesRequest(
                images=[crop], kinds=[common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW]
            ),
            timeout=60,
        )
        gateway = gateway_pb2_grpc.VisualSearchServiceStub(channels["gateway"])
        indexed = gateway.IndexProducts(iter(_reference_products()), timeout=120)
        assert indexed.indexed == 4, indexed
        index = index_pb2_grpc.IndexServiceStub(channels["index"])
        names = [d.name for d in index.Stats(index_pb2.StatsRequest(), timeout=10).databases]
        databases = {
            kind: next(n for n in names if REFERENCE_CATEGORY in n and kind in n.lower()) for kind in ("deep", "bow")
        }
        return Stubs(
            channels,
            detector_pb2_grpc.DetectorServiceStub(channels["detector"]),
            signature,
            index,
            gateway,
            photo,
            crop,
            signed.signatures[0],
            signed.signatures[1],
            databases,
        )

    def answers(self) -> dict[str, object]:
        """What every service says to the same reference queries (compared before and after)."""
        s = self.stubs
        detected = s.detector.Detect(detector_pb2.DetectRequest(image=s.photo, min_confidence=0.3), timeout=60)
        signed = s.signature.ComputeSignatures(
            signature_pb2.ComputeSignaturesRequest(
                images=[s.crop], kinds=[common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW]
            ),
            timeout=60,
        )
        searched = {
            kind: [
                (m.item_id, round(m.score, 4))
                for r in s.index.Search(
                    index_pb2.SearchRequest(database=database, signature=getattr(s, kind), top_k=10), timeout=30
                )
                for m in r.items
            ]
            for kind, database in s.databases.items()
        }
        found = s.gateway.MultiProductSearch(
            gateway_pb2.MultiProductSearchRequest(image=s.photo, top_k=3, categories=[REFERENCE_CATEGORY]), timeout=120
        )
        return {
            "detect": sorted((d.class_name, round(d.confidence, 3)) for d in detected.detections),
            "sign": [(sig.kind, dense_from_proto(sig)[:8].tolist(), len(sig.bow)) for sig in signed.signatures],
            "search": searched,
            "gateway": sorted((i.category, [m.product_id for m in i.matches]) for i in found.items),
            "stats": sorted(
                (d.name, d.items)
                for d in s.index.Stats(index_pb2.StatsRequest(), timeout=10).databases
                if REFERENCE_CATEGORY in d.name
            ),
        }

    def healthy(self) -> None:
        for name, channel in self.stubs.channels.items():
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, f"{name} is not serving"
            assert self.suite.processes[name].poll() is None, f"{name} exited"

    def check(self, case: Case) -> None:
        """Runs one case: the status code, a message that says what to fix, every service healthy."""
        started = time.monotonic()
        refusal: grpc.RpcError | None = None
        try:
            case.call(self.stubs)
        except grpc.RpcError as error:
            refusal = error
            code, details = error.code(), error.details() or ""
        else:
            code, details = grpc.StatusCode.OK, ""
        assert code == case.code, f"{case.id}: {code.name} ({details[:300]!r}), expected {case.code.name}"
        assert len(details) <= MAX_MESSAGE_CHARS, f"{case.id}: a {len(details)}-character message"
        missing = [fragment for fragment in case.says if fragment.lower() not in details.lower()]
        assert not missing, f"{case.id}: the message {details[:300]!r} does not say {missing}"
        if case.info or case.fields is not None or case.quota is not None:
            assert refusal is not None, f"{case.id}: details expected from a call that succeeded"
            sent = details_of(refusal)
            assert dict(case.info).items() <= sent.info.items(), f"{case.id}: info {sent.info}"
            if case.fields is not None:
                assert tuple(f for f, _ in sent.violations) == case.fields, f"{case.id}: {sent.violations}"
            if case.quota is not None:
                assert tuple(s for s, _ in sent.quota) == case.quota, f"{case.id}: quota {sent.quota}"
        assert time.monotonic() - started < self.stubs.timeout, f"{case.id}: took {time.monotonic() - started:.1f} s"
        self.healthy()

    def assert_unchanged(self) -> None:
        self.healthy()
        assert self.answers() == self.reference

    def restart(self, name: str) -> None:
        """Stops one service (SIGTERM) and starts it again on the same port; the channels reconnect."""
        self.suite.start(name)


@pytest.fixture(scope="session")
def hostile(tmp_path_factory) -> Iterator[Hostile]:
    data_dir = Path(tmp_path_factory.mktemp("hostile-index"))
    suite = start_local_suite({"index": ["--data-dir", str(data_dir)]})
    try:
        yield Hostile(suite)
    finally:
        suite.stop()
