"""SignatureService servicer: protobuf <-> numpy, errors -> status codes."""

from __future__ import annotations

import time

import grpc
import numpy as np

from common.images import ImageError
from common.proto_convert import box_to_proto, dense_to_proto, image_from_proto
from mps.common.v1 import common_pb2
from mps.signature.v1 import signature_pb2, signature_pb2_grpc
from signature_server.bow import BowExtractor
from signature_server.config import SignatureConfig
from signature_server.deep import DeepDescriptor
from signature_server.saliency import Located, ObjectLocator

SERVED_KINDS = (common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW)


def _kind_name(kind: int) -> str:
    return common_pb2.SignatureKind.Name(kind) if kind in common_pb2.SignatureKind.values() else str(kind)


class SignatureService(signature_pb2_grpc.SignatureServiceServicer):
    def __init__(self, deep: DeepDescriptor, bow: BowExtractor, max_images: int, max_pixels: int, *,
                 locator: ObjectLocator | None = None, max_salient: int = SignatureConfig.max_salient,
                 max_segments: int = SignatureConfig.max_segments):
        self.deep = deep
        self.bow = bow
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.locator = locator
        self.max_salient = max_salient
        self.max_segments = max_segments

    def _check_kinds(self, request: signature_pb2.ComputeSignaturesRequest,
                     context: grpc.ServicerContext) -> list[int]:
        if not request.kinds:
            kind = request.kind
            if kind == common_pb2.SIGNATURE_KIND_UNSPECIFIED:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              "kind is unspecified: set SIGNATURE_KIND_DEEP or SIGNATURE_KIND_BOW, or list "
                              "several in kinds (ListKinds lists what is served)")
            if kind not in SERVED_KINDS:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"signature kind {kind} is unknown; ListKinds lists what is served")
            return [kind]
        kinds = list(request.kinds)
        for j, kind in enumerate(kinds):
            if kind not in SERVED_KINDS:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"kinds[{j}]: signature kind {_kind_name(kind)} is not served; set "
                              "SIGNATURE_KIND_DEEP and/or SIGNATURE_KIND_BOW (ListKinds lists what is served)")
            if kind in kinds[:j]:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"kinds[{j}]: {_kind_name(kind)} is listed twice; list each kind once")
        return kinds

    def ComputeSignatures(self, request: signature_pb2.ComputeSignaturesRequest,
                          context: grpc.ServicerContext) -> signature_pb2.ComputeSignaturesResponse:
        kinds = self._check_kinds(request, context)
        if not request.images:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no images given")
        # The limit is on images (what is decoded and held), whatever the number of kinds.
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
        # Each kind signs the whole batch at once (batched forward passes); the reply is image-major.
        per_kind = [self._sign(kind, images) for kind in kinds]
        signatures = [signed[i] for i in range(len(images)) for signed in per_kind]
        return signature_pb2.ComputeSignaturesResponse(
            signatures=signatures, compute_ms=(time.perf_counter() - start) * 1000)

    def _sign(self, kind: int, images: list[np.ndarray]) -> list[common_pb2.Signature]:
        if kind == common_pb2.SIGNATURE_KIND_BOW:
            return [common_pb2.Signature(kind=kind, bow=b) for b in self.bow.compute(images)]
        return [dense_to_proto(v) for v in self.deep.compute(images)]

    def LocateObjects(self, request: signature_pb2.LocateObjectsRequest,
                      context: grpc.ServicerContext) -> signature_pb2.LocateObjectsResponse:
        if self.locator is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this signature server was started without an "
                                                         "object locator")
        if request.max_salient == 0 and request.max_segments == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "max_salient and max_segments are both 0: ask for at least one salient object "
                          "or one segment")
        if request.max_salient > self.max_salient:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"max_salient is {request.max_salient}; this server gives at most "
                          f"{self.max_salient}: ask for fewer")
        if request.max_segments > self.max_segments:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"max_segments is {request.max_segments}; this server gives at most "
                          f"{self.max_segments}: ask for fewer")
        try:
            image = image_from_proto(request.image, self.max_pixels)
        except ImageError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image: {exc}")
        start = time.perf_counter()
        found = self.locator.locate(image, request.max_salient, request.max_segments)
        height, width = image.shape[:2]
        return signature_pb2.LocateObjectsResponse(
            salient=_located_to_proto(found.salient), segments=_located_to_proto(found.segments),
            image_width=width, image_height=height, compute_ms=(time.perf_counter() - start) * 1000)

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


def _located_to_proto(located: list[Located]) -> list[signature_pb2.LocatedObject]:
    return [signature_pb2.LocatedObject(box=box_to_proto(box), score=score) for box, score in located]
