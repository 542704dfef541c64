"""DetectorService servicer: protobuf <-> numpy; refusals are domain errors (common.errors), which
the server's interceptor turns into status codes."""

from __future__ import annotations

import math

import grpc

from common.errors import InvalidArgument, NotFound, Unavailable
from common.images import ImageError
from common.model_repository import ModelRepository, VersionStatus
from common.names import check_name, check_version
from common.proto_convert import MODEL_STATES, box_to_proto, image_from_proto
from detector_server.model import DetectorModel
from mps.detector.v1 import detector_pb2, detector_pb2_grpc


class DetectorService(detector_pb2_grpc.DetectorServiceServicer):
    """Detect on a version lent by the model repository; ListModels, LoadModel and UnloadModel are
    the repository's own calls, answered with every version of the model concerned."""

    def __init__(self, repository: ModelRepository[DetectorModel], max_pixels: int, max_objects: int):
        self.repository = repository
        self.max_pixels = max_pixels
        self.max_objects = max_objects

    def Detect(self, request: detector_pb2.DetectRequest, context: grpc.ServicerContext) -> detector_pb2.DetectResponse:
        if request.model:
            check_name("model", request.model)
        version = check_version("model_version", request.model_version)
        _check_fraction("min_confidence", request.min_confidence, "0 keeps the model's threshold")
        _check_fraction("objectness_threshold", request.objectness_threshold, "0 asks for no class-agnostic objects")
        if request.max_objects > self.max_objects:
            raise InvalidArgument(
                f"max_objects {request.max_objects} is above this server's limit of "
                f"{self.max_objects}: ask for at most {self.max_objects}, or 0 for the "
                "model's default",
                violations=[("max_objects", f"{request.max_objects} is above the limit of {self.max_objects}")],
                quota=[("max_objects", f"at most {self.max_objects} objects per Detect call")],
            )
        try:
            image = image_from_proto(request.image, self.max_pixels)
        except ImageError as exc:
            # common.images says what to fix; a decoder's own text inside it is cut short all the same.
            raise InvalidArgument(_bounded(str(exc)), violations=[("image", _bounded(str(exc), 300))]) from exc
        # The version is held (counted in flight) only while it runs: a swap drains it meanwhile.
        with self.repository.use(request.model, version) as (name, served_version, model):
            result = model.detect(
                image,
                request.min_confidence or None,
                request.products_only,
                request.objectness_threshold,
                request.max_objects,
            )
        return detector_pb2.DetectResponse(
            detections=[
                detector_pb2.Detection(
                    category=d.category,
                    class_name=d.class_name,
                    class_id=d.class_id,
                    confidence=d.confidence,
                    box=box_to_proto(d.box),
                )
                for d in result.detections
            ],
            objects=[
                detector_pb2.ObjectProposal(box=box_to_proto(box), objectness=score) for box, score in result.objects
            ],
            model=name,
            model_version=served_version,
            image_width=image.shape[1],
            image_height=image.shape[0],
            inference_ms=result.inference_ms,
            batch_size=result.batch_size,
        )

    def ListModels(
        self, request: detector_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> detector_pb2.ListModelsResponse:
        return detector_pb2.ListModelsResponse(models=self._infos(self.repository.status()))

    def LoadModel(
        self, request: detector_pb2.LoadModelRequest, context: grpc.ServicerContext
    ) -> detector_pb2.LoadModelResponse:
        check_name("model", request.name)
        version = check_version("version", request.version)
        return detector_pb2.LoadModelResponse(models=self._infos(self.repository.load(request.name, version)))

    def UnloadModel(
        self, request: detector_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> detector_pb2.UnloadModelResponse:
        check_name("model", request.name)
        version = check_version("version", request.version)
        return detector_pb2.UnloadModelResponse(models=self._infos(self.repository.unload(request.name, version)))

    def _infos(self, rows: list[VersionStatus]) -> list[detector_pb2.ModelInfo]:
        """ModelInfo of each row; the class fields of the READY ones (others have no model to ask)."""
        infos = []
        for row in rows:
            info = detector_pb2.ModelInfo(
                name=row.name,
                version=row.version,
                execution_provider=row.provider,
                is_default=row.is_default,
                state=MODEL_STATES[row.state],
                reason=row.reason,
                max_batch=row.max_batch,
                load_ms=row.load_ms,
            )
            if row.state == "READY":
                try:
                    with self.repository.use(row.name, row.version) as (_, _, model):
                        spec = model.spec
                except (NotFound, Unavailable):
                    pass  # swapped out since the row was read: shown as it was, without its classes
                else:
                    info.input_width, info.input_height = spec.input_width, spec.input_height
                    info.class_names.extend(spec.class_names)
                    info.categories.update(spec.categories)
            infos.append(info)
        return infos


def _bounded(message: str, limit: int = 512) -> str:
    return message if len(message) <= limit else message[:limit] + "…"


def _check_fraction(field: str, value: float, zero: str) -> None:
    """Raises InvalidArgument unless `value` is 0 (`zero` says what that means) or in (0, 1]."""
    if math.isnan(value):
        raise InvalidArgument(f"{field} is NaN: send a number in (0, 1]; {zero}", violations=[(field, "NaN")])
    if not 0.0 <= value <= 1.0:
        raise InvalidArgument(
            f"{field} {value:g} is outside (0, 1]: send a number in (0, 1]; {zero}",
            violations=[(field, f"{value:g} is outside (0, 1]")],
        )
