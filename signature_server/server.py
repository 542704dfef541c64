"""Signature server bootstrap: create_server(config) starts it; serve() runs it until SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import grpc

from common.security import method_policy
from common.serving import ServiceBundle, serve_forever, start_bundle
from kernels import select_kernels
from mps.signature.v1 import signature_pb2, signature_pb2_grpc
from signature_server.bow import BowExtractor, BowSpec, Codebook
from signature_server.config import SignatureConfig
from signature_server.deep import DeepDescriptor, DeepSpec
from signature_server.saliency import LocateSpec, ObjectLocator
from signature_server.service import SignatureService

SERVICE = signature_pb2.DESCRIPTOR.services_by_name["SignatureService"]


def create_bundle(config: SignatureConfig) -> ServiceBundle:
    deep = DeepDescriptor(
        DeepSpec.load(Path(config.deep_model_dir)),
        config.max_batch,
        config.intra_op_threads,
        config.inference_concurrency,
    )
    locator = ObjectLocator(deep, LocateSpec.load(Path(config.deep_model_dir)))
    bow_spec = BowSpec.load(Path(config.bow_model_dir))
    kernels = select_kernels(config.kernels)
    bow = BowExtractor(
        bow_spec, Codebook.load(bow_spec.codebook_path, bow_spec.provenance_path), kernels, config.bow_threads
    )
    logging.getLogger("signature_server").info(
        "deep descriptor on %s; colour-texture kernels on %s", deep.provider, kernels.detail
    )
    service = SignatureService(
        deep, bow, locator, config.max_images_per_request, config.max_pixels, config.max_salient, config.max_segments
    )
    return start_bundle(
        config,
        lambda s: signature_pb2_grpc.add_SignatureServiceServicer_to_server(service, s),
        [SERVICE.full_name],
        policy=method_policy(SERVICE),
    )


def create_server(config: SignatureConfig) -> tuple[grpc.Server, int]:
    bundle = create_bundle(config)
    return bundle.server, bundle.port


def serve(config: SignatureConfig) -> None:
    # Process-wide, so set where the process is the server's own (not in tests' shared process).
    cv2.setNumThreads(config.opencv_threads)
    serve_forever("signature_server", config, create_bundle)
