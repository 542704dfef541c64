"""Detector server bootstrap: create_server(config) starts it; serve() runs it until SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from common.model_repository import ModelRepository, ModelSource
from common.security import Access, method_policy
from common.serving import ServiceBundle, serve_forever, start_bundle
from common.telemetry import BATCH_SIZE
from detector_server.config import DetectorConfig
from detector_server.model import DetectorModel
from detector_server.service import DetectorService
from mps.detector.v1 import detector_pb2, detector_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = detector_pb2.DESCRIPTOR.services_by_name["DetectorService"]
# Loading and unloading models is the operator's (the suite's internal credential where one is set).
POLICY = method_policy(SERVICE, LoadModel=Access.INTERNAL, UnloadModel=Access.INTERNAL)


def open_repository(config: DetectorConfig) -> ModelRepository[DetectorModel]:
    """The model repository with config.models loaded and warmed up (each model's first request
    is as fast as its next); raises when one of them cannot load."""

    def load(source: ModelSource) -> DetectorModel:
        return DetectorModel(
            source,
            config.intra_op_threads,
            config.inference_concurrency,
            batching=config.dynamic_batching,
            on_batch=BATCH_SIZE.labels("detector", "inference_images").observe,
        )

    return ModelRepository(
        Path(config.models_dir), config.models, load, any_model=True, drain_timeout_s=config.drain_timeout_s
    )


def start_detector(config: DetectorConfig) -> tuple[ServiceBundle, ModelRepository[DetectorModel]]:
    """The started server and its model repository (which the bundle's on_stop closes). The
    server starts, and its health says SERVING, only once every model is loaded and warm."""
    repository = open_repository(config)
    try:
        service = DetectorService(repository, config.max_pixels, config.max_objects)
        bundle = start_bundle(
            config,
            lambda s: detector_pb2_grpc.add_DetectorServiceServicer_to_server(service, s),
            [SERVICE.full_name],
            on_stop=repository.close,
            policy=POLICY,
        )
    except BaseException:
        repository.close()
        raise
    return bundle, repository


def create_bundle(config: DetectorConfig) -> ServiceBundle:
    return start_detector(config)[0]


def create_server(config: DetectorConfig) -> tuple[grpc.Server, int]:
    bundle = create_bundle(config)
    return bundle.server, bundle.port


def serve(config: DetectorConfig) -> None:
    serve_forever("detector_server", config, create_bundle)
