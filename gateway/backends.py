"""The pipeline's ports (gateway/ports.py) over gRPC: channels and stubs to the services behind the
gateway, per-category index routing, proto <-> domain conversion, and status -> domain error."""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, cast

import grpc
import numpy as np

from common import blcf_codec
from common.channels import balanced_channel
from common.config import ServerConfig
from common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from common.local_features import Features, LocalFeaturesError
from common.local_features import from_proto as features_from_proto
from common.local_features import to_proto as features_to_proto
from common.proto_convert import box_from_proto, box_to_proto, image_to_proto
from gateway.config import SignatureKind
from gateway.ports import (
    BatchAnswer,
    CatalogueEntry,
    CatalogueImageInfo,
    CatalogueMatch,
    CatalogueProduct,
    CategoryFailure,
    DatabaseInfo,
    Degraded,
    DetectorOutput,
    LocatorOutput,
    ProductPage,
    Signature,
    SpatialRerank,
    caller_metadata,
    item_id_of,
)
from index_server.convert import attributes_to_proto, filter_to_proto, stored_attributes
from index_server.domain import Filter, ProductAttributes
from mps.common.v1 import common_pb2
from mps.detector.v1 import detector_pb2, detector_pb2_grpc
from mps.index.v1 import index_pb2, index_pb2_grpc
from mps.signature.v1 import signature_pb2, signature_pb2_grpc

KIND_VALUES: dict[SignatureKind, common_pb2.SignatureKind] = {
    "deep": common_pb2.SIGNATURE_KIND_DEEP,
    "bow": common_pb2.SIGNATURE_KIND_BOW,
    "blcf": common_pb2.SIGNATURE_KIND_BLCF,
}
KIND_NAMES: dict[int, SignatureKind] = {value: name for name, value in KIND_VALUES.items()}


