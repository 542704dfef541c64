"""IndexService servicer of one shard: messages -> domain values (index_server.convert) for the
catalogue and back. Refusals are domain errors (common.errors), raised here or by the logic
called; the server's interceptor (common.interceptors) turns each into its status and details."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import grpc
import numpy as np

from common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, ServiceError, Unavailable, quote
from common.limits import check_id
from common.names import check_name
from common.streams import client_stream
from common.telemetry import BATCH_SIZE
from index_server.blcf import BlcfIndex
from index_server.catalogue import Catalogue, Database, refused_item
from index_server.convert import (
    after_token,
    attributes_of,
    attributes_to_proto,
    filter_of,
    item_of,
    looked_up_item,
    page_size_of,
    page_token,
    request_filter,
    scored_item,
    signature_value,
    spatial_rerank_of,
)
from index_server.dense import DenseDatabase
from index_server.domain import Filter, ProductAttributes, Rerank, SignatureError, Value
from index_server.inverted import BowIndex
from index_server.limits import check_stream_length, check_top_k
from index_server.log_codec import add_record
from index_server.replication import ReplicaStatus, WriteTracker, replication_stream, tracked_write
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc


class IndexService(index_pb2_grpc.IndexServiceServicer):
    def __init__(
        self,
        catalogue: Catalogue,
        chunk_size: int = 64,
        max_top_k: int = 1000,
        partial_chunk: int = 65_536,
        max_batch: int = 256,
        replica: ReplicaStatus | None = None,
        replicate_chunk_bytes: int = 1 << 20,
        replicate_settle_s: float = 600.0,
        max_message_bytes: int = 32 << 20,
        cancel_settle_s: float = 0.005,
        max_rerank_k: int = 200,
    ):
        self.catalogue = catalogue
        # BLCF spatial re-ranking: the most items one search re-scores by windows.
        self.max_rerank_k = max_rerank_k
        # Answers above it would fail in transit: refused first, saying how to ask for less.
        self.max_message_bytes = max_message_bytes
        self.cancel_settle_s = cancel_settle_s
        # Replication (index_server.replication): whether reads wait for a catch-up, the writes in
        # flight (a copy for a fellow replica waits for them), and how copies are streamed.
        self.replica = replica or ReplicaStatus()
        self.writes = WriteTracker()
        self.replicate_chunk_bytes = replicate_chunk_bytes
        self.replicate_settle_s = replicate_settle_s
        self.max_batch = max_batch
        self.chunk_size = chunk_size
        self.max_top_k = max_top_k
        self.partial_chunk = partial_chunk

    @tracked_write
    def Add(
        self, request_iterator: Iterator[index_pb2.AddRequest], context: grpc.ServicerContext
    ) -> index_pb2.AddResponse:
        """All or nothing: each item is checked as it arrives (the first refused one ends the call,
        naming it), and the stream is committed, in one fsynced log transaction, only once the
        client has ended it; a cancel or a broken connection stores nothing (client_stream raises
        Cancelled: nobody waits for that answer)."""
        limits = self.catalogue.limits
        stream = self.catalogue.stream()
        for request in client_stream(request_iterator, context, self.cancel_settle_s):
            check_stream_length(len(stream) + 1, limits)
            try:
                # A database stored before names were checked stays writable by its name.
                item = item_of(request, limits, check_database_name=not self.catalogue.holds(request.database))
            except ServiceError as exc:
                raise refused_item(len(stream), request.item_id, exc) from None
            stream.stage(item, add_record(request))
        added, replaced = self.catalogue.commit(stream)
        BATCH_SIZE.labels("index", "add_stream_items").observe(added)
        return index_pb2.AddResponse(added=added, replaced=replaced)

    @tracked_write
    def Delete(self, request: index_pb2.DeleteRequest, context: grpc.ServicerContext) -> index_pb2.DeleteResponse:
        if not self.catalogue.deferring:  # catching up: logged whole, whatever is held here
            self._database(request.database)
        # An empty `where` passes every group (it empties the database); unset deletes by it nothing.
        where = (filter_of(request.where, "where") or Filter()) if request.HasField("where") else None
        deleted = self.catalogue.delete(request.database, list(request.item_ids), list(request.group_ids), where)
        return index_pb2.DeleteResponse(
            deleted=deleted.deleted,
            not_found=deleted.not_found,
            groups_not_found=deleted.groups_not_found,
            groups_deleted=deleted.groups_deleted,
        )

    @tracked_write
    def UpdateGroups(
        self, request: index_pb2.UpdateGroupsRequest, context: grpc.ServicerContext
    ) -> index_pb2.UpdateGroupsResponse:
        if not self.catalogue.deferring:
            self._database(request.database)
        limits = self.catalogue.limits
        if len(request.groups) > limits.max_items_per_stream:
            raise ResourceExhausted(
                f"{len(request.groups)} groups are above the limit of {limits.max_items_per_stream} per "
                "UpdateGroups: split the update (nothing of this one was stored)",
                quota=[("max_items_per_stream", f"at most {limits.max_items_per_stream} groups per UpdateGroups")],
            )
        attributes: dict[str, ProductAttributes] = {}
        for i, group in enumerate(request.groups):
            check_id(f"groups[{i}].group_id", group.group_id, limits.max_id_bytes, required=True)
            attributes[group.group_id] = attributes_of(group.attributes, f"groups[{i}].attributes")  # the last wins
        updated, not_found = self.catalogue.update(request.database, attributes)
        return index_pb2.UpdateGroupsResponse(updated=updated, not_found=not_found)

    def ListGroups(
        self, request: index_pb2.ListGroupsRequest, context: grpc.ServicerContext
    ) -> index_pb2.ListGroupsResponse:
        self._serve_reads()
        self._database(request.database)
        page_size = page_size_of(request.page_size)
        after = after_token(request.page_token)
        filter = filter_of(request.filter) if request.HasField("filter") else None
        page = self.catalogue.list_groups(request.database, list(request.group_ids), filter, page_size, after)
        response = index_pb2.ListGroupsResponse(
            groups=[
                index_pb2.GroupInfo(
                    group_id=group,
                    attributes=attributes_to_proto(attributes),
                    items=[looked_up_item(0, hit) for hit in hits],
                )
                for group, attributes, hits in page.groups
            ],
            next_page_token=page_token(page.last),
            total=page.total,
        )
        self._check_size(response, "ask for a smaller page_size")
        return response

    def GetItemImages(
        self, request: index_pb2.GetItemImagesRequest, context: grpc.ServicerContext
    ) -> index_pb2.GetItemImagesResponse:
        self._serve_reads()
        self._database(request.database)
        found = self.catalogue.images(
            request.database,
            list(dict.fromkeys(request.item_ids)),
            thumbnails=not request.no_thumbnails,
            local_features=request.local_features,
        )
        response = index_pb2.GetItemImagesResponse()
        for item_id, thumbnail, features in found:
            image = response.images.add(item_id=item_id, thumbnail=thumbnail)
            if features:
                image.local_features.ParseFromString(features)
        self._check_size(response, "ask for fewer items per call")
        return response

    def Search(
        self, request: index_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.SearchResponse]:
        self._serve_reads()
        top_k = check_top_k(request.top_k, self.max_top_k)
        database, value = self._query(request.database, request.signature)
        filter = request_filter(request)
        rerank = self._rerank(request, database)
        if isinstance(database, BlcfIndex):
            hits = database.search(value, top_k, request.one_per_group, filter, rerank)  # type: ignore[arg-type]  # _checked: its kind
        else:
            hits = database.search(value, top_k, request.one_per_group, filter)  # type: ignore[arg-type]  # _checked: its kind
        # At least one message, even with no hits (a router's first message carries its flags).
        for start in range(0, max(len(hits), 1), self.chunk_size):
            yield index_pb2.SearchResponse(items=[scored_item(h) for h in hits[start : start + self.chunk_size]])

    def SearchBatch(
        self, request: index_pb2.SearchBatchRequest, context: grpc.ServicerContext
    ) -> index_pb2.SearchBatchResponse:
        self._serve_reads()
        top_k = check_top_k(request.top_k, self.max_top_k)
        if not request.signatures:
            raise InvalidArgument("signatures is empty: send at least one query")
        if len(request.signatures) > self.max_batch:
            raise ResourceExhausted(
                f"{len(request.signatures)} queries are above this shard's batch limit of "
                f"{self.max_batch}: split the batch",
                quota=[("max_batch", f"at most {self.max_batch} queries per SearchBatch")],
            )
        kind, database = self._database(request.database)
        values = [
            self._checked(
                request.database,
                kind,
                database,
                signature,
                f"signature #{i}: " if len(request.signatures) > 1 else "",
            )
            for i, signature in enumerate(request.signatures)
        ]
        BATCH_SIZE.labels("index", "search_batch_queries").observe(len(values))
        # A dense database answers the whole batch with one FAISS search (a matrix product).
        filter = request_filter(request)
        rerank = self._rerank(request, database)
        if isinstance(database, BlcfIndex):
            results = database.search_batch(values, top_k, request.one_per_group, filter, rerank)  # type: ignore[arg-type]  # _checked: its kind
        else:
            results = database.search_batch(values, top_k, request.one_per_group, filter)  # type: ignore[arg-type]  # _checked: its kind
        response = index_pb2.SearchBatchResponse(
            results=[index_pb2.SearchHits(items=[scored_item(h) for h in hits]) for hits in results]
        )
        self._check_size(response, "send fewer queries per batch or ask for a smaller top_k")
        return response

    def PartialScores(
        self, request: index_pb2.PartialScoresRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.PartialScoresResponse]:
        self._serve_reads()
        database, value = self._query(request.database, request.signature)
        if not isinstance(database, BowIndex | BlcfIndex):
            raise InvalidArgument(
                f"database {quote(request.database)} is dense: partial scores exist only for "
                "bag-of-words and BLCF databases (use Search)"
            )
        groups = None
        filter = request_filter(request)
        if request.with_groups:
            keys, sums, groups = database.partial_scores_with_groups(value, filter)  # type: ignore[arg-type]  # _checked: its kind
            groups = groups.astype("<u8")
        else:
            keys, sums = database.partial_scores_by_key(value, filter)  # type: ignore[arg-type]  # _checked: its kind
        keys, sums = keys.astype("<u8"), sums.astype("<f4")
        word_range = common_pb2.WordRange(first=database.word_range[0], end=database.word_range[1])
        for start in range(0, max(len(keys), 1), self.partial_chunk):
            end = start + self.partial_chunk
            yield index_pb2.PartialScoresResponse(
                keys=keys[start:end].tobytes(),
                sums=sums[start:end].tobytes(),
                word_range=word_range if start == 0 else None,
                groups=groups[start:end].tobytes() if groups is not None else b"",
            )

    def Lookup(self, request: index_pb2.LookupRequest, context: grpc.ServicerContext) -> index_pb2.LookupResponse:
        self._serve_reads()
        _, database = self._database(request.database)
        if not isinstance(database, BowIndex | BlcfIndex):
            raise InvalidArgument(
                f"database {quote(request.database)} is dense: items are named by key only in bag-of-words "
                "and BLCF databases"
            )
        found = database.lookup(np.fromiter(request.keys, np.uint64, len(request.keys)))
        response = index_pb2.LookupResponse(items=[looked_up_item(key, hit) for key, hit in found.items()])
        self._check_size(response, "send fewer keys per Lookup")
        return response

    def Stats(self, request: index_pb2.StatsRequest, context: grpc.ServicerContext) -> index_pb2.StatsResponse:
        self._serve_reads()
        return index_pb2.StatsResponse(
            databases=[
                index_pb2.DatabaseStats(
                    name=d.name,
                    kind=cast(common_pb2.SignatureKind, d.kind),  # a SignatureKind number
                    dimension=d.dimension,
                    items=d.items,
                    broken_reason=d.broken_reason,
                    groups=d.groups,
                    index_type=d.index_type,
                    memory_bytes=d.memory_bytes,
                )
                for d in self.catalogue.stats()
            ]
        )

    def Replicate(
        self, request: index_pb2.ReplicateRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.ReplicateResponse]:
        if self.catalogue.deferring:
            raise FailedPrecondition(
                f"this replica is catching up from {self.replica.source or 'its peers'} itself: copy another one"
            )
        settings = self.catalogue.settings
        if request.word_shard_count and (request.word_shard_index, request.word_shard_count) != (
            settings.word_shard_index,
            settings.word_shard_count,
        ):
            raise FailedPrecondition(
                f"this shard holds word range {settings.word_shard_index} of {settings.word_shard_count}, "
                f"not {request.word_shard_index} of {request.word_shard_count}: "
                f"{request.replica or 'the caller'} is not a replica of this shard (check --peers)"
            )
        min_tail_s = min(request.min_tail_ms / 1000, self.replicate_settle_s)
        yield from replication_stream(
            self.catalogue,
            self.writes,
            min_tail_s,
            self.replicate_chunk_bytes,
            self.replicate_settle_s,
            context.is_active,
        )

    def _rerank(
        self, request: index_pb2.SearchRequest | index_pb2.SearchBatchRequest, database: Database
    ) -> Rerank | None:
        """The request's spatial re-ranking, checked: InvalidArgument for one a database other than
        BLCF is asked for, or one out of its limits."""
        if not request.HasField("spatial_rerank"):
            return None
        batch = isinstance(request, index_pb2.SearchBatchRequest)
        rerank = spatial_rerank_of(request.spatial_rerank, self.max_rerank_k, in_batch=batch)
        if rerank is not None and not isinstance(database, BlcfIndex):
            kind = "dense" if isinstance(database, DenseDatabase) else "bag-of-words"
            raise InvalidArgument(
                f"spatial_rerank applies to SIGNATURE_KIND_BLCF databases; {quote(request.database)} is {kind}: "
                "leave spatial_rerank unset",
                violations=[("spatial_rerank", "only for SIGNATURE_KIND_BLCF databases")],
            )
        return rerank

    def _serve_reads(self) -> None:
        refusal = self.replica.read_refusal()
        if refusal is not None:
            raise Unavailable(refusal)

    def _check_size(
        self,
        response: index_pb2.SearchBatchResponse
        | index_pb2.LookupResponse
        | index_pb2.ListGroupsResponse
        | index_pb2.GetItemImagesResponse,
        remedy: str,
    ) -> None:
        """ResourceExhausted when the answer would be above max_message_bytes (it would fail in
        transit), saying how to ask for less."""
        size = response.ByteSize()
        if size > self.max_message_bytes:
            raise ResourceExhausted(
                f"the answer is {size} bytes, above the message limit of {self.max_message_bytes}: {remedy}",
                quota=[("max_message_bytes", f"answers of at most {self.max_message_bytes} bytes")],
            )

    def _database(self, name: str) -> tuple[int, Database]:
        """(kind, database): InvalidArgument for a name no database could have, NotFound (saying how
        a database is created, never which ones exist), FailedPrecondition for one that could not
        be loaded."""
        if not self.catalogue.holds(name):  # a database stored before names were checked stays reachable
            check_name("database", name)
        return self.catalogue.get(name)

    def _query(self, name: str, signature: common_pb2.Signature) -> tuple[Database, Value]:
        """The database and the decoded query signature, checked against each other."""
        kind, database = self._database(name)
        return database, self._checked(name, kind, database, signature)

    def _checked(
        self, name: str, kind: int, database: Database, signature: common_pb2.Signature, prefix: str = ""
    ) -> Value:
        """The decoded signature, checked against its database; InvalidArgument otherwise, its
        message after `prefix` (which query of a batch)."""
        try:
            value = signature_value(signature)
            if signature.kind != kind:
                raise SignatureError(
                    f"database {quote(name)} holds {common_pb2.SignatureKind.Name(kind)} "
                    f"signatures, not {common_pb2.SignatureKind.Name(signature.kind)}"
                )
            database.check(value)  # type: ignore[arg-type]  # a value of the database's kind
        except InvalidArgument as exc:
            raise exc.reworded(prefix + exc.message) from None
        return value
