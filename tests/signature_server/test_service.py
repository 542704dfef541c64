"""The signature servicer: in-process through grpcio-testing (its answers, and the domain errors it
raises for the interceptor to map), then over a real server on loopback (codes and details)."""

from unittest import mock

import grpc
import numpy as np
import pytest

from common.bow_codec import decode
from common.errors import InvalidArgument, ResourceExhausted, ServiceError
from common.images import encode_png
from common.proto_convert import dense_from_proto, image_to_proto
from common.status import details_of
from mps.common.v1 import common_pb2
from mps.signature.v1 import signature_pb2
from signature_server.service import SignatureService
from tests.servicer import unary

SERVICE = signature_pb2.DESCRIPTOR.services_by_name["SignatureService"]


@pytest.fixture(scope="module")
def servicer(signature_models):
    return SignatureService(
        signature_models,
        "efficientnet-lite0",
        "colour-texture-bow",
        max_images=4,
        max_pixels=50_000_000,
        max_salient=8,
        max_segments=200,
    )


def request(images, kind=common_pb2.SIGNATURE_KIND_DEEP):
    return signature_pb2.ComputeSignaturesRequest(images=images, kind=kind)


def refused(method, message) -> ServiceError:
    """The domain error a servicer method raises (the interceptor, not run here, maps it)."""
    with pytest.raises(ServiceError) as error:
        method(message, mock.create_autospec(grpc.ServicerContext, instance=True))
    return error.value


def test_one_signature_per_image_in_order(servicer, coffee, coffee_png, deep_descriptor):
    images = [image_to_proto(coffee[:200]), common_pb2.Image(encoded=coffee_png)]
    response, code, _ = unary(servicer, SERVICE, "ComputeSignatures", request(images))
    assert code == grpc.StatusCode.OK and len(response.signatures) == 2
    assert [(m.name, m.version) for m in response.served_by] == [("efficientnet-lite0", "1")]
    expected = deep_descriptor.compute([coffee[:200], coffee])
    for signature, vector in zip(response.signatures, expected):
        assert signature.kind == common_pb2.SIGNATURE_KIND_DEEP
        assert signature.dense.values_f32le and not signature.dense.values  # bytes on the wire
        np.testing.assert_allclose(dense_from_proto(signature), vector, atol=1e-5)


def test_limits_and_bad_input_raise_domain_errors_naming_the_field(servicer, coffee):
    tiny = image_to_proto(coffee[:32, :32])
    cases = [
        (request([]), InvalidArgument, "no images given: send 1 to 4 images", ("images", "empty")),
        (
            request([tiny], common_pb2.SIGNATURE_KIND_UNSPECIFIED),
            InvalidArgument,
            "kind: signature kind SIGNATURE_KIND_UNSPECIFIED is not served",
            ("kind", "SIGNATURE_KIND_UNSPECIFIED is not served"),
        ),
        (request([tiny], 9), InvalidArgument, "kind: signature kind 9 is not served", ("kind", "9 is not served")),
        (
            request([tiny, common_pb2.Image(encoded=b"nope")]),
            InvalidArgument,
            "images[1]: ",
            ("images[1]", "cannot be decoded"),
        ),
        (
            request([common_pb2.Image(raw=common_pb2.RawImage(width=4, height=4, rgb=b"x"))]),
            InvalidArgument,
            "RGB bytes",
            ("images[0]", "RGB bytes"),
        ),
    ]
    for message, kind, fragment, (field, says) in cases:
        error = refused(servicer.ComputeSignatures, message)
        assert type(error) is kind and fragment in error.message, error.message
        assert [f for f, _ in error.violations] == [field] and says in error.violations[0][1], error.violations


def test_the_image_limit_is_a_quota_failure(servicer, coffee):
    error = refused(servicer.ComputeSignatures, request([image_to_proto(coffee[:32, :32])] * 5))
    assert type(error) is ResourceExhausted
    assert error.message == "5 images are above the limit of 4 per call: split the call"
    assert error.quota == [("images", "at most 4 images per ComputeSignatures call")]


