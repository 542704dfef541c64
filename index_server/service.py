"""IndexService servicer of one shard: protobuf <-> numpy, errors -> status codes."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np

from common.errors import quote
from common.names import check_name
from common.serving import abort_on
from common.streams import StreamEnd
from common.telemetry import BATCH_SIZE
from index_server.catalogue import Catalogue, Database, Value, signature_value
from index_server.convert import looked_up_item, scored_item
from index_server.domain import SignatureError
from index_server.inverted import BowIndex
from index_server.limits import check_top_k
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
    ):
        self.catalogue = catalogue
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
        client has ended it; a cancel or a broken connection stores nothing."""
        end = StreamEnd(context)
        with abort_on(context):
            stream = self.catalogue.stream()
            try:
                for request in request_iterator:  # on a cancel: raises grpc.RpcError, or ends (streams.py)
                    stream.stage(request)
            except grpc.RpcError:
                return index_pb2.AddResponse()  # cancelled: nothing stored, and nobody waits for this
            if not end.completed(self.cancel_settle_s):
                return index_pb2.AddResponse()  # cancelled: nothing stored, and nobody waits for this
            added, replaced = self.catalogue.commit(stream)
        BATCH_SIZE.labels("index", "add_stream_items").observe(added)
        return index_pb2.AddResponse(added=added, replaced=replaced)

    @tracked_write
    def Delete(self, request: index_pb2.DeleteRequest, context: grpc.ServicerContext) -> index_pb2.DeleteResponse:
        if not self.catalogue.deferring:  # catching up: logged whole, whatever is held here
            self._database(request.database, context)
        with abort_on(context):
            deleted = self.catalogue.delete(request.database, list(request.item_ids), list(request.group_ids))
        return index_pb2.DeleteResponse(
            deleted=deleted.deleted, not_found=deleted.not_found, groups_not_found=deleted.groups_not_found
        )

    def Search(
        self, request: index_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.SearchResponse]:
        self._serve_reads(context)
        top_k = self._top_k(request.top_k, context)
        database, value = self._query(request.database, request.signature, context)
        hits = database.search(value, top_k, request.one_per_group)  # type: ignore[arg-type]
        # At least one message, even with no hits (a router's first message carries its flags).
        for start in range(0, max(len(hits), 1), self.chunk_size):
            yield index_pb2.SearchResponse(items=[scored_item(h) for h in hits[start : start + self.chunk_size]])

    def SearchBatch(
        self, request: index_pb2.SearchBatchRequest, context: grpc.ServicerContext
    ) -> index_pb2.SearchBatchResponse:
        self._serve_reads(context)
        top_k = self._top_k(request.top_k, context)
        if not request.signatures:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "signatures is empty: send at least one query")
        if len(request.signatures) > self.max_batch:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(request.signatures)} queries are above this shard's batch limit of "
                f"{self.max_batch}: split the batch",
            )
        kind, database = self._database(request.database, context)
        values = [
            self._checked(
                request.database,
                kind,
                database,
                signature,
                context,
                f"signature #{i}: " if len(request.signatures) > 1 else "",
            )
            for i, signature in enumerate(request.signatures)
        ]
        BATCH_SIZE.labels("index", "search_batch_queries").observe(len(values))
        # A dense database answers the whole batch with one FAISS search (a matrix product).
        results = database.search_batch(values, top_k, request.one_per_group)  # type: ignore[arg-type]
        response = index_pb2.SearchBatchResponse(
            results=[index_pb2.SearchHits(items=[scored_item(h) for h in hits]) for hits in results]
        )
        self._check_size(response, "send fewer queries per batch or ask for a smaller top_k", context)
        return response

    def PartialScores(
        self, request: index_pb2.PartialScoresRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.PartialScoresResponse]:
        self._serve_reads(context)
        database, value = self._query(request.database, request.signature, context)
        if not isinstance(database, BowIndex):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"database {quote(request.database)} is dense: partial scores exist only for "
                "bag-of-words databases (use Search)",
            )
            raise AssertionError("context.abort returns only by raising")
        groups = None
        if request.with_groups:
            keys, sums, groups = database.partial_scores_with_groups(value)  # type: ignore[arg-type]
            groups = groups.astype("<u8")
        else:
            keys, sums = database.partial_scores_by_key(value)  # type: ignore[arg-type]
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
        self._serve_reads(context)
        _, database = self._database(request.database, context)
        if not isinstance(database, BowIndex):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"database {quote(request.database)} is dense: items are named by key only in bag-of-words databases",
            )
            raise AssertionError("context.abort returns only by raising")
        found = database.lookup(np.fromiter(request.keys, np.uint64, len(request.keys)))
        response = index_pb2.LookupResponse(items=[looked_up_item(key, hit) for key, hit in found.items()])
        self._check_size(response, "send fewer keys per Lookup", context)
        return response

    def Stats(self, request: index_pb2.StatsRequest, context: grpc.ServicerContext) -> index_pb2.StatsResponse:
        self._serve_reads(context)
        return index_pb2.StatsResponse(
            databases=[
                index_pb2.DatabaseStats(
                    name=d.name, kind=d.kind, dimension=d.dimension, items=d.items, broken_reason=d.broken_reason
                )
                for d in self.catalogue.stats()
            ]
        )

    def Replicate(
        self, request: index_pb2.ReplicateRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.ReplicateResponse]:
        if self.catalogue.deferring:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this replica is catching up from {self.replica.source or 'its peers'} itself: copy another one",
            )
        settings = self.catalogue.settings
        if request.word_shard_count and (request.word_shard_index, request.word_shard_count) != (
            settings.word_shard_index,
            settings.word_shard_count,
        ):
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this shard holds word range {settings.word_shard_index} of {settings.word_shard_count}, "
                f"not {request.word_shard_index} of {request.word_shard_count}: "
                f"{request.replica or 'the caller'} is not a replica of this shard (check --peers)",
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

    def _serve_reads(self, context: grpc.ServicerContext) -> None:
        refusal = self.replica.read_refusal()
        if refusal is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, refusal)

    def _top_k(self, requested: int, context: grpc.ServicerContext) -> int:
        with abort_on(context):
            return check_top_k(requested, self.max_top_k)
        raise AssertionError("context.abort returns only by raising")

    def _check_size(
        self,
        response: index_pb2.SearchBatchResponse | index_pb2.LookupResponse,
        remedy: str,
        context: grpc.ServicerContext,
    ) -> None:
        size = response.ByteSize()
        if size > self.max_message_bytes:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the answer is {size} bytes, above the message limit of {self.max_message_bytes}: {remedy}",
            )

    def _database(self, name: str, context: grpc.ServicerContext) -> tuple[int, Database]:
        """(kind, database): INVALID_ARGUMENT for a name no database could have, NOT_FOUND (saying
        how a database is created, never which ones exist), FAILED_PRECONDITION for one that could
        not be loaded."""
        with abort_on(context):
            if not self.catalogue.holds(name):  # a database stored before names were checked stays reachable
                check_name("database", name)
            return self.catalogue.get(name)
        raise AssertionError("context.abort returns only by raising")

    def _query(self, name: str, signature: common_pb2.Signature, context: grpc.ServicerContext):
        """The database and the decoded query signature, checked against each other."""
        kind, database = self._database(name, context)
        return database, self._checked(name, kind, database, signature, context)

    def _checked(
        self,
        name: str,
        kind: int,
        database: Database,
        signature: common_pb2.Signature,
        context: grpc.ServicerContext,
        prefix: str = "",
    ) -> Value:
        """The decoded signature, checked against its database; INVALID_ARGUMENT otherwise."""
        try:
            value = signature_value(signature)
            if signature.kind != kind:
                raise SignatureError(
                    f"database {quote(name)} holds {common_pb2.SignatureKind.Name(kind)} "
                    f"signatures, not {common_pb2.SignatureKind.Name(signature.kind)}"
                )
            database.check(value)  # type: ignore[arg-type]
        except SignatureError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, prefix + str(exc))
        return value
