"""DetectorService servicer: protobuf <-> numpy; refusals are domain errors (common.errors), which
the server's interceptor turns into status codes."""

from __future__ import annotations

import math

import grpc

from common.errors import InvalidArgument, NotFound, quote
from common.images import ImageError
from common.names import check_name
from common.proto_convert import box_to_proto, image_from_proto
from detector_server.model import DetectorModel
from mps.detector.v1 import detector_pb2, detector_pb2_grpc

# An unknown model's NOT_FOUND names at most this many of the loaded ones.
MAX_LISTED_MODELS = 8


class DetectorService(detector_pb2_grpc.DetectorServiceServicer):
    def __init__(self, models: dict[str, DetectorModel], default: str, max_pixels: int, max_objects: int):
        if default not in models:
            raise ValueError(f"default model {default!r} is not loaded")
        self.models = models
        self.default = default
        self.max_pixels = max_pixels
        self.max_objects = max_objects

    def Detect(self, request: detector_pb2.DetectRequest, context: grpc.ServicerContext) -> detector_pb2.DetectResponse:
        name, model = self._model(request.model)
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
            image_width=image.shape[1],
            image_height=image.shape[0],
            inference_ms=result.inference_ms,
        )

    def ListModels(
        self, request: detector_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> detector_pb2.ListModelsResponse:
        return detector_pb2.ListModelsResponse(
            models=[
                detector_pb2.ModelInfo(
                    name=name,
                    version=m.spec.version,
                    execution_provider=m.provider,
                    input_width=m.spec.input_width,
                    input_height=m.spec.input_height,
                    class_names=list(m.spec.class_names),
                    categories=m.spec.categories,
                    is_default=name == self.default,
                )
                for name, m in self.models.items()
            ]
        )

    def _model(self, name: str) -> tuple[str, DetectorModel]:
        """The model a request names (empty: the default); InvalidArgument or NotFound otherwise."""
        if not name:
            return self.default, self.models[self.default]
        check_name("model", name)
        model = self.models.get(name)
        if model is None:
            loaded = sorted(self.models)
            listed = ", ".join(quote(n) for n in loaded[:MAX_LISTED_MODELS])
            more = f" and {len(loaded) - MAX_LISTED_MODELS} more" if len(loaded) > MAX_LISTED_MODELS else ""
            raise NotFound(
                f"model {quote(name)} is not loaded: use one of {listed}{more} "
                "(ListModels lists them), or leave model empty for the default"
            )
        return name, model


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
