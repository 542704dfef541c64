"""DetectorService servicer: protobuf <-> numpy, errors -> status codes."""

from __future__ import annotations

import grpc

from common.images import ImageError
from common.proto_convert import box_to_proto, image_from_proto
from detector_server.model import DetectorModel
from mps.detector.v1 import detector_pb2, detector_pb2_grpc


class DetectorService(detector_pb2_grpc.DetectorServiceServicer):
    def __init__(self, models: dict[str, DetectorModel], default: str, max_pixels: int, max_objects: int):
        if default not in models:
            raise ValueError(f"default model {default!r} is not loaded")
        self.models = models
        self.default = default
        self.max_pixels = max_pixels
        self.max_objects = max_objects

    def Detect(self, request: detector_pb2.DetectRequest, context: grpc.ServicerContext
               ) -> detector_pb2.DetectResponse:
        name = request.model or self.default
        model = self.models.get(name)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"model {name!r} is not loaded; ListModels gives {sorted(self.models)}")
        if not 0.0 <= request.min_confidence <= 1.0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"min_confidence {request.min_confidence} is outside (0, 1]; 0 keeps the model's")
        if not 0.0 <= request.objectness_threshold <= 1.0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"objectness_threshold {request.objectness_threshold} is outside (0, 1]; "
                          "0 asks for no class-agnostic objects")
        if request.max_objects > self.max_objects:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"max_objects {request.max_objects} is above this server's limit of {self.max_objects}")
        try:
            image = image_from_proto(request.image, self.max_pixels)
        except ImageError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        result = model.detect(image, request.min_confidence or None, request.products_only,
                              request.objectness_threshold, request.max_objects)
        return detector_pb2.DetectResponse(
            detections=[detector_pb2.Detection(category=d.category, class_name=d.class_name,
                                               class_id=d.class_id, confidence=d.confidence,
                                               box=box_to_proto(d.box)) for d in result.detections],
            objects=[detector_pb2.ObjectProposal(box=box_to_proto(box), objectness=score)
                     for box, score in result.objects],
            model=name, image_width=image.shape[1], image_height=image.shape[0],
            inference_ms=result.inference_ms)

    def ListModels(self, request: detector_pb2.ListModelsRequest, context: grpc.ServicerContext
                   ) -> detector_pb2.ListModelsResponse:
        return detector_pb2.ListModelsResponse(models=[
            detector_pb2.ModelInfo(name=name, version=m.spec.version, execution_provider=m.provider,
                                   input_width=m.spec.input_width, input_height=m.spec.input_height,
                                   class_names=list(m.spec.class_names), categories=m.spec.categories,
                                   is_default=name == self.default)
            for name, m in self.models.items()])