def test_list_kinds(servicer, blcf):
    response, _, _ = unary(servicer, SERVICE, "ListKinds", signature_pb2.ListKindsRequest())
    assert response.max_images_per_call == 4  # the gateway splits its calls to this
    assert [(k.kind, k.dimension, k.metric) for k in response.kinds] == [
        (common_pb2.SIGNATURE_KIND_DEEP, 1280, "cosine"),
        (common_pb2.SIGNATURE_KIND_BOW, 5000, "chi2"),
        (common_pb2.SIGNATURE_KIND_BLCF, blcf.vocabulary.size, "tfidf-cosine"),
    ]
    # BLCF names its version, the network and tensor it describes, and its vocabulary's fingerprint.
    spec, fingerprint = blcf.spec, blcf.vocabulary.fingerprint
    assert response.kinds[2].model == (
        f"blcf v{spec.version} (efficientnet-lite0 v1 '/_blocks.10/Add_output_0' at stride 16, "
        f"vocabulary {fingerprint:08x})"
    )
    assert response.kinds[2].backend
    # Each kind names the model version behind it.
    assert response.kinds[0].model == "efficientnet-lite0 v1"
    assert response.kinds[1].model.startswith("colour-texture-bow v2 (codebook ")
    # Where the colour-texture kernels run is reported.
    assert response.kinds[1].backend.startswith("cpu") and "codebook" in response.kinds[1].model


def test_bag_of_words_signatures_decode_and_match_the_extractor(servicer, coffee, bow_extractor):
    crops = [coffee[:200, :300], coffee[100:, 200:]]
    response, code, _ = unary(
        servicer,
        SERVICE,
        "ComputeSignatures",
        request([image_to_proto(c) for c in crops], common_pb2.SIGNATURE_KIND_BOW),
    )
    assert code == grpc.StatusCode.OK
    for signature, image in zip(response.signatures, crops):
        assert signature.kind == common_pb2.SIGNATURE_KIND_BOW and len(signature.bow) <= 3500
        bag = decode(signature.bow)
        expected = bow_extractor.bag(image)
        np.testing.assert_array_equal(bag.words, expected.words)
        np.testing.assert_array_equal(bag.counts, expected.counts)


# Over a real server on loopback: several kinds per call, and LocateObjects.

MAX_SALIENT, MAX_SEGMENTS = 4, 50


@pytest.fixture(scope="module")
def stub():
    from common.config import load_config
    from common.serving import channel_options
    from mps.signature.v1 import signature_pb2_grpc
    from signature_server.config import SignatureConfig
    from signature_server.server import create_server

    server, port = create_server(
        load_config(
            SignatureConfig,
            "signature",
            environ={},
            port=0,
            intra_op_threads=2,
            max_images_per_request=4,
            max_salient=MAX_SALIENT,
            max_segments=MAX_SEGMENTS,
        )
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(32 * 1024 * 1024))
    yield signature_pb2_grpc.SignatureServiceStub(channel)
    channel.close()
    server.stop(None)


def call_code(method, message):
    """-> (response or None, status code, details)."""
    try:
        return method(message, timeout=30), grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        return None, error.code(), error.details()


def test_several_kinds_in_one_call_are_image_major_and_equal_one_call_per_kind(stub, coffee, coffee_png):
    images = [image_to_proto(coffee[:200, :300]), common_pb2.Image(encoded=coffee_png)]
    kinds = [common_pb2.SIGNATURE_KIND_BOW, common_pb2.SIGNATURE_KIND_DEEP]
    both = stub.ComputeSignatures(signature_pb2.ComputeSignaturesRequest(images=images, kinds=kinds), timeout=30)
    single = {kind: stub.ComputeSignatures(request(images, kind), timeout=30).signatures for kind in kinds}
    assert len(both.signatures) == len(images) * len(kinds)
    for i in range(len(images)):
        for j, kind in enumerate(kinds):
            signature = both.signatures[i * len(kinds) + j]
            assert signature.kind == kind
            assert signature.SerializeToString() == single[kind][i].SerializeToString()