def database_name(category: str, kind: str) -> str:
    """The index database of one category's products signed with one kind."""
    return f"{category}.{kind}"


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

    def detect(
        self,
        rgb: np.ndarray,
        min_confidence: float,
        objectness_threshold: float,
        max_objects: int,
        timeout_s: float,
        model: str = "",
    ) -> DetectorOutput:
        request = detector_pb2.DetectRequest(
            image=image_to_proto(rgb),
            model=model,
            min_confidence=min_confidence,
            objectness_threshold=objectness_threshold,
            max_objects=max_objects if objectness_threshold > 0 else 0,
        )
        try:
            response = self.stub.Detect(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            if model and exc.code() == grpc.StatusCode.NOT_FOUND:
                # Not the caller's to fix: the gateway is configured with a model the detector lacks.
                raise FailedPrecondition(
                    f"detector: {exc.details()}; the gateway's detector_models names {model!r}: serve that "
                    "model on the detector service (its ListModels lists those it serves) or remove it"
                ) from None
            raise_from("detector", exc)
        return DetectorOutput(
            [(box_from_proto(d.box), d.class_name, d.category, d.confidence) for d in response.detections],
            [(box_from_proto(o.box), o.objectness) for o in response.objects],
            response.inference_ms,
        )


class GrpcLocator:
    def __init__(self, channel: grpc.Channel):
        self.stub = signature_pb2_grpc.SignatureServiceStub(channel)

    def locate(self, rgb: np.ndarray, max_salient: int, max_segments: int, timeout_s: float) -> LocatorOutput:
        request = signature_pb2.LocateObjectsRequest(
            image=image_to_proto(rgb), max_salient=max_salient, max_segments=max_segments
        )
        try:
            response = self.stub.LocateObjects(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise_from("salient-object locator", exc)
        return LocatorOutput(
            [(box_from_proto(o.box), o.score) for o in response.salient],
            [(box_from_proto(o.box), o.score) for o in response.segments],
            response.compute_ms,
        )


class GrpcSigner:
    # Asking the signature service for its limit must not hold a search up for long.
    LIMIT_TIMEOUT_S = 1.0

    def __init__(self, channel: grpc.Channel):
        self.stub = signature_pb2_grpc.SignatureServiceStub(channel)
        self._limit: int | None = None  # images per call, as advertised; None = not asked yet

    def images_per_call(self, timeout_s: float) -> int:
        limit = self._limit
        if limit is not None:
            return limit
        try:
            response = self.stub.ListKinds(
                signature_pb2.ListKindsRequest(), timeout=min(timeout_s, self.LIMIT_TIMEOUT_S)
            )
        except grpc.RpcError:
            return 0  # asked again next time; the configured limit meanwhile
        # An older signature service does not advertise it (the field is absent or 0).
        self._limit = int(getattr(response, "max_images_per_call", 0) or 0)
        return self._limit

    def sign(
        self, crops: Sequence[np.ndarray], kinds: Sequence[SignatureKind], timeout_s: float
    ) -> list[list[Signature]]:
        request = signature_pb2.ComputeSignaturesRequest(
            images=[image_to_proto(c) for c in crops], kinds=[KIND_VALUES[k] for k in kinds]
        )
        try:
            response = self.stub.ComputeSignatures(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._limit = None  # the service may have restarted with another limit: ask again
            raise_from("signature", exc)
        per = len(kinds)
        if len(response.signatures) != len(crops) * per:
            raise Internal(
                f"signature service returned {len(response.signatures)} signatures for "
                f"{len(crops)} images"
                + (f" and {per} kinds" if per > 1 else "")
                + ": check that its version matches the gateway's"
            )
        signatures = list(response.signatures)
        return [signatures[i * per : (i + 1) * per] for i in range(len(crops))]

    def sign_regions(self, rgb: np.ndarray, regions: Sequence[np.ndarray], timeout_s: float) -> list[Signature]:
        request = signature_pb2.ComputeSignaturesRequest(
            images=[image_to_proto(rgb)],
            kinds=[common_pb2.SIGNATURE_KIND_BLCF],
            regions=[box_to_proto(box) for box in regions],
        )
        try:
            response = self.stub.ComputeSignatures(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._limit = None
            raise_from("signature", exc)
        if len(response.signatures) != len(regions):
            raise Internal(
                f"signature service returned {len(response.signatures)} signatures for {len(regions)} regions: "
                "check that its version matches the gateway's (query by region needs SIGNATURE_KIND_BLCF)"
            )
        return list(response.signatures)

    def covering(self, signature: Signature, width: int, height: int) -> Signature:
        try:
            assignment = blcf_codec.decode(signature.blcf)
            data = blcf_codec.encode(dataclasses.replace(assignment, width=width, height=height))
        except ValueError as exc:  # BlcfFormatError too
            raise Internal(
                f"signature service returned a BLCF signature the gateway cannot read ({exc}): check that "
                "its version matches the gateway's"
            ) from None
        return common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BLCF, blcf=data)


class _IndexBackend:
    """One index address: its stub, its channel's connectivity, and its last catalogue listing."""

    def __init__(self, address: str, channel: grpc.Channel):
        self.address = address
        self.channel = channel
        self.stub = index_pb2_grpc.IndexServiceStub(channel)
        self.state: grpc.ChannelConnectivity | None = None
        self.listed: dict[str, set[str]] = {}  # kind -> categories, at the last listing that answered
        self.failure: tuple[str, str] | None = None  # (status code name, details) of the last listing
        self.fetched = -np.inf
        channel.subscribe(self._track, try_to_connect=False)

    def _track(self, state: grpc.ChannelConnectivity) -> None:
        self.state = state

    def wait_ready(self, timeout_s: float) -> None:
        """A channel in TRANSIENT_FAILURE fails every call at once until its next reconnection
        attempt (at most max_reconnect_backoff_ms apart, common.serving.channel_options): a short
        wait for that lets a backend that is back answer this call rather than the next one."""
        if self.state is not grpc.ChannelConnectivity.TRANSIENT_FAILURE or timeout_s <= 0:
            return
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            ready.cancel()


class GrpcIndex:
    """Index databases by category and kind, over the default index address and per-category routes."""

    # Listing the catalogue's databases must not hold a search up for long.
    LIST_TIMEOUT_S = 1.0

    def __init__(
        self,
        channels: dict[str, grpc.Channel],
        default_address: str,
        routes: dict[str, str],
        refresh_s: float,
        ready_wait_s: float = 0.3,
    ):
        self._backends = {
            address: _IndexBackend(address, channels[address])
            for address in dict.fromkeys([default_address, *routes.values()])
        }
        self._default = self._backends[default_address]
        self._routes = {category: self._backends[address] for category, address in routes.items()}
        self._refresh_s = refresh_s
        self._ready_wait_s = ready_wait_s
        self._lock = threading.Lock()

    def _backend(self, category: str) -> _IndexBackend:
        return self._routes.get(category, self._default)

    def backend_of(self, category: str) -> str:
        return self._backend(category).address

    def categories(self, kind: str) -> set[str]:
        with self._lock:
            self._refresh()
            return {
                category
                for backend in self._backends.values()
                if backend.failure is None
                for category in backend.listed.get(kind, ())
                if self._backend(category) is backend
            }

    def unreachable(self) -> list[CategoryFailure]:
        """Categories of backends whose last listing failed: those the backend held when it last
        answered, and those routed to it; a backend with neither is one failure with category ""."""
        failures = []
        with self._lock:
            for backend in self._backends.values():
                if backend.failure is None:
                    continue
                code, details = backend.failure
                held = {c for kinds in backend.listed.values() for c in kinds if self._backend(c) is backend}
                held |= {c for c, routed in self._routes.items() if routed is backend}
                reason = f"the index at {backend.address} did not answer ({code}): {details}"
                failures += [CategoryFailure(c, code, reason, backend.address) for c in sorted(held)] or [
                    CategoryFailure("", code, reason + "; the categories it holds are unknown", backend.address)
                ]
        return failures

    def invalidate(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                backend.fetched = -np.inf

    def _refresh(self) -> None:
        """Lists the databases of every backend due (in parallel): one that answered is listed again
        after refresh_s; one that failed after refresh_s too (a silent backend costs a listing's
        timeout), or as soon as its channel is connected again (a restarted backend is used at once)."""
        now = time.monotonic()
        due = [
            b
            for b in self._backends.values()
            if now - b.fetched > self._refresh_s
            or (b.failure is not None and b.state is grpc.ChannelConnectivity.READY)
        ]
        calls = [(b, b.stub.Stats.future(index_pb2.StatsRequest(), timeout=self.LIST_TIMEOUT_S)) for b in due]
        for backend, call in calls:
            backend.fetched = time.monotonic()
            try:
                stats = call.result()
            except grpc.RpcError as exc:
                backend.failure = (exc.code().name, exc.details() or "")
                continue
            backend.failure = None
            backend.listed = {}
            for database in stats.databases:
                category, _, kind = database.name.rpartition(".")
                if category and kind in KIND_VALUES:
                    backend.listed.setdefault(kind, set()).add(category)

    def _failed(self, backend: _IndexBackend, exc: grpc.RpcError) -> None:
        """A call that found the backend gone: list it again at the next search."""
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            with self._lock:
                backend.fetched = -np.inf

    def search_batch(
        self,
        category: str,
        kind: str,
        signatures: Sequence[Signature],
        top_k: int,
        timeout_s: float,
        filter: Filter | None = None,
        spatial: SpatialRerank | None = None,
    ) -> BatchAnswer:
        request = index_pb2.SearchBatchRequest(
            database=database_name(category, kind), signatures=signatures, top_k=top_k, one_per_group=True
        )
        if filter is not None:
            request.filter.CopyFrom(filter_to_proto(filter))
        if spatial is not None:
            request.spatial_rerank.CopyFrom(
                index_pb2.SpatialRerank(top_k=spatial.top_k, query_expansion=spatial.query_expansion)
            )
        backend = self._backend(category)
        end = time.monotonic() + timeout_s
        backend.wait_ready(min(self._ready_wait_s, timeout_s / 4))
        try:
            response = backend.stub.SearchBatch(request, timeout=max(end - time.monotonic(), 0.001))
        except grpc.RpcError as exc:
            self._failed(backend, exc)
            raise_from(f"index at {backend.address} ({category!r})", exc)
        degraded = None
        if response.degraded:
            degraded = Degraded(
                response.degraded_reason,
                [(r.first, r.end) for r in response.missing_word_ranges],
                list(response.missing_shards),
            )
        return BatchAnswer([[_match(item) for item in hits.items] for hits in response.results], degraded)

    def writer(self, timeout_s: float) -> GrpcCatalogueWriter:
        return GrpcCatalogueWriter(self, time.monotonic() + timeout_s)

    def delete_products(
        self, product_ids: Sequence[str], categories: Sequence[str] | None, timeout_s: float
    ) -> tuple[int, list[str]]:
        self.invalidate()
        held = {kind: self.categories(kind) for kind in KIND_VALUES}
        down = self.unreachable()
        wanted = set(categories) if categories is not None else set().union(*held.values())
        # Deleting around a backend that does not answer would report its products as not found:
        # refuse before deleting anything.
        blocking = [f for f in down if f.category in wanted or categories is None]
        if blocking:
            names = sorted({f.category for f in blocking if f.category})
            raise Unavailable(
                f"nothing was deleted: {blocking[0].reason}"
                + (f" (categories {names[:8]})" if names else "")
                + "; retry when it is back, or name only categories held elsewhere"
            )
        deleted_images = 0
        found: set[str] = set()
        for category in sorted(wanted):
            per_kind = 0
            for kind, present in held.items():
                if category not in present:
                    continue
                backend = self._backend(category)
                try:
                    response = backend.stub.Delete(
                        index_pb2.DeleteRequest(database=database_name(category, kind), group_ids=list(product_ids)),
                        timeout=timeout_s,
                    )
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        continue
                    self._failed(backend, exc)
                    raise_from(f"index at {backend.address} ({category!r}, after {deleted_images} images deleted)", exc)
                # Every kind holds the same images: count them once.
                per_kind = max(per_kind, response.deleted)
                missing = set(response.groups_not_found)
                found.update(p for p in product_ids if p not in missing)
            deleted_images += per_kind
        self.invalidate()
        return deleted_images, [p for p in product_ids if p not in found]

    def _call(self, category: str, what: str, method: str, request: Any, timeout_s: float) -> Any:
        """One unary call to the backend holding `category`, its failure as a domain error."""
        backend = self._backend(category)
        try:
            return getattr(backend.stub, method)(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            self._failed(backend, exc)
            raise_from(f"index at {backend.address} ({what})", exc)

    def list_products(
        self,
        category: str,
        kind: str,
        product_ids: Sequence[str],
        filter: Filter | None,
        page_size: int,
        page_token: str,
        timeout_s: float,
    ) -> ProductPage:
        request = index_pb2.ListGroupsRequest(
            database=database_name(category, kind),
            group_ids=list(product_ids),
            page_size=page_size,
            page_token=page_token,
        )
        if filter is not None:
            request.filter.CopyFrom(filter_to_proto(filter))
        response = self._call(category, f"{category!r}", "ListGroups", request, timeout_s)
        return ProductPage([_product(group) for group in response.groups], response.next_page_token, response.total)

    def update_products(
        self, category: str, kind: str, attributes: dict[str, ProductAttributes], timeout_s: float
    ) -> list[str]:
        request = index_pb2.UpdateGroupsRequest(
            database=database_name(category, kind),
            groups=[
                index_pb2.GroupAttributes(group_id=product_id, attributes=attributes_to_proto(value))
                for product_id, value in attributes.items()
            ],
        )
        response = self._call(category, f"{category!r}", "UpdateGroups", request, timeout_s)
        return list(response.not_found)

    def purge_products(
        self, category: str, kind: str, filter: Filter | None, timeout_s: float
    ) -> tuple[list[str], int]:
        request = index_pb2.DeleteRequest(database=database_name(category, kind))
        request.where.SetInParent()  # set, even empty: an empty filter passes every product
        request.where.CopyFrom(filter_to_proto(filter))
        try:
            response = self._call(category, f"{category!r}", "Delete", request, timeout_s)
        finally:
            self.invalidate()
        return list(response.groups_deleted), response.deleted

    def thumbnails(self, category: str, kind: str, item_ids: Sequence[str], timeout_s: float) -> dict[str, bytes]:
        request = index_pb2.GetItemImagesRequest(database=database_name(category, kind), item_ids=list(item_ids))
        response = self._call(category, f"{category!r}", "GetItemImages", request, timeout_s)
        return {image.item_id: image.thumbnail for image in response.images}

    def local_features(
        self, category: str, kind: str, item_ids: Sequence[str], timeout_s: float
    ) -> dict[str, Features]:
        request = index_pb2.GetItemImagesRequest(
            database=database_name(category, kind), item_ids=list(item_ids), local_features=True, no_thumbnails=True
        )
        response = self._call(category, f"{category!r}", "GetItemImages", request, timeout_s)
        found = {}
        for image in response.images:
            if image.HasField("local_features"):
                with contextlib.suppress(LocalFeaturesError):  # the index checked them at Add
                    found[image.item_id] = features_from_proto(image.local_features)
        return found

    def databases(self, timeout_s: float) -> list[DatabaseInfo]:
        calls = [(b, b.stub.Stats.future(index_pb2.StatsRequest(), timeout=timeout_s)) for b in self._backends.values()]
        out = []
        for backend, call in calls:
            try:
                stats = call.result()
            except grpc.RpcError as exc:
                self._failed(backend, exc)
                raise_from(f"index at {backend.address} (Stats)", exc)
            for database in stats.databases:
                category, _, kind = database.name.rpartition(".")
                # A category routed elsewhere that this backend also holds is not the catalogue's.
                if not category or kind not in KIND_VALUES or self._backend(category) is not backend:
                    continue
                out.append(
                    DatabaseInfo(
                        category,
                        cast(SignatureKind, kind),
                        database.items,
                        database.groups,
                        database.index_type,
                        database.memory_bytes,
                        backend.address,
                    )
                )
        return out


class _AddStream:
    """One backend's Add stream for one ingestion, fed from a queue as entries come."""

    _END = object()

    def __init__(self, backend: _IndexBackend, timeout_s: float):
        self.backend = backend
        self.categories: set[str] = set()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.call = backend.stub.Add.future(self._requests(), timeout=timeout_s)

    def _requests(self) -> Iterator[index_pb2.AddRequest]:
        while (request := self._queue.get()) is not self._END:
            yield request

    def check(self) -> None:
        """Raises the stream's error when it has already ended (a backend that failed or went away)."""
        if self.call.done():
            try:
                self.call.result(timeout=0)
            except grpc.RpcError as exc:
                raise_from(f"index at {self.backend.address}", exc)
            raise Internal(f"the index at {self.backend.address} ended an Add stream before it was closed")

    def send(self, requests: list[index_pb2.AddRequest]) -> None:
        for request in requests:
            self._queue.put(request)

    def end(self) -> None:
        """Ends the stream normally: the backend then stores it."""
        self._queue.put(self._END)

    def outcome(self) -> Exception | None:
        """Waits for the backend's answer -> None once it has stored the stream, else its error."""
        try:
            self.call.result()
        except grpc.RpcError as exc:
            try:
                raise_from(f"index at {self.backend.address}", exc)
            except Exception as error:
                return error
        except grpc.FutureCancelledError:
            return Unavailable(f"the Add stream to the index at {self.backend.address} was cancelled")
        return None

    def cancel(self) -> None:
        self.call.cancel()  # the backend sees the stream cancelled and stores nothing of it
        self._queue.put(self._END)  # and grpc's thread reading the queue ends


class GrpcCatalogueWriter:
    """gateway.ports.CatalogueWriter: one Add stream per index backend, opened at its first entry
    and kept open until the ingestion ends (a backend stores an Add stream only when it ends
    normally, so closing per batch would acknowledge what the gateway has not)."""

    def __init__(self, index: GrpcIndex, end: float):
        self._index = index
        self._end = end
        self._streams: dict[str, _AddStream] = {}

    def add(self, entries: Sequence[CatalogueEntry]) -> None:
        by_backend: dict[str, list[index_pb2.AddRequest]] = {}
        for entry in entries:
            backend = self._index._backend(entry.category)
            request = index_pb2.AddRequest(
                item_id=item_id_of(entry.product_id, entry.image_id),
                database=database_name(entry.category, entry.kind),
                signature=entry.signature,
                metadata=entry.metadata,
                group_id=entry.product_id,
                box=box_to_proto(entry.box),
                thumbnail=entry.thumbnail,
            )
            if entry.local_features is not None:
                request.local_features.CopyFrom(features_to_proto(entry.local_features))
            if entry.attributes is not None:
                request.attributes.CopyFrom(attributes_to_proto(entry.attributes))
            by_backend.setdefault(backend.address, []).append(request)
        for address in by_backend:  # nothing is sent when one of the streams has already failed
            if address in self._streams:
                self._streams[address].check()
        for address, requests in by_backend.items():
            stream = self._streams.get(address)
            if stream is None:
                stream = self._streams[address] = _AddStream(
                    self._index._backends[address], max(self._end - time.monotonic(), 0.001)
                )
            stream.categories.update(e.category for e in entries if self._index.backend_of(e.category) == address)
            stream.send(requests)

    def commit(self) -> dict[str, Exception]:
        failed: dict[str, Exception] = {}
        try:
            for stream in self._streams.values():
                stream.end()  # every backend commits at once, not one after the other
            for stream in self._streams.values():
                error = stream.outcome()
                if error is not None:
                    failed.update((category, error) for category in stream.categories)
        finally:
            self._index.invalidate()
        return failed

    def cancel(self) -> None:
        for stream in self._streams.values():
            stream.cancel()
        self._index.invalidate()


def _image_id(item: index_pb2.ScoredItem | index_pb2.LookedUpItem) -> str:
    group = item.group_id
    prefix = group + "/"
    return item.item_id[len(prefix) :] if group and item.item_id.startswith(prefix) else ""


def _match(item: index_pb2.ScoredItem) -> CatalogueMatch:
    metadata, uri = caller_metadata(dict(item.metadata))
    return CatalogueMatch(
        item.group_id or item.item_id,
        _image_id(item),
        item.score,
        metadata,
        box_from_proto(item.box) if item.HasField("box") else None,
        stored_attributes(item.attributes),
        uri,
        first_stage_score=item.first_stage_score if item.reranked else None,
        window=box_from_proto(item.window) if item.reranked and item.HasField("window") else None,
    )


def _product(group: index_pb2.GroupInfo) -> CatalogueProduct:
    images = []
    for item in group.items:
        metadata, uri = caller_metadata(dict(item.metadata))
        box = box_from_proto(item.box) if item.HasField("box") else None
        images.append(CatalogueImageInfo(_image_id(item) or item.item_id, metadata, box, uri))
    images.sort(key=lambda image: image.image_id)
    return CatalogueProduct(group.group_id, stored_attributes(group.attributes), images)


# Calls retried on UNAVAILABLE on another replica (common.channels.service_config): those that
# change nothing. Never Add, Delete, UpdateGroups, LoadModel, UnloadModel: a write whose answer was lost may have
# been applied, and the router (not round_robin) writes to every replica of an index shard.
DETECTOR_SERVICE = detector_pb2.DESCRIPTOR.services_by_name["DetectorService"].full_name
SIGNATURE_SERVICE = signature_pb2.DESCRIPTOR.services_by_name["SignatureService"].full_name
INDEX_SERVICE = index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name
IDEMPOTENT: dict[str, tuple[str, ...]] = {
    DETECTOR_SERVICE: ("Detect", "ListModels"),
    SIGNATURE_SERVICE: ("ComputeSignatures", "ListKinds", "LocateObjects", "ListModels"),
    INDEX_SERVICE: ("Search", "SearchBatch", "PartialScores", "Lookup", "Stats", "ListGroups", "GetItemImages"),
}


class Backends:
    """Every channel the gateway opens, and the ports over them. The detector and the signature
    service are stateless: each address may name several replicas, spread by round_robin over the
    healthy ones with retries of idempotent calls (common.channels.balanced_channel). An index
    address is one shard or router; its channel has the same health checking and read retries."""

    def __init__(
        self,
        detector_address: str,
        signature_address: str,
        index_address: str,
        index_routes: dict[str, str],
        security: ServerConfig,
        catalogue_refresh_s: float = 5.0,
        index_ready_wait_s: float = 0.3,
    ):
        """`security`: the gateway's config, for TLS and the internal credential (common.channels)."""
        self._channels: dict[tuple[str, str], grpc.Channel] = {}

        def channel(service: str, address: str) -> grpc.Channel:
            if (service, address) not in self._channels:
                self._channels[service, address] = balanced_channel(address, security, service, IDEMPOTENT[service])
            return self._channels[service, address]

        self.detector = GrpcDetector(channel(DETECTOR_SERVICE, detector_address))
        self.locator = GrpcLocator(channel(SIGNATURE_SERVICE, signature_address))
        self.signer = GrpcSigner(channel(SIGNATURE_SERVICE, signature_address))
        index_channels = {
            address: channel(INDEX_SERVICE, address) for address in [index_address, *index_routes.values()]
        }
        self.index = GrpcIndex(index_channels, index_address, index_routes, catalogue_refresh_s, index_ready_wait_s)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
