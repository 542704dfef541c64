"""Detector server bootstrap: create_server(config) starts it; serve() runs it until SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from common.security import method_policy
from common.serving import ServiceBundle, serve_forever, start_bundle
from detector_server.config import DetectorConfig
from detector_server.model import DetectorModel, ModelSpec
from detector_server.service import DetectorService
from mps.detector.v1 import detector_pb2, detector_pb2_grpc

log = logging.getLogger(__name__)


def load_models(config: DetectorConfig) -> dict[str, DetectorModel]:
    models = {}
    for name in config.models:
        spec = ModelSpec.load(Path(config.models_dir) / name)
        models[spec.name] = DetectorModel(spec, config.intra_op_threads, config.inference_concurrency)
        log.info("loaded %s v%s on %s", spec.name, spec.version, models[spec.name].provider)
    return models


SERVICE = detector_pb2.DESCRIPTOR.services_by_name["DetectorService"]


def create_bundle(config: DetectorConfig) -> ServiceBundle:
    models = load_models(config)
    service = DetectorService(models, next(iter(models)), config.max_pixels, config.max_objects)
    return start_bundle(
        config,
        lambda s: detector_pb2_grpc.add_DetectorServiceServicer_to_server(service, s),
        [SERVICE.full_name],
        policy=method_policy(SERVICE),
    )


def create_server(config: DetectorConfig) -> tuple[grpc.Server, int]:
    bundle = create_bundle(config)
    return bundle.server, bundle.port


def serve(config: DetectorConfig) -> None:
    serve_forever("detector_server", config, create_bundle)
