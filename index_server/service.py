"""IndexService servicer: protobuf <-> numpy, errors -> status codes."""

from __future__ import annotations

from typing import Iterator

import grpc
import numpy as np

from common.bow_codec import BagOfWords, BowFormatError, decode
from index_server.catalogue import Catalogue, UnknownDatabase
from index_server.inverted import SignatureError
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc


def signature_value(signature: common_pb2.Signature) -> np.ndarray | BagOfWords:
    """A deep signature's dense vector or a bag-of-words signature's decoded bag; raises
    SignatureError when the signature is empty, malformed or of another kind."""
    if signature.kind == common_pb2.SIGNATURE_KIND_DEEP:
        if signature.WhichOneof("value") != "dense" or not signature.dense.values:
            raise SignatureError("signature is empty: a deep signature carries dense.values")
        return np.asarray(signature.dense.values, dtype=np.float32)
    if signature.kind == common_pb2.SIGNATURE_KIND_BOW:
        if signature.WhichOneof("value") != "bow" or not signature.bow:
            raise SignatureError("signature is empty: a bag-of-words signature carries bow bytes")
        try:
            return decode(signature.bow)
        except BowFormatError as exc:
            raise SignatureError(f"bag-of-words signature: {exc}") from None
    if signature.kind == common_pb2.SIGNATURE_KIND_UNSPECIFIED:
        raise SignatureError("signature kind is unspecified: set SIGNATURE_KIND_DEEP or SIGNATURE_KIND_BOW")
    raise SignatureError(f"signature kind {signature.kind} is unknown")


class IndexService(index_pb2_grpc.IndexServiceServicer):
    def __init__(self, catalogue: Catalogue, chunk_size: int, max_top_k: int):
        self.catalogue = catalogue
        self.chunk_size = chunk_size
        self.max_top_k = max_top_k

    def Add(self, request_iterator: Iterator[index_pb2.AddRequest], context: grpc.ServicerContext
            ) -> index_pb2.AddResponse:
        added = replaced = 0
        for position, request in enumerate(request_iterator):
            where = f"item #{position} ({request.item_id!r})"
            done = f"; the {added} items before it were added"
            if not request.item_id or not request.database:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{where}: item_id and database are required{done}")
            try:
                value = signature_value(request.signature)
                database = self.catalogue.get_or_create(request.database, request.signature.kind, value)
                replaced += database.add(request.item_id, value, dict(request.metadata))  # type: ignore[arg-type]
            except SignatureError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {exc}{done}")
            added += 1
        return index_pb2.AddResponse(added=added, replaced=replaced)

    def Delete(self, request: index_pb2.DeleteRequest, context: grpc.ServicerContext
               ) -> index_pb2.DeleteResponse:
        _, database = self._database(request.database, context)
        not_found = [i for i in request.item_ids if not database.delete(i)]
        return index_pb2.DeleteResponse(deleted=len(request.item_ids) - len(not_found),
                                        not_found=not_found)

    def Search(self, request: index_pb2.SearchRequest, context: grpc.ServicerContext
               ) -> Iterator[index_pb2.SearchResponse]:
        top_k = request.top_k or 10
        if top_k > self.max_top_k:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"top_k {top_k} is above this shard's limit of {self.max_top_k}")
        kind, database = self._database(request.database, context)
        try:
            value = signature_value(request.signature)
            if request.signature.kind != kind:
                raise SignatureError(f"database {request.database!r} holds "
                                     f"{common_pb2.SignatureKind.Name(kind)} signatures, not "
                                     f"{common_pb2.SignatureKind.Name(request.signature.kind)}")
            hits = database.search(value, top_k)  # type: ignore[arg-type]
        except SignatureError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for start in range(0, len(hits), self.chunk_size):
            yield index_pb2.SearchResponse(items=[
                index_pb2.ScoredItem(item_id=h.item_id, score=h.score, metadata=h.metadata)
                for h in hits[start:start + self.chunk_size]])

    def Stats(self, request: index_pb2.StatsRequest, context: grpc.ServicerContext
              ) -> index_pb2.StatsResponse:
        return index_pb2.StatsResponse(databases=[
            index_pb2.DatabaseStats(name=d.name, kind=d.kind, dimension=d.dimension, items=d.items)
            for d in self.catalogue.stats()])

    def _database(self, name: str, context: grpc.ServicerContext):
        if not name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "database is required")
        try:
            return self.catalogue.get(name)
        except UnknownDatabase:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"database {name!r} does not exist on this shard; it has "
                          f"{self.catalogue.names()} (a database is created by its first Add)")
