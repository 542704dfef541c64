"""SignatureService servicer: protobuf <-> numpy; refusals are domain errors (common.errors), which
the server's interceptor turns into status codes.

Each signature kind is one model of the server's model repository (common/model_repository.py):
SIGNATURE_KIND_DEEP the deep descriptor's (which also serves LocateObjects), SIGNATURE_KIND_BOW the
colour-texture codebook's, SIGNATURE_KIND_BLCF the BLCF vocabulary's (signature_server/blcf.py). A
call holds the version it uses until it ends, so a hot swap never takes a model away from a call in
flight.

Query by region (`regions`, BLCF only): one image, BLCF as the one kind, at most as many regions as
images per call; each region is a box of the image (partly outside is clipped, wholly outside,
empty, inverted or not a number is INVALID_ARGUMENT naming it) and gets its own signature.

With `local_features`, a call also describes each image by its ORB keypoints and descriptors
(common/local_features.py, for re-ranking by geometric verification): on the service's own thread
pool, while the signatures are computed.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np

from common.blcf_codec import encode as encode_blcf
from common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, quote
from common.images import ImageError, Photo
from common.local_features import ExtractorSettings, Features, extract
from common.local_features import to_proto as features_to_proto
from common.model_repository import ModelRepository, VersionStatus
from common.names import check_version
from common.proto_convert import (
    MODEL_STATES,
    box_to_proto,
    dense_to_proto,
    image_from_proto,
    kind_name,
    photo_from_proto,
)
from mps.common.v1 import common_pb2, models_pb2
from mps.signature.v1 import signature_pb2, signature_pb2_grpc
from signature_server.blcf import MAX_IMAGE_SIDE, BlcfModel, Box, region_problem
from signature_server.bow import BowModel
from signature_server.saliency import DeepModel, Located

SERVED_KINDS = (common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW, common_pb2.SIGNATURE_KIND_BLCF)
# A loaded version of one of the signature service's models.
SignatureModel = DeepModel | BowModel | BlcfModel


def status_to_proto(row: VersionStatus) -> models_pb2.ModelStatus:
    return models_pb2.ModelStatus(
        name=row.name,
        version=row.version,
        state=MODEL_STATES[row.state],
        execution_provider=row.provider,
        reason=row.reason,
        is_default=row.is_default,
        max_batch=row.max_batch,
        in_flight=row.in_flight,
        load_ms=row.load_ms,
    )


class SignatureService(signature_pb2_grpc.SignatureServiceServicer):
    def __init__(
        self,
        repository: ModelRepository[SignatureModel],
        deep_model: str,
        bow_model: str,
        max_images: int,
        max_pixels: int,
        max_salient: int,
        max_segments: int,
        *,
        blcf_model: str = "blcf",
        local_features: ExtractorSettings | None = None,
        local_feature_threads: int = 2,
    ):
        self.repository = repository
        # The model behind each kind.
        self.models: dict[int, str] = {
            common_pb2.SIGNATURE_KIND_DEEP: deep_model,
            common_pb2.SIGNATURE_KIND_BOW: bow_model,
            common_pb2.SIGNATURE_KIND_BLCF: blcf_model,
        }
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.max_salient = max_salient
        self.max_segments = max_segments
        # How local features are described (common.local_features' defaults unless the config says).
        self.local_features = local_features or ExtractorSettings()
        self._feature_pool = ThreadPoolExecutor(max(1, local_feature_threads), thread_name_prefix="local-features")

    def close(self) -> None:
        """Stops the local features' threads (after the calls in flight)."""
        self._feature_pool.shutdown(wait=True, cancel_futures=True)

    def _check_kinds(self, request: signature_pb2.ComputeSignaturesRequest) -> list[int]:
        """The kinds asked for: `kinds`, or the one `kind`; each served, none twice (InvalidArgument)."""
        field = "kinds" if request.kinds else "kind"
        kinds = list(request.kinds) or [request.kind]
        for j, kind in enumerate(kinds):
            where = f"kinds[{j}]" if request.kinds else "kind"
            if kind not in SERVED_KINDS:
                raise InvalidArgument(
                    f"{where}: signature kind {kind_name(kind)} is not served; set "
                    f"SIGNATURE_KIND_DEEP, SIGNATURE_KIND_BOW or SIGNATURE_KIND_BLCF in {field} "
                    "(ListKinds lists what is served)",
                    violations=[(where, f"{kind_name(kind)} is not served")],
                )
            if kind in kinds[:j]:
                raise InvalidArgument(
                    f"{where}: {kind_name(kind)} is listed twice; list each kind once",
                    violations=[(where, f"{kind_name(kind)} is listed twice")],
                )
        return kinds

    def _served_models(self) -> str:
        deep, bow, blcf = (self.models[kind] for kind in SERVED_KINDS)
        return f"{deep!r} (SIGNATURE_KIND_DEEP), {bow!r} (SIGNATURE_KIND_BOW) or {blcf!r} (SIGNATURE_KIND_BLCF)"

    def _check_models(self, request: signature_pb2.ComputeSignaturesRequest) -> dict[str, str]:
        """The versions `models` asks for, by model name (InvalidArgument for a model not served
        here, or named twice); a model not named gets its default (version "")."""
        chosen: dict[str, str] = {}
        for i, ref in enumerate(request.models):
            where = f"models[{i}].name"
            if not ref.name:
                raise InvalidArgument(
                    f"{where} is empty: name {self._served_models()}, or leave models empty for the defaults",
                    violations=[(where, "empty")],
                )
            if ref.name not in self.models.values():
                raise InvalidArgument(
                    f"{where}: model {quote(ref.name)} is not served here: name {self._served_models()} "
                    "(ListModels lists their versions)",
                    violations=[(where, "not a model of this server")],
                )
            if ref.name in chosen:
                raise InvalidArgument(
                    f"{where}: model {quote(ref.name)} is named twice; name each model once",
                    violations=[(where, "named twice")],
                )
            chosen[ref.name] = check_version(f"models[{i}].version", ref.version)
        return chosen

    def ComputeSignatures(
        self, request: signature_pb2.ComputeSignaturesRequest, context: grpc.ServicerContext
    ) -> signature_pb2.ComputeSignaturesResponse:
        kinds = self._check_kinds(request)
        versions = self._check_models(request)
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
        self._check_regions_request(request, kinds)
        images = []
        for i, image in enumerate(request.images):
            try:
                images.append(image_from_proto(image, self.max_pixels))
            except ImageError as exc:
                raise InvalidArgument(f"images[{i}]: {exc}", violations=[(f"images[{i}]", str(exc)[:300])]) from None
        if common_pb2.SIGNATURE_KIND_BLCF in kinds:
            _check_blcf_sizes(images)
        regions = _regions(request, images[0]) if request.regions else []
        start = time.perf_counter()
        with contextlib.ExitStack() as held:
            # Every version this call uses is held until it ends (a swap drains, never cuts, it).
            used = []
            for kind in kinds:
                name = self.models[kind]
                used.append(held.enter_context(self.repository.use(name, versions.get(name, ""))))
            # Local features on their own threads, image by image, while the kinds sign the batch.
            pending: list[Future[Features]] = (
                [self._feature_pool.submit(extract, rgb, self.local_features) for rgb in images]
                if request.local_features
                else []
            )
            try:
                if regions:  # one image, BLCF alone: one signature per region
                    ((_, _, model),) = used
                    signatures = _sign_regions(model, images[0], regions)
                else:
                    # Each kind signs the whole batch at once (batched forward passes); the reply is image-major.
                    per_kind = [self._sign(kind, model, images) for kind, (_, _, model) in zip(kinds, used)]
                    signatures = [signed[i] for i in range(len(images)) for signed in per_kind]
                local = [features_to_proto(future.result()) for future in pending]
            finally:
                for future in pending:  # a failed call leaves no work queued behind it
                    future.cancel()
        return signature_pb2.ComputeSignaturesResponse(
            signatures=signatures,
            compute_ms=(time.perf_counter() - start) * 1000,
            served_by=[models_pb2.ModelRef(name=name, version=version) for name, version, _ in used],
            local_features=local,
        )

    def _check_regions_request(self, request: signature_pb2.ComputeSignaturesRequest, kinds: list[int]) -> None:
        """Regions go with one image and BLCF as the one kind, at most max_images of them."""
        if not request.regions:
            return
        if kinds != [common_pb2.SIGNATURE_KIND_BLCF]:
            asked = ", ".join(kind_name(kind) for kind in kinds)
            raise InvalidArgument(
                f"regions are a query by region of SIGNATURE_KIND_BLCF alone; this call asks for {asked}: "
                "ask for SIGNATURE_KIND_BLCF as the only kind, or send no regions",
                violations=[("regions", f"given with {asked}")],
            )
        if len(request.images) != 1:
            raise InvalidArgument(
                f"regions are regions of one image; this call sends {len(request.images)} images: "
                "send exactly 1 image with regions",
                violations=[("images", f"{len(request.images)} images with regions")],
            )
        if len(request.regions) > self.max_images:
            raise ResourceExhausted(
                f"{len(request.regions)} regions are above the limit of {self.max_images} per call: split the call",
                quota=[("regions", f"at most {self.max_images} regions per ComputeSignatures call")],
            )

    @staticmethod
    def _sign(kind: int, model: SignatureModel, images: list[np.ndarray]) -> list[common_pb2.Signature]:
        if kind == common_pb2.SIGNATURE_KIND_BLCF:
            assert isinstance(model, BlcfModel)
            maps = model.extractor.compute(images)
            return [common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BLCF, blcf=encode_blcf(m)) for m in maps]
        if kind == common_pb2.SIGNATURE_KIND_BOW:
            assert isinstance(model, BowModel)
            signed = model.extractor.compute(images)
            return [common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=b) for b in signed]
        assert isinstance(model, DeepModel)
        return [dense_to_proto(v) for v in model.descriptor.compute(images)]

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
        with self.repository.use(self.models[common_pb2.SIGNATURE_KIND_DEEP]) as (_, _, model):
            assert isinstance(model, DeepModel)
            locator = model.locator
            try:
                # Nothing finer than the feature map's size is looked at: a large photo is decoded small.
                photo = photo_from_proto(request.image, self.max_pixels, locator.spec.feature_long_side)
            except ImageError as exc:
                raise InvalidArgument(f"image: {exc}", violations=[("image", str(exc)[:300])]) from None
            start = time.perf_counter()
            found = locator.locate(photo.rgb, request.max_salient, request.max_segments)
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
        """The kinds served now, from their models' default versions; a kind whose model has no
        version loaded (UnloadModel) is left out until one is loaded again."""
        kinds = []
        for kind in SERVED_KINDS:
            try:
                with self.repository.use(self.models[kind]) as (_, version, model):
                    kinds.append(_kind_info(kind, version, model))
            except (FailedPrecondition, NotFound):  # no version loaded, or a repository without the model
                continue
        return signature_pb2.ListKindsResponse(max_images_per_call=self.max_images, kinds=kinds)

    def ListModels(
        self, request: signature_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> signature_pb2.ListModelsResponse:
        return signature_pb2.ListModelsResponse(models=[status_to_proto(row) for row in self.repository.status()])

    def LoadModel(
        self, request: signature_pb2.LoadModelRequest, context: grpc.ServicerContext
    ) -> signature_pb2.LoadModelResponse:
        """Loads a version beside the serving one, warms it up and swaps it in (common/model_repository.py);
        one that cannot load is FAILED_PRECONDITION and the old one keeps serving.

        A colour-texture version with another codebook is another vocabulary: its signatures carry
        the new codebook's fingerprint, and an index built with the old codebook refuses them (it
        does not compare words of different vocabularies) until it is rebuilt from the new ones."""
        rows = self.repository.load(request.name, check_version("version", request.version))
        return signature_pb2.LoadModelResponse(models=[status_to_proto(row) for row in rows])

    def UnloadModel(
        self, request: signature_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> signature_pb2.UnloadModelResponse:
        """Drains then releases a version (empty: every version); the deep model keeps one (it
        serves LocateObjects too), and a kind whose model has none is refused until one is loaded."""
        rows = self.repository.unload(request.name, check_version("version", request.version))
        return signature_pb2.UnloadModelResponse(models=[status_to_proto(row) for row in rows])


def _check_blcf_sizes(images: list[np.ndarray]) -> None:
    """A BLCF signature says its image's size in 16 bits a side (common/blcf_codec.py)."""
    for i, image in enumerate(images):
        height, width = image.shape[:2]
        if max(height, width) > MAX_IMAGE_SIDE:
            raise InvalidArgument(
                f"images[{i}] is {width}x{height} pixels; a SIGNATURE_KIND_BLCF signature describes images up to "
                f"{MAX_IMAGE_SIDE} pixels a side: downscale it",
                violations=[(f"images[{i}]", f"{width}x{height} is above {MAX_IMAGE_SIDE} pixels a side for BLCF")],
            )


def _regions(request: signature_pb2.ComputeSignaturesRequest, image: np.ndarray) -> list[Box]:
    """The request's regions as boxes of the image (InvalidArgument naming one that is unusable)."""
    height, width = image.shape[:2]
    boxes: list[Box] = []
    for i, region in enumerate(request.regions):
        box = (region.x_min, region.y_min, region.x_max, region.y_max)
        problem = region_problem(box, width, height)
        if problem:
            raise InvalidArgument(f"regions[{i}]: {problem}", violations=[(f"regions[{i}]", problem)])
        boxes.append(box)
    return boxes


def _sign_regions(model: SignatureModel, image: np.ndarray, regions: list[Box]) -> list[common_pb2.Signature]:
    assert isinstance(model, BlcfModel)
    maps = model.extractor.maps(image, regions)
    return [common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BLCF, blcf=encode_blcf(m)) for m in maps]


def _kind_info(kind: int, version: str, model: SignatureModel) -> signature_pb2.KindInfo:
    if isinstance(model, BlcfModel):
        blcf_spec, vocabulary = model.extractor.spec, model.extractor.vocabulary
        network = blcf_spec.network
        return signature_pb2.KindInfo(
            kind=common_pb2.SIGNATURE_KIND_BLCF,
            dimension=vocabulary.size,
            model=(
                f"{blcf_spec.name} v{version} ({network.name} v{network.version} {blcf_spec.tensor!r} at stride "
                f"{blcf_spec.stride}, vocabulary {vocabulary.fingerprint:08x})"
            ),
            backend=model.provider,
            metric="tfidf-cosine",
        )
    if isinstance(model, BowModel):
        extractor = model.extractor
        return signature_pb2.KindInfo(
            kind=common_pb2.SIGNATURE_KIND_BOW,
            dimension=extractor.codebook.vocabulary,
            model=f"{extractor.spec.name} v{version} (codebook {extractor.codebook.fingerprint:08x})",
            backend=model.provider,
            metric="chi2",
        )
    spec = model.descriptor.spec
    return signature_pb2.KindInfo(
        kind=common_pb2.SIGNATURE_KIND_DEEP,
        dimension=spec.dimension,
        model=f"{spec.name} v{version}",
        backend=model.provider,
        metric="cosine",
    )


def _located_to_proto(located: list[Located], photo: Photo) -> list[signature_pb2.LocatedObject]:
    """Boxes found on the photo's decoded copy, in pixels of the image as sent."""
    return [
        signature_pb2.LocatedObject(box=box_to_proto(photo.to_original(box)), score=score) for box, score in located
    ]
