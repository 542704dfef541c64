"""The detector servicer: in-process through grpcio-testing (its answers, and the domain errors it
raises for the interceptor to map), then over a real server on loopback."""

from unittest import mock

import grpc
import pytest

from common.errors import InvalidArgument, NotFound, ServiceError
from common.proto_convert import image_to_proto
from common.status import details_of
from detector_server.service import DetectorService
from mps.common.v1 import common_pb2, models_pb2
from mps.detector.v1 import detector_pb2
from tests.helpers import BAD_IMAGE_SAYS, bad_images
from tests.servicer import unary

SERVICE = detector_pb2.DESCRIPTOR.services_by_name["DetectorService"]


@pytest.fixture(scope="module")
def servicer():
    from common.config import MODELS_DIR
    from common.model_repository import ModelRepository
    from detector_server.model import DetectorModel

    repository = ModelRepository(
        MODELS_DIR, ["yolov3-tiny"], lambda source: DetectorModel(source, 2, batching=True), any_model=True
    )
    yield DetectorService(repository, 50_000_000, max_objects=200)
    repository.close()


def refused(servicer: DetectorService, request: detector_pb2.DetectRequest) -> ServiceError:
    """The domain error Detect raises (the interceptor, not run here, maps it to a status)."""
    with pytest.raises(ServiceError) as error:
        servicer.Detect(request, mock.create_autospec(grpc.ServicerContext, instance=True))
    return error.value


def test_detect_encoded_and_raw(servicer, coffee, coffee_png):
    for image in (common_pb2.Image(encoded=coffee_png), image_to_proto(coffee)):
        response, code, _ = unary(servicer, SERVICE, "Detect", detector_pb2.DetectRequest(image=image))
        assert code == grpc.StatusCode.OK
        assert (response.image_width, response.image_height) == (600, 400)
        assert response.detections[0].class_name == "cup"
        assert response.detections[0].box.x_max <= 600


@pytest.mark.parametrize("name", ["empty", "truncated", "random", "zero_size_header", "bomb"])
def test_bad_images_are_invalid_argument(servicer, coffee_png, name):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=bad_images(coffee_png)[name]))
    error = refused(servicer, request)
    assert type(error) is InvalidArgument and BAD_IMAGE_SAYS[name] in error.message, error.message
    assert [field for field, _ in error.violations] == ["image"]


def test_unknown_model_is_not_found(servicer, coffee_png):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=coffee_png), model="rfcn")
    error = refused(servicer, request)
    assert type(error) is NotFound and "model 'rfcn' is not served here: use one of ['yolov3-tiny']" in error.message


def test_out_of_range_threshold_is_invalid(servicer, coffee_png):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=coffee_png), min_confidence=2)
    error = refused(servicer, request)
    assert type(error) is InvalidArgument and error.message.startswith("min_confidence 2 is outside (0, 1]")
    assert error.violations == [("min_confidence", "2 is outside (0, 1]")]


def test_list_models_reports_the_real_provider(servicer):
    response, _code, _ = unary(servicer, SERVICE, "ListModels", detector_pb2.ListModelsRequest())
    [model] = response.models
    assert model.is_default and model.execution_provider == "CPUExecutionProvider"
    assert len(model.class_names) == 80 and model.categories["cup"] == "tableware"
    assert (model.name, model.version, model.state) == ("yolov3-tiny", "1", models_pb2.MODEL_STATE_READY)
    assert model.max_batch == 8 and model.load_ms > 0 and (model.input_width, model.input_height) == (416, 416)


def test_objects_come_back_in_original_pixels(servicer, coffee_png):
    request = detector_pb2.DetectRequest(
        image=common_pb2.Image(encoded=coffee_png), objectness_threshold=0.01, max_objects=5
    )
    response, code, _ = unary(servicer, SERVICE, "Detect", request)
    assert code == grpc.StatusCode.OK and 0 < len(response.objects) <= 5
    best = response.objects[0]
    assert best.objectness > 0.5 and 140 < best.box.x_min < 160 and 420 < best.box.x_max < 440
    # Without the threshold, no objects.
    plain, _, _ = unary(servicer, SERVICE, "Detect", detector_pb2.DetectRequest(image=request.image))
    assert not plain.objects


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("objectness_threshold", 1.5, "objectness_threshold 1.5 is outside (0, 1]"),
        ("objectness_threshold", -0.1, "objectness_threshold -0.1 is outside (0, 1]"),
        ("max_objects", 10_000, "max_objects 10000 is above this server's limit of 200"),
    ],
)
def test_bad_object_requests(servicer, coffee_png, field, value, says):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=coffee_png), objectness_threshold=0.1)
    setattr(request, field, value)
    error = refused(servicer, request)
    assert type(error) is InvalidArgument and error.message.startswith(says), error.message
    assert [f for f, _ in error.violations] == [field]


def test_the_object_limit_carries_its_quota(servicer, coffee_png):
    request = detector_pb2.DetectRequest(
        image=common_pb2.Image(encoded=coffee_png), objectness_threshold=0.1, max_objects=201
    )
    error = refused(servicer, request)
    assert error.quota == [("max_objects", "at most 200 objects per Detect call")]
    assert error.violations == [("max_objects", "201 is above the limit of 200")]


@pytest.mark.parametrize(
    "model, kind, says",
    [
        ("m" * 2**20, InvalidArgument, "limit of 128"),
        ("yolo\0", InvalidArgument, "u+0000"),
        (" yolov3-tiny", InvalidArgument, "whitespace"),
        ("r" * 128, NotFound, "'yolov3-tiny'"),
    ],
)
def test_model_names_are_checked_and_never_echoed_whole(servicer, coffee_png, model, kind, says):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=coffee_png), model=model)
    error = refused(servicer, request)
    assert type(error) is kind and says in error.message.lower() and len(error.message) < 512


