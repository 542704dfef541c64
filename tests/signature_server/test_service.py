import grpc
import numpy as np
import pytest

from common.bow_codec import decode
from common.proto_convert import image_to_proto
from mps.common.v1 import common_pb2
from mps.signature.v1 import signature_pb2
from signature_server.service import SignatureService
from tests.servicer import unary

SERVICE = signature_pb2.DESCRIPTOR.services_by_name["SignatureService"]


@pytest.fixture(scope="module")
def servicer(deep_descriptor, bow_extractor):
    return SignatureService(deep_descriptor, bow_extractor, max_images=4, max_pixels=50_000_000)


def request(images, kind=common_pb2.SIGNATURE_KIND_DEEP):
    return signature_pb2.ComputeSignaturesRequest(images=images, kind=kind)


def test_one_signature_per_image_in_order(servicer, coffee, coffee_png, deep_descriptor):
    images = [image_to_proto(coffee[:200]), common_pb2.Image(encoded=coffee_png)]
    response, code, _ = unary(servicer, SERVICE, "ComputeSignatures", request(images))
    assert code == grpc.StatusCode.OK and len(response.signatures) == 2
    expected = deep_descriptor.compute([coffee[:200], coffee])
    for signature, vector in zip(response.signatures, expected):
        assert signature.kind == common_pb2.SIGNATURE_KIND_DEEP
        np.testing.assert_allclose(signature.dense.values, vector, atol=1e-5)


def test_limits_and_bad_input(servicer, coffee):
    tiny = image_to_proto(coffee[:32, :32])
    cases = [(request([tiny] * 5), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 4"),
             (request([]), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
             (request([tiny], common_pb2.SIGNATURE_KIND_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT, "kind"),
             (request([tiny], 9), grpc.StatusCode.INVALID_ARGUMENT, "kind 9"),
             (request([tiny, common_pb2.Image(encoded=b"nope")]), grpc.StatusCode.INVALID_ARGUMENT, "images[1]"),
             (request([common_pb2.Image(raw=common_pb2.RawImage(width=4, height=4, rgb=b"x"))]),
              grpc.StatusCode.INVALID_ARGUMENT, "RGB bytes")]
    for message, expected_code, fragment in cases:
        _, code, details = unary(servicer, SERVICE, "ComputeSignatures", message)
        assert code == expected_code and fragment in details


def test_list_kinds(servicer):
    response, _, _ = unary(servicer, SERVICE, "ListKinds", signature_pb2.ListKindsRequest())
    assert [(k.kind, k.dimension, k.metric) for k in response.kinds] == \
        [(common_pb2.SIGNATURE_KIND_DEEP, 1280, "cosine"), (common_pb2.SIGNATURE_KIND_BOW, 5000, "chi2")]
    # Where the colour-texture kernels run is reported.
    assert response.kinds[1].backend.startswith("cpu") and "codebook" in response.kinds[1].model


def test_bag_of_words_signatures_decode_and_match_the_extractor(servicer, coffee, bow_extractor):
    crops = [coffee[:200, :300], coffee[100:, 200:]]
    response, code, _ = unary(servicer, SERVICE, "ComputeSignatures",
                              request([image_to_proto(c) for c in crops], common_pb2.SIGNATURE_KIND_BOW))
    assert code == grpc.StatusCode.OK
    for signature, image in zip(response.signatures, crops):
        assert signature.kind == common_pb2.SIGNATURE_KIND_BOW and len(signature.bow) <= 3500
        bag = decode(signature.bow)
        expected = bow_extractor.bag(image)
        np.testing.assert_array_equal(bag.words, expected.words)
        np.testing.assert_array_equal(bag.counts, expected.counts)
