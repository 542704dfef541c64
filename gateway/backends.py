"""The pipeline's ports (gateway/ports.py) over gRPC: channels and stubs to the services behind the
gateway, per-category index routing, proto <-> domain conversion, and status -> domain error."""

from __future__ import annotations

import threading
import time
from typing import NoReturn, Sequence

import grpc
import numpy as np

from common.errors import (DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, Unavailable,
                           Internal)
from common.proto_convert import box_from_proto, box_to_proto, image_to_proto
from common.serving import channel_options
from gateway.ports import (BatchAnswer, CatalogueEntry, CatalogueMatch, Degraded, DetectorOutput,
                           LocatorOutput, Signature)
from mps.common.v1 import common_pb2
from mps.detector.v1 import detector_pb2, detector_pb2_grpc
from mps.index.v1 import index_pb2, index_pb2_grpc
from mps.signature.v1 import signature_pb2, signature_pb2_grpc

KIND_VALUES = {"deep": common_pb2.SIGNATURE_KIND_DEEP, "bow": common_pb2.SIGNATURE_KIND_BOW}
KIND_NAMES = {value: name for name, value in KIND_VALUES.items()}


def database_name(category: str, kind: str) -> str:
    """The index database of one category's products signed with one kind."""
    return f"{category}.{kind}"


def item_id_of(product_id: str, image_id: str) -> str:
    """The index item of one image of a product (its group is the product)."""
    return f"{product_id}/{image_id}"