@pytest.mark.parametrize("field", ["min_confidence", "objectness_threshold"])
def test_nan_thresholds_are_invalid(servicer, coffee_png, field):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=coffee_png), **{field: float("nan")})
    error = refused(servicer, request)
    assert type(error) is InvalidArgument and error.message.startswith(f"{field} is NaN: send a number in (0, 1]")
    assert error.violations == [(field, "NaN")]


@pytest.fixture(scope="module")
def detector_channel():
    from common.config import load_config
    from detector_server.config import DetectorConfig
    from detector_server.server import start_detector

    bundle, repository = start_detector(load_config(DetectorConfig, "detector", environ={}, port=0, intra_op_threads=2))
    with grpc.insecure_channel(f"127.0.0.1:{bundle.port}") as channel:
        yield channel
    bundle.server.stop(None)
    repository.close()


def test_refusals_over_loopback_carry_their_code_and_details(detector_channel, coffee_png):
    from mps.detector.v1 import detector_pb2_grpc

    stub = detector_pb2_grpc.DetectorServiceStub(detector_channel)
    image = common_pb2.Image(encoded=coffee_png)
    with pytest.raises(grpc.RpcError) as error:
        stub.Detect(detector_pb2.DetectRequest(image=image, objectness_threshold=0.1, max_objects=10_000), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_objects 10000 is above this server's limit of 200" in error.value.details()
    details = details_of(error.value)
    assert details.quota == [("max_objects", "at most 200 objects per Detect call")]
    assert details.violations == [("max_objects", "10000 is above the limit of 200")]
    with pytest.raises(grpc.RpcError) as error:
        stub.Detect(detector_pb2.DetectRequest(image=image, model="rfcn"), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "'yolov3-tiny'" in error.value.details()
    assert details_of(error.value).reason == "NOT_FOUND"


def brute_force_nms(boxes, scores, threshold, classes):
    from detector_server.nms import iou_matrix

    kept = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(classes[i] != classes[j] or iou_matrix(boxes[[i]], boxes[[j]])[0, 0] <= threshold for j in kept):
            kept.append(i)
    return kept


def test_near_zero_confidence_over_loopback_is_fast_and_small(detector_channel, coffee_png):
    """min_confidence 1e-30 passes every (anchor, class) pair: it once asked for a 472 GiB N x N matrix."""
    import resource
    import time

    from mps.detector.v1 import detector_pb2_grpc

    stub = detector_pb2_grpc.DetectorServiceStub(detector_channel)
    image = common_pb2.Image(encoded=coffee_png)
    stub.Detect(detector_pb2.DetectRequest(image=image), timeout=30)  # warm: session, arenas
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    response = stub.Detect(
        detector_pb2.DetectRequest(image=image, min_confidence=1e-30, objectness_threshold=1e-30, max_objects=200),
        timeout=30,
    )
    elapsed = time.monotonic() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # Linux: KiB
    assert elapsed < 2.0 and grown_mb < 200, (elapsed, grown_mb)
    assert len(response.detections) == 100 and len(response.objects) == 200  # the model's and the asked caps


def test_detections_equal_a_brute_force_nms(detector_model, coffee):
    """At a normal threshold, the served answer is the reference NMS over every candidate, uncapped."""
    import numpy as np

    from detector_server.letterbox import letterbox, unletterbox_boxes

    spec = detector_model.spec
    for threshold in (0.05, 0.25):
        tensor, scale, pad = letterbox(coffee, (spec.input_height, spec.input_width))
        rows = detector_model.session.run(["detections"], {"images": tensor[None]})[0][0]
        scores_all = rows[:, 5:] * rows[:, 4:5]
        box_ids, class_ids = np.nonzero(scores_all >= threshold)
        assert 0 < len(box_ids) < 2000  # below the cap: the cap changes nothing here
        centre, size = rows[box_ids, :2], rows[box_ids, 2:4]
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)
        scores = scores_all[box_ids, class_ids]
        kept = brute_force_nms(boxes, scores, spec.iou_threshold, class_ids)[: spec.max_detections]
        expected = [
            (
                int(class_ids[i]),
                round(float(scores[i]), 5),
                tuple(np.round(unletterbox_boxes(boxes[[i]], scale, pad, coffee.shape[:2])[0], 2)),
            )
            for i in kept
        ]
        got = [
            (d.class_id, round(d.confidence, 5), tuple(np.round(d.box, 2)))
            for d in detector_model.detect(coffee, score_threshold=threshold).detections
        ]
        assert got == [e for e in expected if e[2][2] - e[2][0] >= 1 and e[2][3] - e[2][1] >= 1]
        assert len(got) > 0


@pytest.mark.parametrize("width, height", [(100_000, 1), (1, 100_000)])
@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_thin_images_are_ok(servicer, width, height, encoding):
    """A 1-pixel-high strip letterboxes to one row of the network input: an answer, never a crash."""
    import numpy as np

    from common.images import encode_png

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = common_pb2.Image(encoded=encode_png(pixels)) if encoding == "png" else image_to_proto(pixels)
    request = detector_pb2.DetectRequest(image=image, objectness_threshold=0.001, min_confidence=0.001)
    response, code, details = unary(servicer, SERVICE, "Detect", request)
    assert code == grpc.StatusCode.OK, details
    assert (response.image_width, response.image_height) == (width, height)
    for found in list(response.detections) + list(response.objects):
        assert 0 <= found.box.x_min < found.box.x_max <= width and 0 <= found.box.y_min < found.box.y_max <= height
