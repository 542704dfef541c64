"""SignatureService servicer: protobuf <-> numpy; refusals are domain errors (common.errors), which
the server's interceptor turns into status codes."""

from __future__ import annotations

import time

import grpc
import numpy as np

from common.errors import InvalidArgument, ResourceExhausted
from common.images import ImageError, Photo
from common.proto_convert import box_to_proto, dense_to_proto, image_from_proto, photo_from_proto
from mps.common.v1 import common_pb2
from mps.signature.v1 import signature_pb2, signature_pb2_grpc
from signature_server.bow import BowExtractor
from signature_server.deep import DeepDescriptor
from signature_server.saliency import Located, ObjectLocator

SERVED_KINDS = (common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW)


def _kind_name(kind: int) -> str:
    return common_pb2.SignatureKind.Name(kind) if kind in common_pb2.SignatureKind.values() else str(kind)


class SignatureService(signature_pb2_grpc.SignatureServiceServicer):
    def __init__(
        self,
        deep: DeepDescriptor,
        bow: BowExtractor,
        locator: ObjectLocator,
        max_images: int,
        max_pixels: int,
        max_salient: int,
        max_segments: int,
    ):
        self.deep = deep
        self.bow = bow
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.locator = locator
        self.max_salient = max_salient
        self.max_segments = max_segments

    def _check_kinds(self, request: signature_pb2.ComputeSignaturesRequest) -> list[int]:
        """The kinds asked for: `kinds`, or the one `kind`; each served, none twice (InvalidArgument)."""
        field = "kinds" if request.kinds else "kind"
        kinds = list(request.kinds) or [request.kind]
        for j, kind in enumerate(kinds):
            where = f"kinds[{j}]" if request.kinds else "kind"
            if kind not in SERVED_KINDS:
                raise InvalidArgument(
                    f"{where}: signature kind {_kind_name(kind)} is not served; set "
                    f"SIGNATURE_KIND_DEEP or SIGNATURE_KIND_BOW in {field} (ListKinds lists what is served)",
                    violations=[(where, f"{_kind_name(kind)} is not served")],
                )
            if kind in kinds[:j]:
                raise InvalidArgument(
                    f"{where}: {_kind_name(kind)} is listed twice; list each kind once",
                    violations=[(where, f"{_kind_name(kind)} is listed twice")],
                )
        return kinds

    def ComputeSignatures(
        self, request: signature_pb2.ComputeSignaturesRequest, context: grpc.ServicerContext
    ) -> signature_pb2.ComputeSignaturesResponse:
        kinds = self._check_kinds(request)
        if not request.images:
            raise InvalidArgument(
                f"no images given: send 1 to {self.max_images} images in images",
                violations=[("images", "empty")],
            )
        # The limit is on images (what is decoded and held), whatever the number of kinds.
        if len(request.images) > self.max_images:
            raise ResourceExhausted(
                f"{len(request.images)} images are above the limit of {self.max_images} per call: split the call",
                quota=[("images", f"at most {self.max_images} images per ComputeSignatures call")],
            )
        images = []
        for i, image in enumerate(request.images):
            try:
                images.append(image_from_proto(image, self.max_pixels))
            except ImageError as exc:
                raise InvalidArgument(f"images[{i}]: {exc}", violations=[(f"images[{i}]", str(exc)[:300])]) from None
        start = time.perf_counter()
        # Each kind signs the whole batch at once (batched forward passes); the reply is image-major.
        per_kind = [self._sign(kind, images) for kind in kinds]
        signatures = [signed[i] for i in range(len(images)) for signed in per_kind]
        return signature_pb2.ComputeSignaturesResponse(
            signatures=signatures, compute_ms=(time.perf_counter() - start) * 1000
        )

    def _sign(self, kind: int, images: list[np.ndarray]) -> list[common_pb2.Signature]:
        if kind == common_pb2.SIGNATURE_KIND_BOW:
            return [common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=b) for b in self.bow.compute(images)]
        return [dense_to_proto(v) for v in self.deep.compute(images)]

    def LocateObjects(
        self, request: signature_pb2.LocateObjectsRequest, context: grpc.ServicerContext
    ) -> signature_pb2.LocateObjectsResponse:
        if request.max_salient == 0 and request.max_segments == 0:
            raise InvalidArgument(
                "max_salient and max_segments are both 0: ask for at least one salient object or one segment",
                violations=[("max_salient", "0 with max_segments 0"), ("max_segments", "0 with max_salient 0")],
            )
        if request.max_salient > self.max_salient:
            raise ResourceExhausted(
                f"max_salient is {request.max_salient}; this server gives at most {self.max_salient}: ask for fewer",
                quota=[("max_salient", f"at most {self.max_salient} salient objects per call")],
            )
        if request.max_segments > self.max_segments:
            raise ResourceExhausted(
                f"max_segments is {request.max_segments}; this server gives at most {self.max_segments}: ask for fewer",
                quota=[("max_segments", f"at most {self.max_segments} segments per call")],
            )
        try:
            # Nothing finer than the feature map's size is looked at: a large photo is decoded small.
            photo = photo_from_proto(request.image, self.max_pixels, self.locator.spec.feature_long_side)
        except ImageError as exc:
            raise InvalidArgument(f"image: {exc}", violations=[("image", str(exc)[:300])]) from None
        start = time.perf_counter()
        found = self.locator.locate(photo.rgb, request.max_salient, request.max_segments)
        return signature_pb2.LocateObjectsResponse(
            salient=_located_to_proto(found.salient, photo),
            segments=_located_to_proto(found.segments, photo),
            image_width=photo.width,
            image_height=photo.height,
            compute_ms=(time.perf_counter() - start) * 1000,
        )

    def ListKinds(
        self, request: signature_pb2.ListKindsRequest, context: grpc.ServicerContext
    ) -> signature_pb2.ListKindsResponse:
        bow = self.bow
        return signature_pb2.ListKindsResponse(
            max_images_per_call=self.max_images,
            kinds=[
                signature_pb2.KindInfo(
                    kind=common_pb2.SIGNATURE_KIND_DEEP,
                    dimension=self.deep.spec.dimension,
                    model=self.deep.spec.name,
                    backend=self.deep.provider,
                    metric="cosine",
                ),
                signature_pb2.KindInfo(
                    kind=common_pb2.SIGNATURE_KIND_BOW,
                    dimension=bow.codebook.vocabulary,
                    model=f"{bow.spec.name} v{bow.spec.version} (codebook {bow.codebook.fingerprint:08x})",
                    backend=bow.kernels.detail,
                    metric="chi2",
                ),
            ],
        )


def _located_to_proto(located: list[Located], photo: Photo) -> list[signature_pb2.LocatedObject]:
    """Boxes found on the photo's decoded copy, in pixels of the image as sent."""
    return [
        signature_pb2.LocatedObject(box=box_to_proto(photo.to_original(box)), score=score) for box, score in located
    ]
