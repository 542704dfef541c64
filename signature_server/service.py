"""SignatureService servicer: protobuf <-> numpy, errors -> status codes."""

from __future__ import annotations

import time

import grpc

from common.images import ImageError
from common.proto_convert import dense_to_proto, image_from_proto
from mps.common.v1 import common_pb2
from mps.signature.v1 import signature_pb2, signature_pb2_grpc
from signature_server.bow import BowExtractor
from signature_server.deep import DeepDescriptor


class SignatureService(signature_pb2_grpc.SignatureServiceServicer):
    def __init__(self, deep: DeepDescriptor, bow: BowExtractor, max_images: int, max_pixels: int):
        self.deep = deep
        self.bow = bow
        self.max_images = max_images
        self.max_pixels = max_pixels

    def ComputeSignatures(self, request: signature_pb2.ComputeSignaturesRequest,
                          context: grpc.ServicerContext) -> signature_pb2.ComputeSignaturesResponse:
        kind = request.kind
        if kind == common_pb2.SIGNATURE_KIND_UNSPECIFIED:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "kind is unspecified: set SIGNATURE_KIND_DEEP or SIGNATURE_KIND_BOW "
                          "(ListKinds lists what is served)")
        if kind not in (common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"signature kind {kind} is unknown; ListKinds lists what is served")
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
        if kind == common_pb2.SIGNATURE_KIND_BOW:
            signatures = [common_pb2.Signature(kind=kind, bow=b) for b in self.bow.compute(images)]
        else:
            signatures = [dense_to_proto(v) for v in self.deep.compute(images)]
        return signature_pb2.ComputeSignaturesResponse(
            signatures=signatures, compute_ms=(time.perf_counter() - start) * 1000)

    def ListKinds(self, request: signature_pb2.ListKindsRequest, context: grpc.ServicerContext
                  ) -> signature_pb2.ListKindsResponse:
        bow = self.bow
        return signature_pb2.ListKindsResponse(kinds=[
            signature_pb2.KindInfo(kind=common_pb2.SIGNATURE_KIND_DEEP, dimension=self.deep.spec.dimension,
                                   model=self.deep.spec.name, backend=self.deep.provider, metric="cosine"),
            signature_pb2.KindInfo(kind=common_pb2.SIGNATURE_KIND_BOW, dimension=bow.codebook.vocabulary,
                                   model=f"{bow.spec.name} v{bow.spec.version} "
                                         f"(codebook {bow.codebook.fingerprint:08x})",
                                   backend=bow.kernels.detail, metric="chi2")])