def raise_from(stage: str, error: grpc.RpcError) -> NoReturn:
    """A failed downstream call as the domain error the gateway's caller should see."""
    code, details = error.code(), error.details()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise DeadlineExceeded(f"{stage}: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise InvalidArgument(f"{stage}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise ResourceExhausted(f"{stage}: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        raise NotFound(f"{stage}: {details}")
    raise Unavailable(f"{stage} service failed ({code.name}): {details}")


class GrpcDetector:
    def __init__(self, channel: grpc.Channel):
        self.stub = detector_pb2_grpc.DetectorServiceStub(channel)

    def detect(self, rgb: np.ndarray, min_confidence: float, objectness_threshold: float,
               max_objects: int, timeout_s: float) -> DetectorOutput:
        request = detector_pb2.DetectRequest(image=image_to_proto(rgb), min_confidence=min_confidence,
                                             objectness_threshold=objectness_threshold,
                                             max_objects=max_objects if objectness_threshold > 0 else 0)
        try:
            response = self.stub.Detect(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise_from("detector", exc)
        return DetectorOutput([(box_from_proto(d.box), d.class_name, d.category, d.confidence)
                               for d in response.detections],
                              [(box_from_proto(o.box), o.objectness) for o in response.objects],
                              response.inference_ms)


class GrpcLocator:
    def __init__(self, channel: grpc.Channel):
        self.stub = signature_pb2_grpc.SignatureServiceStub(channel)

    def locate(self, rgb: np.ndarray, max_salient: int, max_segments: int, timeout_s: float) -> LocatorOutput:
        request = signature_pb2.LocateObjectsRequest(image=image_to_proto(rgb), max_salient=max_salient,
                                                     max_segments=max_segments)
        try:
            response = self.stub.LocateObjects(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise_from("salient-object locator", exc)
        return LocatorOutput([(box_from_proto(o.box), o.score) for o in response.salient],
                             [(box_from_proto(o.box), o.score) for o in response.segments],
                             response.compute_ms)


class GrpcSigner:
    def __init__(self, channel: grpc.Channel):
        self.stub = signature_pb2_grpc.SignatureServiceStub(channel)

    def sign(self, crops: Sequence[np.ndarray], kinds: Sequence[str], timeout_s: float) -> list[list[Signature]]:
        request = signature_pb2.ComputeSignaturesRequest(images=[image_to_proto(c) for c in crops],
                                                         kinds=[KIND_VALUES[k] for k in kinds])
        try:
            response = self.stub.ComputeSignatures(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise_from("signature", exc)
        per = len(kinds)
        if len(response.signatures) != len(crops) * per:
            raise Internal(f"signature service returned {len(response.signatures)} signatures for "
                           f"{len(crops)} images" + (f" and {per} kinds" if per > 1 else "")
                           + ": check that its version matches the gateway's")
        signatures = list(response.signatures)
        return [signatures[i * per:(i + 1) * per] for i in range(len(crops))]


class GrpcIndex:
    """Index databases by category and kind, over the default index address and per-category routes."""

    # Listing the catalogue's databases must not hold a search up for long.
    LIST_TIMEOUT_S = 1.0

    def __init__(self, default: grpc.Channel, routes: dict[str, grpc.Channel], refresh_s: float):
        self._default = index_pb2_grpc.IndexServiceStub(default)
        self._routes = {category: index_pb2_grpc.IndexServiceStub(channel) for category, channel in routes.items()}
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._databases: dict[str, set[str]] = {}   # kind -> categories
        self._unreachable: set[str] = set()
        self._fetched = -np.inf

    def stub_for(self, category: str) -> index_pb2_grpc.IndexServiceStub:
        return self._routes.get(category, self._default)

    def _stubs(self) -> list[index_pb2_grpc.IndexServiceStub]:
        return list({id(s): s for s in [self._default, *self._routes.values()]}.values())

    def categories(self, kind: str) -> set[str]:
        with self._lock:
            if time.monotonic() - self._fetched > self._refresh_s:
                self._databases, self._unreachable = self._fetch()
                self._fetched = time.monotonic()
            return set(self._databases.get(kind, set()))

    def unreachable_categories(self) -> set[str]:
        """Routed categories whose shard did not answer the last listing (assumed to exist)."""
        with self._lock:
            return set(self._unreachable)

    def invalidate(self) -> None:
        with self._lock:
            self._fetched = -np.inf

    def _fetch(self) -> tuple[dict[str, set[str]], set[str]]:
        """Every shard's databases, asked in parallel; a routed shard that does not answer in time
        is left out (its categories are searched only when an item names them)."""
        calls = [(stub, stub.Stats.future(index_pb2.StatsRequest(), timeout=self.LIST_TIMEOUT_S))
                 for stub in self._stubs()]
        found: dict[str, set[str]] = {}
        unreachable: set[str] = set()
        for stub, call in calls:
            try:
                stats = call.result()
            except grpc.RpcError as exc:
                if stub is self._default:
                    raise_from("index (listing the catalogue's categories)", exc)
                unreachable.update(c for c, routed in self._routes.items() if routed is stub)
                continue
            for database in stats.databases:
                category, _, kind = database.name.rpartition(".")
                if category and kind in KIND_VALUES and self.stub_for(category) is stub:
                    found.setdefault(kind, set()).add(category)
        return found, unreachable

    def search_batch(self, category: str, kind: str, signatures: Sequence[Signature], top_k: int,
                     timeout_s: float) -> BatchAnswer:
        request = index_pb2.SearchBatchRequest(database=database_name(category, kind), signatures=signatures,
                                               top_k=top_k, one_per_group=True)
        try:
            response = self.stub_for(category).SearchBatch(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise_from(f"index ({category!r})", exc)
        degraded = None
        if response.degraded:
            degraded = Degraded(response.degraded_reason,
                                [(r.first, r.end) for r in response.missing_word_ranges],
                                list(response.missing_shards))
        return BatchAnswer([[_match(item) for item in hits.items] for hits in response.results], degraded)

    def add(self, entries: Sequence[CatalogueEntry], timeout_s: float) -> None:
        by_stub: dict[int, tuple[index_pb2_grpc.IndexServiceStub, list[index_pb2.AddRequest]]] = {}
        for entry in entries:
            stub = self.stub_for(entry.category)
            by_stub.setdefault(id(stub), (stub, []))[1].append(index_pb2.AddRequest(
                item_id=item_id_of(entry.product_id, entry.image_id),
                database=database_name(entry.category, entry.kind), signature=entry.signature,
                metadata=entry.metadata, group_id=entry.product_id, box=box_to_proto(entry.box)))
        try:
            for stub, requests in by_stub.values():
                stub.Add(iter(requests), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise_from("index", exc)
        finally:
            self.invalidate()

    def delete_products(self, product_ids: Sequence[str], categories: Sequence[str] | None,
                        timeout_s: float) -> tuple[int, list[str]]:
        self.invalidate()
        held = {kind: self.categories(kind) for kind in KIND_VALUES}
        wanted = set(categories) if categories is not None else set().union(*held.values())
        deleted_images = 0
        found: set[str] = set()
        for category in sorted(wanted):
            per_kind = 0
            for kind, present in held.items():
                if category not in present:
                    continue
                try:
                    response = self.stub_for(category).Delete(index_pb2.DeleteRequest(
                        database=database_name(category, kind), group_ids=list(product_ids)), timeout=timeout_s)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        continue
                    raise_from(f"index ({category!r}, after {deleted_images} images deleted)", exc)
                # Every kind holds the same images: count them once.
                per_kind = max(per_kind, response.deleted)
                missing = set(response.groups_not_found)
                found.update(p for p in product_ids if p not in missing)
            deleted_images += per_kind
        self.invalidate()
        return deleted_images, [p for p in product_ids if p not in found]


def _match(item: index_pb2.ScoredItem) -> CatalogueMatch:
    group = item.group_id
    prefix = group + "/"
    image_id = item.item_id[len(prefix):] if group and item.item_id.startswith(prefix) else ""
    return CatalogueMatch(group or item.item_id, image_id, item.score, dict(item.metadata),
                          box_from_proto(item.box) if item.HasField("box") else None)


class Backends:
    """Every channel the gateway opens, and the ports over them."""

    def __init__(self, detector_address: str, signature_address: str, index_address: str,
                 index_routes: dict[str, str], max_message_bytes: int, catalogue_refresh_s: float = 5.0):
        options = channel_options(max_message_bytes)
        self._channels: dict[str, grpc.Channel] = {}

        def channel(address: str) -> grpc.Channel:
            if address not in self._channels:
                self._channels[address] = grpc.insecure_channel(address, options=options)
            return self._channels[address]

        self.detector = GrpcDetector(channel(detector_address))
        self.locator = GrpcLocator(channel(signature_address))
        self.signer = GrpcSigner(channel(signature_address))
        self.index = GrpcIndex(channel(index_address),
                               {category: channel(address) for category, address in index_routes.items()},
                               catalogue_refresh_s)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
