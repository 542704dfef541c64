"""IndexService servicer of one shard: protobuf <-> numpy, errors -> status codes."""

from __future__ import annotations

import itertools
from typing import Iterator

import grpc
import numpy as np

from index_server.catalogue import AddFailed, Catalogue, Database, UnknownDatabase, Value, signature_value
from index_server.convert import looked_up_item, scored_item
from index_server.inverted import BowIndex, SignatureError
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc


class IndexService(index_pb2_grpc.IndexServiceServicer):
    def __init__(self, catalogue: Catalogue, chunk_size: int = 64, max_top_k: int = 1000,
                 write_batch: int = 256, partial_chunk: int = 65_536, max_batch: int = 256):
        self.catalogue = catalogue
        self.max_batch = max_batch
        self.chunk_size = chunk_size
        self.max_top_k = max_top_k
        self.write_batch = write_batch
        self.partial_chunk = partial_chunk

    def Add(self, request_iterator: Iterator[index_pb2.AddRequest], context: grpc.ServicerContext
            ) -> index_pb2.AddResponse:
        added = replaced = 0
        requests = iter(request_iterator)
        while batch := list(itertools.islice(requests, self.write_batch)):
            bad = next((i for i, r in enumerate(batch) if not r.item_id or not r.database), None)
            done, again = self._add_checked(batch if bad is None else batch[:bad], added, context)
            added += done
            replaced += again
            if bad is not None:  # the items before it are added, and the message says so
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"item #{added} ({batch[bad].item_id!r}): item_id and database are "
                              f"required; the {added} items before it were added")
        return index_pb2.AddResponse(added=added, replaced=replaced)

    def _add_checked(self, batch: list[index_pb2.AddRequest], before: int, context: grpc.ServicerContext
                     ) -> tuple[int, int]:
        try:
            return self.catalogue.add(batch)
        except AddFailed as failed:
            request = batch[failed.position]
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"item #{before + failed.position} ({request.item_id!r}): {failed.error}; the "
                          f"{before + failed.added} items before it were added")
        raise AssertionError("context.abort returns only by raising")

    def Delete(self, request: index_pb2.DeleteRequest, context: grpc.ServicerContext
               ) -> index_pb2.DeleteResponse:
        self._database(request.database, context)
        deleted = self.catalogue.delete(request.database, list(request.item_ids), list(request.group_ids))
        return index_pb2.DeleteResponse(deleted=deleted.deleted, not_found=deleted.not_found,
                                        groups_not_found=deleted.groups_not_found)

    def Search(self, request: index_pb2.SearchRequest, context: grpc.ServicerContext
               ) -> Iterator[index_pb2.SearchResponse]:
        top_k = self._top_k(request.top_k, context)
        database, value = self._query(request.database, request.signature, context)
        hits = database.search(value, top_k, request.one_per_group)  # type: ignore[arg-type]
        # At least one message, even with no hits (a router's first message carries its flags).
        for start in range(0, max(len(hits), 1), self.chunk_size):
            yield index_pb2.SearchResponse(items=[scored_item(h) for h in hits[start:start + self.chunk_size]])

    def SearchBatch(self, request: index_pb2.SearchBatchRequest, context: grpc.ServicerContext
                    ) -> index_pb2.SearchBatchResponse:
        top_k = self._top_k(request.top_k, context)
        if not request.signatures:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "signatures is empty: send at least one query")
        if len(request.signatures) > self.max_batch:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{len(request.signatures)} queries are above this shard's batch limit of "
                          f"{self.max_batch}: split the batch")
        kind, database = self._database(request.database, context)
        values = [self._checked(request.database, kind, database, signature, context,
                                f"signature #{i}: " if len(request.signatures) > 1 else "")
                  for i, signature in enumerate(request.signatures)]
        # A dense database answers the whole batch with one FAISS search (a matrix product).
        results = database.search_batch(values, top_k, request.one_per_group)  # type: ignore[arg-type]
        return index_pb2.SearchBatchResponse(results=[
            index_pb2.SearchHits(items=[scored_item(h) for h in hits]) for hits in results])

    def PartialScores(self, request: index_pb2.PartialScoresRequest, context: grpc.ServicerContext
                      ) -> Iterator[index_pb2.PartialScoresResponse]:
        database, value = self._query(request.database, request.signature, context)
        if not isinstance(database, BowIndex):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"database {request.database!r} is dense: partial scores exist only for "
                          "bag-of-words databases (use Search)")
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
            yield index_pb2.PartialScoresResponse(keys=keys[start:end].tobytes(), sums=sums[start:end].tobytes(),
                                                  word_range=word_range if start == 0 else None,
                                                  groups=groups[start:end].tobytes() if groups is not None else b"")

    def Lookup(self, request: index_pb2.LookupRequest, context: grpc.ServicerContext
               ) -> index_pb2.LookupResponse:
        _, database = self._database(request.database, context)
        if not isinstance(database, BowIndex):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"database {request.database!r} is dense: items are named by key only in "
                          "bag-of-words databases")
            raise AssertionError("context.abort returns only by raising")
        found = database.lookup(np.fromiter(request.keys, np.uint64, len(request.keys)))
        return index_pb2.LookupResponse(items=[looked_up_item(key, hit) for key, hit in found.items()])

    def Stats(self, request: index_pb2.StatsRequest, context: grpc.ServicerContext
              ) -> index_pb2.StatsResponse:
        return index_pb2.StatsResponse(databases=[
            index_pb2.DatabaseStats(name=d.name, kind=d.kind, dimension=d.dimension, items=d.items)
            for d in self.catalogue.stats()])

    def _top_k(self, requested: int, context: grpc.ServicerContext) -> int:
        top_k = requested or 10
        if top_k > self.max_top_k:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"top_k {top_k} is above this shard's limit of {self.max_top_k}")
        return top_k

    def _database(self, name: str, context: grpc.ServicerContext) -> tuple[int, Database]:
        if not name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "database is required")
        try:
            return self.catalogue.get(name)
        except UnknownDatabase:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"database {name!r} does not exist on this shard; it has "
                          f"{self.catalogue.names()} (a database is created by its first Add)")
            raise AssertionError("context.abort returns only by raising")

    def _query(self, name: str, signature: common_pb2.Signature, context: grpc.ServicerContext):
        """The database and the decoded query signature, checked against each other."""
        kind, database = self._database(name, context)
        return database, self._checked(name, kind, database, signature, context)

    def _checked(self, name: str, kind: int, database: Database, signature: common_pb2.Signature,
                 context: grpc.ServicerContext, prefix: str = "") -> Value:
        """The decoded signature, checked against its database; INVALID_ARGUMENT otherwise."""
        try:
            value = signature_value(signature)
            if signature.kind != kind:
                raise SignatureError(f"database {name!r} holds {common_pb2.SignatureKind.Name(kind)} "
                                     f"signatures, not {common_pb2.SignatureKind.Name(signature.kind)}")
            database.check(value)  # type: ignore[arg-type]
        except SignatureError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, prefix + str(exc))
        return value
