"""Signature server bootstrap: create_server(config) starts it; serve() runs it until SIGTERM."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import grpc

from common.model_repository import ModelRepository, ModelSource
from common.security import Access, method_policy
from common.serving import ServiceBundle, serve_forever, start_bundle
from kernels import Kernels, select_kernels
from mps.signature.v1 import signature_pb2, signature_pb2_grpc
from signature_server.blcf import BlcfModel
from signature_server.bow import BowModel
from signature_server.config import SignatureConfig
from signature_server.saliency import DeepModel
from signature_server.service import SignatureModel, SignatureService

SERVICE = signature_pb2.DESCRIPTOR.services_by_name["SignatureService"]
log = logging.getLogger("signature_server")


def model_loader(config: SignatureConfig, kernels: Kernels) -> Callable[[ModelSource], SignatureModel]:
    """Builds a version of the deep, the colour-texture or the BLCF model, by the model's name."""

    def load(source: ModelSource) -> SignatureModel:
        if source.name == config.deep_model:
            return DeepModel.from_source(
                source, config.intra_op_threads, config.inference_concurrency, config.dynamic_batching
            )
        if source.name == config.bow_model:
            return BowModel.from_source(source, kernels, config.bow_threads)
        if source.name == config.blcf_model:
            return BlcfModel.from_source(source, kernels, config.intra_op_threads, config.inference_concurrency)
        raise ValueError(
            f"model {source.name!r} is none of {config.deep_model!r}, {config.bow_model!r}, {config.blcf_model!r}"
        )

    return load


def create_repository(config: SignatureConfig, kernels: Kernels | None = None) -> ModelRepository[SignatureModel]:
    """The deep, colour-texture and BLCF models, each version loaded and warmed up (see ModelRepository)."""
    kernels = kernels or select_kernels(config.kernels)
    return ModelRepository(
        Path(config.models_dir),
        [config.deep_model, config.bow_model, config.blcf_model],
        model_loader(config, kernels),
        any_model=False,
        drain_timeout_s=config.drain_timeout_s,
    )


def create_bundle(config: SignatureConfig) -> ServiceBundle:
    # Every model is loaded and warmed up before the server starts: health says SERVING only once
    # no first call would be cold.
    repository = create_repository(config)
    for row in repository.status():
        log.info("model %s version %s on %s, loaded in %.0f ms", row.name, row.version, row.provider, row.load_ms)
    service = SignatureService(
        repository,
        config.deep_model,
        config.bow_model,
        config.max_images_per_request,
        config.max_pixels,
        config.max_salient,
        config.max_segments,
        blcf_model=config.blcf_model,
        local_features=config.local_feature_settings(),
        local_feature_threads=config.local_feature_threads,
    )

    def close() -> None:
        service.close()
        repository.close()

    try:
        return start_bundle(
            config,
            lambda s: signature_pb2_grpc.add_SignatureServiceServicer_to_server(service, s),
            [SERVICE.full_name],
            on_stop=close,
            policy=method_policy(SERVICE, LoadModel=Access.INTERNAL, UnloadModel=Access.INTERNAL),
        )
    except BaseException:
        close()
        raise


def create_server(config: SignatureConfig) -> tuple[grpc.Server, int]:
    bundle = create_bundle(config)
    return bundle.server, bundle.port


def serve(config: SignatureConfig) -> None:
    # Process-wide, so set where the process is the server's own (not in tests' shared process).
    cv2.setNumThreads(config.opencv_threads)
    serve_forever("signature_server", config, create_bundle)