def test_several_kinds_bad_input_and_the_limit_counts_images(stub, coffee):
    tiny = image_to_proto(coffee[:32, :32])
    deep, bow = common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW

    def kinds_request(images, kinds):
        return signature_pb2.ComputeSignaturesRequest(images=images, kinds=kinds)

    # Four images with two kinds is four images: within the limit of 4.
    response, code, _ = call_code(stub.ComputeSignatures, kinds_request([tiny] * 4, [deep, bow]))
    assert code == grpc.StatusCode.OK and len(response.signatures) == 8
    cases = [
        (kinds_request([tiny], [deep, deep]), grpc.StatusCode.INVALID_ARGUMENT, "listed twice"),
        (kinds_request([tiny], [deep, 9]), grpc.StatusCode.INVALID_ARGUMENT, "kinds[1]: signature kind 9"),
        (
            kinds_request([tiny], [common_pb2.SIGNATURE_KIND_UNSPECIFIED]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SIGNATURE_KIND_UNSPECIFIED is not served",
        ),
        (
            request([tiny], common_pb2.SIGNATURE_KIND_UNSPECIFIED),
            grpc.StatusCode.INVALID_ARGUMENT,
            "kind: signature kind SIGNATURE_KIND_UNSPECIFIED is not served",
        ),
        (kinds_request([tiny] * 5, [deep]), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 4 per call"),
        (kinds_request([], [deep, bow]), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    ]
    for message, expected_code, fragment in cases:
        _, code, details = call_code(stub.ComputeSignatures, message)
        assert code == expected_code and fragment in details, (code, details)


def locate(image, max_salient=MAX_SALIENT, max_segments=30):
    return signature_pb2.LocateObjectsRequest(image=image, max_salient=max_salient, max_segments=max_segments)


def test_locate_objects_answers_the_same_for_raw_and_encoded_photos(stub, coffee, coffee_png):
    raw = stub.LocateObjects(locate(image_to_proto(coffee)), timeout=30)
    encoded = stub.LocateObjects(locate(common_pb2.Image(encoded=coffee_png)), timeout=30)
    assert (raw.image_width, raw.image_height) == (600, 400) and raw.compute_ms > 0
    assert 1 <= len(raw.salient) <= MAX_SALIENT and 1 <= len(raw.segments) <= 30
    encoded.compute_ms = raw.compute_ms
    assert encoded == raw
    for located in [*raw.salient, *raw.segments]:
        box = located.box
        assert 0 <= box.x_min < box.x_max <= 600 and 0 <= box.y_min < box.y_max <= 400
        assert 0 < located.score <= 1


def test_locate_objects_bad_input_says_what_to_fix(stub, coffee, coffee_png):
    from tests.helpers import bad_images

    photo = common_pb2.Image(encoded=coffee_png)
    cases = [
        (signature_pb2.LocateObjectsRequest(max_salient=1), grpc.StatusCode.INVALID_ARGUMENT, "no image given"),
        (
            locate(common_pb2.Image(encoded=bad_images(coffee_png)["random"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "cannot be decoded",
        ),
        (
            locate(common_pb2.Image(encoded=bad_images(coffee_png)["bomb"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "downscale",
        ),
        (
            locate(common_pb2.Image(raw=common_pb2.RawImage(width=4, height=4, rgb=b"x"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "RGB bytes",
        ),
        (locate(photo, 0, 0), grpc.StatusCode.INVALID_ARGUMENT, "both 0"),
        (locate(photo, MAX_SALIENT + 1, 0), grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {MAX_SALIENT}"),
        (locate(photo, 1, MAX_SEGMENTS + 1), grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {MAX_SEGMENTS}"),
    ]
    for message, expected_code, fragment in cases:
        _, code, details = call_code(stub.LocateObjects, message)
        assert code == expected_code and fragment in details, (code, details)


def test_limit_refusals_carry_their_quota_over_loopback(stub, coffee, coffee_png):
    """What a client reads besides the message: the limit exceeded (google.rpc.QuotaFailure) and
    the field at fault (google.rpc.BadRequest)."""
    photo = common_pb2.Image(encoded=coffee_png)
    cases = [
        (
            stub.ComputeSignatures,
            request([image_to_proto(coffee[:32, :32])] * 5),
            [("images", "at most 4 images per ComputeSignatures call")],
        ),
        (
            stub.LocateObjects,
            locate(photo, MAX_SALIENT + 1, 0),
            [("max_salient", f"at most {MAX_SALIENT} salient objects per call")],
        ),
        (
            stub.LocateObjects,
            locate(photo, 1, MAX_SEGMENTS + 1),
            [("max_segments", f"at most {MAX_SEGMENTS} segments per call")],
        ),
    ]
    for method, message, quota in cases:
        with pytest.raises(grpc.RpcError) as error:
            method(message, timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = details_of(error.value)
        assert details.reason == "RESOURCE_EXHAUSTED" and details.quota == quota
    with pytest.raises(grpc.RpcError) as error:
        stub.ComputeSignatures(request([image_to_proto(coffee[:32, :32])], 9), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(error.value).violations == [("kind", "9 is not served")]


def thin_images():
    """Strips one pixel thick, raw and PNG, plain (no keypoint fires) and textured."""
    rng = np.random.default_rng(3)
    plain = np.full((1, 100_000, 3), 128, np.uint8)
    textured = rng.integers(0, 256, (1, 100_000, 3), dtype=np.uint8)
    strips = {
        "plain-wide": plain,
        "plain-tall": plain.reshape(100_000, 1, 3),
        "textured-wide": textured,
        "textured-tall": textured.reshape(100_000, 1, 3),
    }
    images = {f"raw-{name}": image_to_proto(strip) for name, strip in strips.items()}
    images.update({f"png-{name}": common_pb2.Image(encoded=encode_png(strip)) for name, strip in strips.items()})
    return images


@pytest.mark.parametrize("name", sorted(thin_images()))
def test_thin_images_get_a_signature_of_each_kind_and_locate_answers(stub, name):
    # Every kind answers OK: the deep descriptor resizes to its input, and the bag of words describes
    # a strip thinner than its grid on its middle row (it used to fail with "cannot reshape").
    image = thin_images()[name]
    response = stub.ComputeSignatures(
        signature_pb2.ComputeSignaturesRequest(
            images=[image], kinds=[common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW]
        ),
        timeout=60,
    )
    deep, bow = response.signatures
    vector = dense_from_proto(deep)
    assert vector.shape == (1280,) and np.isfinite(vector).all()
    bag = decode(bow.bow)
    assert bag.vocabulary == 5000 and bag.counts.sum() >= 1
    located = stub.LocateObjects(locate(image, 2, 10), timeout=60)
    assert {(located.image_width, located.image_height)} <= {(100_000, 1), (1, 100_000)}
    for found in [*located.salient, *located.segments]:
        box = found.box
        assert 0 <= box.x_min <= box.x_max <= located.image_width
        assert 0 <= box.y_min <= box.y_max <= located.image_height


def test_a_16_bit_png_is_signed_like_its_8_bit_truth(stub, coffee):
    import cv2

    wide = coffee.astype(np.uint16) * 257  # the same picture with 16 bits per channel
    png16 = cv2.imencode(".png", cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))[1].tobytes()
    signed = stub.ComputeSignatures(request([common_pb2.Image(encoded=png16), image_to_proto(coffee)]), timeout=60)
    np.testing.assert_allclose(
        dense_from_proto(signed.signatures[0]), dense_from_proto(signed.signatures[1]), atol=1e-5
    )


# SIGNATURE_KIND_BLCF: assignment maps, and queries by region.

BLCF = common_pb2.SIGNATURE_KIND_BLCF


@pytest.fixture(scope="module")
def blcf(signature_models):
    """The BLCF extractor the service uses (its default version)."""
    with signature_models.use("blcf") as (_, _, model):
        return model.extractor


def region_request(images, regions, kinds=(BLCF,)):
    return signature_pb2.ComputeSignaturesRequest(
        images=images,
        kinds=list(kinds),
        regions=[common_pb2.Box(x_min=a, y_min=b, x_max=c, y_max=d) for a, b, c, d in regions],
    )


def test_blcf_signatures_decode_to_the_extractors_maps(servicer, coffee, blcf):
    from common.blcf_codec import decode as decode_blcf
    from common.blcf_codec import encode as encode_blcf

    crops = [coffee[:200, :300], coffee]
    request = signature_pb2.ComputeSignaturesRequest(
        images=[image_to_proto(c) for c in crops], kinds=[common_pb2.SIGNATURE_KIND_DEEP, BLCF]
    )
    response, code, _ = unary(servicer, SERVICE, "ComputeSignatures", request)
    assert code == grpc.StatusCode.OK and len(response.signatures) == 4
    assert [m.name for m in response.served_by] == ["efficientnet-lite0", "blcf"]
    for i, crop in enumerate(crops):
        deep, signed = response.signatures[2 * i], response.signatures[2 * i + 1]
        assert deep.kind == common_pb2.SIGNATURE_KIND_DEEP and signed.kind == BLCF
        assignment = decode_blcf(signed.blcf)
        assert (assignment.width, assignment.height) == (crop.shape[1], crop.shape[0])
        assert assignment.fingerprint == blcf.vocabulary.fingerprint
        assert signed.blcf == encode_blcf(blcf.map(crop)) and len(signed.blcf) < 1024


def test_regions_give_one_signature_each_in_order(servicer, coffee, blcf):
    from common.blcf_codec import EMPTY
    from common.blcf_codec import decode as decode_blcf
    from common.blcf_codec import encode as encode_blcf

    regions = [(250.0, 100.0, 400.0, 200.0), (0.0, 0.0, 600.0, 400.0), (-20.0, 300.0, 100.0, 500.0)]
    response, code, _ = unary(servicer, SERVICE, "ComputeSignatures", region_request([image_to_proto(coffee)], regions))
    assert code == grpc.StatusCode.OK and len(response.signatures) == len(regions)
    expected = blcf.maps(coffee, regions)
    for signed, box, wanted in zip(response.signatures, regions, expected):
        assert signed.kind == BLCF and signed.blcf == encode_blcf(wanted)
        region = decode_blcf(signed.blcf)
        rows, columns = np.nonzero(region.words != EMPTY)
        # Every kept cell's centre is inside the region (a region partly outside keeps what is inside).
        assert len(rows) > 0
        for row, column in zip(rows, columns):
            x0, y0, x1, y1 = region.cell_box(int(row), int(column), int(row) + 1, int(column) + 1)
            assert box[0] <= (x0 + x1) / 2 < box[2] and box[1] <= (y0 + y1) / 2 < box[3]


def test_region_and_blcf_bad_input_raise_domain_errors_naming_the_field(servicer, coffee):
    photo = image_to_proto(coffee)
    deep = common_pb2.SIGNATURE_KIND_DEEP
    wide = image_to_proto(np.zeros((1, 70_000, 3), np.uint8))
    nan = float("nan")
    cases = [
        (
            region_request([photo], [(0, 0, 10, 10)], kinds=(deep,)),
            InvalidArgument,
            "SIGNATURE_KIND_BLCF alone",
            "regions",
        ),
        (region_request([photo], [(0, 0, 10, 10)], kinds=(BLCF, deep)), InvalidArgument, "only kind", "regions"),
        (region_request([photo, photo], [(0, 0, 10, 10)]), InvalidArgument, "send exactly 1 image", "images"),
        (
            region_request([photo], [(0, 0, 10, 10), (5, 5, 1, 1)]),
            InvalidArgument,
            "regions[1]: region (5, 5, 1, 1) is empty or inverted",
            "regions[1]",
        ),
        (region_request([photo], [(10, 10, 10, 50)]), InvalidArgument, "is empty or inverted", "regions[0]"),
        (region_request([photo], [(700, 0, 800, 50)]), InvalidArgument, "lies outside the 600x400 image", "regions[0]"),
        (region_request([photo], [(nan, 0, 10, 10)]), InvalidArgument, "not a finite number", "regions[0]"),
        (region_request([wide], []), InvalidArgument, "up to 65535 pixels a side: downscale it", "images[0]"),
    ]
    for message, kind, fragment, field in cases:
        error = refused(servicer.ComputeSignatures, message)
        assert type(error) is kind and fragment in error.message, error.message
        assert [f for f, _ in error.violations] == [field], error.violations
    error = refused(servicer.ComputeSignatures, region_request([photo], [(0, 0, 10, 10)] * 5))
    assert type(error) is ResourceExhausted
    assert error.message == "5 regions are above the limit of 4 per call: split the call"
    assert error.quota == [("regions", "at most 4 regions per ComputeSignatures call")]


def test_blcf_and_regions_over_loopback(stub, coffee, blcf):
    from common.blcf_codec import encode as encode_blcf

    photo = image_to_proto(coffee)
    signed = stub.ComputeSignatures(request([photo], BLCF), timeout=30)
    assert signed.signatures[0].blcf == encode_blcf(blcf.map(coffee))
    regions = stub.ComputeSignatures(region_request([photo], [(250, 100, 400, 200)] * 4), timeout=30)
    assert len(regions.signatures) == 4 and len({s.blcf for s in regions.signatures}) == 1
    cases = [
        (region_request([photo], [(0, 0, 10, 10)] * 5), grpc.StatusCode.RESOURCE_EXHAUSTED, "5 regions are above"),
        (region_request([photo], [(5, 5, 1, 1)]), grpc.StatusCode.INVALID_ARGUMENT, "regions[0]"),
        (
            region_request([photo], [(0, 0, 1, 1)], kinds=(common_pb2.SIGNATURE_KIND_BOW,)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SIGNATURE_KIND_BLCF alone",
        ),
    ]
    for message, expected_code, fragment in cases:
        _, code, details = call_code(stub.ComputeSignatures, message)
        assert code == expected_code and fragment in details, (code, details)
