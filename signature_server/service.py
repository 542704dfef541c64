"""SignatureService servicer: protobuf <-> numpy, errors -> status codes."""

from __future__ import annotations

import time

import grpc

from common.images import ImageError
from common.proto_convert import dense_to_proto, image_from_proto
from mps.common.v1 import common_pb2
from mps.signature.v1 import signature_pb2, signature_pb2_grpc
from signature_server.deep import DeepDescriptor


class SignatureService(signature_pb2_grpc.SignatureServiceServicer):
    def __init__(self, deep: DeepDescriptor, max_images: int, max_pixels: int):
        self.deep = deep
        self.max_images = max_images
        self.max_pixels = max_pixels

    def ComputeSignatures(self, request: signature_pb2.ComputeSignaturesRequest,
                          context: grpc.ServicerContext) -> signature_pb2.ComputeSignaturesResponse:
        kind = request.kind
        if kind == common_pb2.SIGNATURE_KIND_UNSPECIFIED:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "kind is unspecified: set SIGNATURE_KIND_DEEP (ListKinds lists what is served)")
        if kind != common_pb2.SIGNATURE_KIND_DEEP:
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          f"signature kind {common_pb2.SignatureKind.Name(kind)} is not served here; "
                          "ListKinds lists what is")
        if not request.images:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no images given")
        if len(request.images) > self.max_images:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{len(request.images)} images in one call; at most {self.max_images}: split it")
        images = []
        for i, image in enumerate(request.images):
            try:
                images.append(image_from_proto(image, self.max_pixels))
            except ImageError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"images[{i}]: {exc}")
        start = time.perf_counter()
        vectors = self.deep.compute(images)
        return signature_pb2.ComputeSignaturesResponse(
            signatures=[dense_to_proto(v) for v in vectors],
            compute_ms=(time.perf_counter() - start) * 1000)

    def ListKinds(self, request: signature_pb2.ListKindsRequest, context: grpc.ServicerContext
                  ) -> signature_pb2.ListKindsResponse:
        return signature_pb2.ListKindsResponse(kinds=[signature_pb2.KindInfo(
            kind=common_pb2.SIGNATURE_KIND_DEEP, dimension=self.deep.spec.dimension,
            model=self.deep.spec.name, backend=self.deep.provider, metric="cosine")])
